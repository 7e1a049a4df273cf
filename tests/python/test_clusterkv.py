"""The ClusterKV policy end to end on SmolLM2-135M (30 layers, 9 query heads over 3 KV heads):
cluster counts after a ~2000-token essay prompt and after 320 decoded tokens, the position
lists attention read (sinks, the unclustered tail, whole clusters filling the budget exactly),
dense layers untouched, per-KV-head selection shared by a group, budget >= context giving the
full policy's logits bit for bit across re-clusterings, truncation, and parameter errors.
The exact choice of clusters (brute force against the policy's centroids) is checked in
tests/native/test-clusterkv.c, which can see the centroids.
"""
import math
import os

import numpy as np
import pytest

from conftest import N_THREADS, require_native

require_native()
from clusterkv_local import Llama, _internals  # noqa: E402

if not _internals.kv_policies_available():
    pytest.skip("this libclusterkv build has no KV policies", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ESSAY_DIRS = [os.path.join(ROOT, "..", "shared", "data", "pg_essays"),
              os.path.join(os.path.expanduser("~"), ".cache", "clusterkv_local", "data", "pg_essays")]

N_SINK, INTERVAL, PER_CLUSTER, BUDGET = 16, 320, 80, 512
N_DENSE = 2


def essay_text(min_chars: int) -> str:
    """Paul Graham essays when a copy is around, else a deterministic word soup."""
    for folder in ESSAY_DIRS:
        if os.path.isdir(folder):
            parts = []
            for name in sorted(os.listdir(folder)):
                if name.endswith(".txt"):
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        parts.append(f.read())
                if sum(map(len, parts)) >= min_chars:
                    return "\n\n".join(parts)
    rng = np.random.default_rng(0)
    words = ("the cache keys cluster semantic query budget token essay startup founders idea "
             "growth users write think work language program design").split()
    return " ".join(rng.choice(words, size=min_chars // 5))


def prompt_tokens(llm: Llama, n: int) -> list:
    tokens = llm.tokenize(essay_text(8 * n).encode())
    assert len(tokens) >= n
    return tokens[:n]


def decode_greedy(llm: Llama, n: int, record=None) -> list:
    """n single-token decode steps (each a policy step) feeding back the argmax token."""
    logits = []
    for _ in range(n):
        row = llm._require_ctx().logits(-1).copy()
        logits.append(row)
        llm.eval([int(np.argmax(row))])
        if record:
            record(llm)
    return logits


def check_list(sel, pos, end, budget, n_clustered):
    """Invariants of one ClusterKV list at decode position pos with [N_SINK, end) clustered."""
    assert np.all(np.diff(sel) > 0), "not ascending / distinct"
    assert sel[0] >= 0 and sel[-1] == pos
    tail = np.arange(end, pos + 1)
    assert len(sel) - len(tail) <= budget, "the tail comes on top of the budget"
    np.testing.assert_array_equal(sel[:N_SINK], np.arange(N_SINK))
    np.testing.assert_array_equal(sel[len(sel) - len(tail):], tail)
    middle = sel[N_SINK:len(sel) - len(tail)]
    assert np.all((middle >= N_SINK) & (middle < end))
    # whole clusters fill the budget left after the sinks exactly (the last one is cut)
    assert len(middle) == min(budget - N_SINK, n_clustered)


# ---------------------------------------------------------------------------------------------
# A 2000-token prompt, then 321 decode steps
# ---------------------------------------------------------------------------------------------

L_PROMPT = 2000


@pytest.fixture(scope="module")
def run(default_model_path):
    llm = Llama(default_model_path, n_ctx=4096, n_threads=N_THREADS, verbose=False,
                kv_policy="clusterkv", kv_budget=BUDGET,
                kv_policy_params={"n_sink": N_SINK, "recluster_interval": INTERVAL,
                                  "tokens_per_cluster": PER_CLUSTER, "n_dense_layers": N_DENSE})
    info = llm.model_info
    llm.eval(prompt_tokens(llm, L_PROMPT))
    snapshots = {}

    def record(model):
        pos = model._require_ctx().n_past() - 1
        if pos in (L_PROMPT, L_PROMPT + 100, L_PROMPT + INTERVAL - 1, L_PROMPT + INTERVAL,
                   L_PROMPT + INTERVAL + 1):
            snapshots[pos] = {
                "clusters": np.array(model.kv_stats()["clusters"]),
                "lists": {(il, h): model.kv_selection(il, h)
                          for il in range(info.n_layer) for h in range(info.n_head)},
            }

    decode_greedy(llm, INTERVAL + 2, record)
    stats = llm.kv_stats()
    yield info, snapshots, stats
    llm.close()


def test_prompt_and_window_cluster_counts(run):
    info, snaps, _ = run
    c0 = math.ceil((L_PROMPT - N_SINK) / PER_CLUSTER)
    expected = np.array([[0] * info.n_head_kv] * N_DENSE +
                        [[c0] * info.n_head_kv] * (info.n_layer - N_DENSE))
    np.testing.assert_array_equal(snaps[L_PROMPT]["clusters"], expected)
    np.testing.assert_array_equal(snaps[L_PROMPT + INTERVAL - 1]["clusters"], expected)
    # the 320 positions decoded since the prompt become ceil(320 / 80) = 4 more clusters
    after = expected + np.where(expected > 0, INTERVAL // PER_CLUSTER, 0)
    np.testing.assert_array_equal(snaps[L_PROMPT + INTERVAL]["clusters"], after)
    np.testing.assert_array_equal(snaps[L_PROMPT + INTERVAL + 1]["clusters"], after)


def test_lists_hold_sinks_clusters_and_tail_within_budget(run):
    info, snaps, _ = run
    for pos, snap in snaps.items():
        end = L_PROMPT if pos < L_PROMPT + INTERVAL else L_PROMPT + INTERVAL
        for (il, h), sel in snap["lists"].items():
            if il < N_DENSE:
                np.testing.assert_array_equal(sel, np.arange(pos + 1))
            else:
                check_list(sel, pos, end, BUDGET, end - N_SINK)


def test_query_heads_choose_their_own_clusters(run):
    # per query head selection: the heads of one KV group do not all read the same positions
    info, snaps, _ = run
    group = info.n_head // info.n_head_kv
    lists = snaps[L_PROMPT + 100]["lists"]
    differing = sum(not np.array_equal(lists[(il, g * group)], lists[(il, g * group + 1)])
                    for il in range(N_DENSE, info.n_layer) for g in range(info.n_head_kv))
    assert differing > (info.n_layer - N_DENSE) * info.n_head_kv // 2


def test_stats(run):
    info, snaps, stats = run
    c0 = math.ceil((L_PROMPT - N_SINK) / PER_CLUSTER)
    assert stats["n_clusters"] == (info.n_layer - N_DENSE) * info.n_head_kv * (c0 + 4)
    assert stats["t_cluster_ms"] > 0 and stats["t_select_ms"] > 0
    assert stats["n_steps"] == INTERVAL + 2
    assert stats["density"] < 0.5


# ---------------------------------------------------------------------------------------------
# Smaller runs
# ---------------------------------------------------------------------------------------------

SMALL_INTERVAL, SMALL_PER_CLUSTER = 50, 25


def small_llm(path, budget, **params):
    kv = {"n_sink": N_SINK, "recluster_interval": SMALL_INTERVAL,
          "tokens_per_cluster": SMALL_PER_CLUSTER, "n_dense_layers": N_DENSE}
    kv.update(params)
    return Llama(path, n_ctx=512, n_threads=N_THREADS, verbose=False, kv_policy="clusterkv",
                 kv_budget=budget, kv_policy_params=kv)


def test_budget_covering_the_context_gives_full_logits(default_model_path):
    full = Llama(default_model_path, n_ctx=512, n_threads=N_THREADS, verbose=False)
    ckv = small_llm(default_model_path, 512)
    try:
        tokens = prompt_tokens(full, 150)
        full.eval(tokens)
        ckv.eval(tokens)
        # the prompt is clustered at position 150, the decoded windows at 200 and 250
        ref = decode_greedy(full, 110)
        got = decode_greedy(ckv, 110)
        for step, (a, b) in enumerate(zip(ref, got)):
            assert np.array_equal(a, b), "logits differ at decode step %d" % step
        c0 = math.ceil((150 - N_SINK) / SMALL_PER_CLUSTER)
        assert ckv.kv_stats()["clusters"][N_DENSE][0] == c0 + 2 * 2
    finally:
        full.close()
        ckv.close()


def test_select_per_kv_head_shares_one_list_per_group(default_model_path):
    llm = small_llm(default_model_path, 120, select_per_kv_head=1)
    try:
        info = llm.model_info
        group = info.n_head // info.n_head_kv
        llm.eval(prompt_tokens(llm, 250))
        decode_greedy(llm, 10)
        pos = 259
        for il in range(N_DENSE, info.n_layer):
            for g in range(info.n_head_kv):
                first = llm.kv_selection(il, g * group)
                check_list(first, pos, 250, 120, 250 - N_SINK)
                for h in range(g * group + 1, (g + 1) * group):
                    np.testing.assert_array_equal(llm.kv_selection(il, h), first)
    finally:
        llm.close()


def test_truncate_drops_clusters_past_the_cut(default_model_path):
    llm = small_llm(default_model_path, 120)
    try:
        llm.eval(prompt_tokens(llm, 150))
        decode_greedy(llm, 52)                         # clusters [16, 150) and [150, 200)
        c0 = math.ceil((150 - N_SINK) / SMALL_PER_CLUSTER)
        assert llm.kv_stats()["clusters"][N_DENSE][1] == c0 + 2
        ctx = llm._require_ctx()
        ctx.truncate(175)                              # cuts into the second span
        assert llm.kv_stats()["clusters"][N_DENSE][1] == c0
        ctx.decode([llm.token_bos()])                  # position 175: tail [150, 175]
        check_list(llm.kv_selection(N_DENSE, 0), 175, 150, 120, 150 - N_SINK)
        ctx.truncate(100)                              # cuts into the prompt span
        assert llm.kv_stats()["clusters"][N_DENSE][1] == 0
        ctx.decode([llm.token_bos()])                  # position 100: re-clusters [16, 100)
        assert llm.kv_stats()["clusters"][N_DENSE][1] == math.ceil((100 - N_SINK) / 25)
    finally:
        llm.close()


@pytest.mark.parametrize("budget,params,needle", [
    (10, {}, "budget"),                                # < n_sink + 1
    (1024, {"tokens_per_cluster": 0}, "tokens_per_cluster"),
    (1024, {"kmeans_iters": 0}, "kmeans_iters"),
    (1024, {"select_per_kv_head": 3}, "select_per_kv_head"),
])
def test_invalid_parameters(default_model_path, budget, params, needle):
    with pytest.raises(ValueError, match=needle):
        Llama(default_model_path, n_ctx=1024, n_threads=N_THREADS, verbose=False,
              kv_policy="clusterkv", kv_budget=budget, kv_policy_params=params)
