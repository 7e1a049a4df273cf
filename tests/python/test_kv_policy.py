"""KV policies (full, streaming, quest, h2o) through the raw C API on the default model.

A ~1100-token essay prompt is prefilled densely, then 40 single-token decode steps (the
essay's next tokens, the same for every policy) run under the policy. What each query head read
at a step comes back from ckv_context_kv_selection; the checks are the invariants of
native/src/kvpolicy.h (distinct positions <= pos, at most budget (+ clusterkv's tail), sinks, the current position and
the recent window present, dense layers read everything), equality with `full` when the budget
covers the context, h2o never re-admitting an evicted position, and the parameter validation
messages. Quest's ranking is checked against a brute-force bound in tests/native/test-kvpolicy.c
(the keys are not exposed through the API).
"""
import glob
import os

import numpy as np
import pytest

from conftest import N_THREADS, require_native

_ffi = require_native()
ffi, lib = _ffi.ffi, _ffi.lib

ESSAYS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "pg_essays")
N_PROMPT, N_STEPS, BUDGET, N_SINK, N_DENSE = 1100, 40, 256, 16, 2
POLICIES = {"full": lib.CKV_KV_POLICY_FULL, "streaming": lib.CKV_KV_POLICY_STREAMING,
            "quest": lib.CKV_KV_POLICY_QUEST, "h2o": lib.CKV_KV_POLICY_H2O}


def _check(status, what):
    assert status == 0, "%s: %s" % (what, ffi.string(lib.ckv_last_error()).decode())


def _essay_text() -> str:
    files = sorted(glob.glob(os.path.join(ESSAYS, "*.txt")))
    if files:
        return "\n\n".join(open(f, encoding="utf-8").read() for f in files[:4])
    rng = np.random.default_rng(7)  # outside the source checkout: deterministic filler prose
    words = ("the of a to in is that for it as with was on be by this are from at an which "
             "startup founders money users idea work people company growth time product").split()
    return " ".join(rng.choice(words, size=6000))


@pytest.fixture(scope="module")
def model(default_model_path):
    params = ffi.new("struct ckv_model_params *")
    lib.ckv_model_default_params(params)
    out = ffi.new("ckv_model **")
    _check(lib.ckv_model_load(default_model_path.encode(), params, out), "ckv_model_load")
    yield out[0]
    lib.ckv_model_free(out[0])


@pytest.fixture(scope="module")
def tokens(model):
    text = _essay_text().encode()
    cap = len(text) + 16
    buf, n = ffi.new("ckv_token[]", cap), ffi.new("int32_t *")
    _check(lib.ckv_tokenize(model, text, len(text), buf, cap, True, False, n), "ckv_tokenize")
    assert n[0] >= N_PROMPT + N_STEPS
    return list(buf[0:N_PROMPT + N_STEPS])


def make_context(model, n_ctx=2048, **kv):
    params = ffi.new("struct ckv_context_params *")
    lib.ckv_context_default_params(params)
    params.n_ctx, params.n_threads = n_ctx, N_THREADS
    for key, value in kv.items():
        setattr(params.kv_policy, key, value)
    out = ffi.new("ckv_context **")
    status = lib.ckv_context_init(model, params, out)
    return status, (ffi.gc(out[0], lib.ckv_context_free) if status == 0 else None)


def selection(ctx, il, h):
    n = ffi.new("int32_t *")
    status = lib.ckv_context_kv_selection(ctx, il, h, ffi.NULL, 0, n)
    assert status in (0, lib.CKV_ERR_BUFFER_TOO_SMALL)
    buf = ffi.new("int32_t[]", max(n[0], 1))
    _check(lib.ckv_context_kv_selection(ctx, il, h, buf, n[0], n), "ckv_context_kv_selection")
    return np.frombuffer(ffi.buffer(buf, 4 * n[0]), dtype=np.int32).copy()


def model_shape(model):
    info = ffi.new("struct ckv_model_info *")
    lib.ckv_model_get_info(model, info)
    return info.n_layer, info.n_head


class Run:
    """Prefill N_PROMPT tokens, then N_STEPS decode steps; keeps logits and some selections."""

    def __init__(self, model, tokens, n_prompt=N_PROMPT, n_steps=N_STEPS, n_ctx=2048, watch=(), **kv):
        status, self.ctx = make_context(model, n_ctx=n_ctx, **kv)
        _check(status, "ckv_context_init")
        self.n_layer, self.n_head = model_shape(model)
        prompt = ffi.new("ckv_token[]", tokens[:n_prompt])
        _check(lib.ckv_decode(self.ctx, prompt, n_prompt, False), "prefill")
        n_vocab = lib.ckv_vocab_n_tokens(model)
        self.logits, self.watched, self.every = [], {key: [] for key in watch}, {}
        for step in range(n_steps):
            tok = ffi.new("ckv_token[]", [tokens[n_prompt + step]])
            _check(lib.ckv_decode(self.ctx, tok, 1, False), "decode step %d" % step)
            self.logits.append(np.frombuffer(ffi.buffer(lib.ckv_get_logits(self.ctx, -1), 4 * n_vocab),
                                             dtype=np.float32).copy())
            for il, h in self.watched:
                self.watched[(il, h)].append(selection(self.ctx, il, h))
            if step in (0, n_steps // 2, n_steps - 1):
                self.every[n_prompt + step] = {(il, h): selection(self.ctx, il, h)
                                               for il in range(self.n_layer) for h in range(self.n_head)}


WATCH = ((2, 0), (5, 4), (29, 8))


@pytest.fixture(scope="module")
def runs(model, tokens):
    return {name: Run(model, tokens, watch=WATCH, policy=pid, budget=BUDGET, n_sink=N_SINK,
                      n_dense_layers=N_DENSE)
            for name, pid in POLICIES.items()}


# --- invariants --------------------------------------------------------------------------------

def _contiguous_tail(sel) -> int:
    """Length of the run of consecutive positions ending at sel[-1]."""
    breaks = np.nonzero(np.diff(sel) != 1)[0]
    return len(sel) - (breaks[-1] + 1 if len(breaks) else 0)


@pytest.mark.parametrize("name", list(POLICIES))
def test_lists_are_distinct_causal_and_within_budget(runs, name):
    run = runs[name]
    for pos, lists in run.every.items():
        for (il, h), sel in lists.items():
            assert np.all(np.diff(sel) > 0), "positions are read in ascending order, no repeats"
            assert sel[0] >= 0 and sel[-1] == pos, "the current position is attended"
            if il < N_DENSE or name == "full":
                np.testing.assert_array_equal(sel, np.arange(pos + 1))
            else:
                # clusterkv attends its unclustered recent tail (< recluster_interval positions,
                # contiguous up to pos) on top of the budget
                tail = _contiguous_tail(sel) if name == "clusterkv" else 0
                assert len(sel) - tail <= BUDGET
                np.testing.assert_array_equal(sel[:N_SINK], np.arange(N_SINK), "sinks present")


@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_recent_window_present(runs, name):
    n_recent = BUDGET - N_SINK if name == "streaming" else BUDGET // 2  # h2o: recent_ratio 0.5
    for pos, lists in runs[name].every.items():
        for (il, h), sel in lists.items():
            if il >= N_DENSE:
                assert set(range(pos - n_recent + 1, pos + 1)) <= set(sel.tolist())


def test_streaming_is_sinks_plus_recent(runs):
    for pos, lists in runs["streaming"].every.items():
        expect = np.concatenate([np.arange(N_SINK), np.arange(pos + 1 - (BUDGET - N_SINK), pos + 1)])
        for (il, h), sel in lists.items():
            if il >= N_DENSE:
                np.testing.assert_array_equal(sel, expect)


def test_quest_reads_whole_pages(runs):
    # sinks, the current page, then whole 16-position pages; only one page may be cut short
    for pos, lists in runs["quest"].every.items():
        for (il, h), sel in lists.items():
            if il < N_DENSE:
                continue
            assert len(sel) == BUDGET
            rest = sel[(sel >= N_SINK) & (sel < pos // 16 * 16)]
            pages, counts = np.unique(rest // 16, return_counts=True)
            assert np.sum(counts < 16) <= 1
            assert set(range(pos // 16 * 16, pos + 1)) <= set(sel.tolist())


def test_quest_selection_differs_between_heads(runs):
    lists = runs["quest"].every[N_PROMPT + N_STEPS - 1]
    layer = [tuple(lists[(10, h)]) for h in range(runs["quest"].n_head)]
    assert len(set(layer)) > 1, "per-query-head ranking"


def test_h2o_never_readmits_an_evicted_position(runs):
    for key, steps in runs["h2o"].watched.items():
        evicted = set()
        for step, sel in enumerate(steps):
            now = set(sel.tolist())
            assert not (now & evicted), "layer %d head %d step %d" % (key + (step,))
            if step:
                evicted |= set(steps[step - 1].tolist()) - now
            assert len(sel) == BUDGET
        assert evicted, "h2o evicts one position per step once full"


def test_policies_attend_less_and_change_logits(runs):
    for name in ("streaming", "quest", "h2o"):
        assert len(runs[name].every[N_PROMPT][(10, 0)]) == BUDGET
        diff = np.max(np.abs(runs[name].logits[-1] - runs["full"].logits[-1]))
        assert diff > 0, "%s at budget %d must differ from full at 1100 positions" % (name, BUDGET)


def test_stats(runs):
    stats = ffi.new("struct ckv_kv_stats *")
    n_layer, n_head = runs["full"].n_layer, runs["full"].n_head
    for name in POLICIES:
        lib.ckv_context_get_kv_stats(runs[name].ctx, stats)
        assert stats.n_steps == N_STEPS
        cached = sum((N_PROMPT + s + 1) for s in range(N_STEPS)) * (n_layer - N_DENSE) * n_head
        assert stats.n_cached == cached
        expect = cached if name == "full" else BUDGET * N_STEPS * (n_layer - N_DENSE) * n_head
        assert stats.n_attended == expect
        assert stats.n_clusters == 0
        assert (stats.t_select_ms > 0) == (name != "full")
    lib.ckv_context_reset_kv_stats(runs["full"].ctx)
    lib.ckv_context_get_kv_stats(runs["full"].ctx, stats)
    assert stats.n_steps == 0 and stats.n_attended == 0


# --- budget >= context: identical to full --------------------------------------------------------

@pytest.mark.parametrize("name", ["streaming", "quest", "h2o"])
def test_budget_covering_the_context_matches_full(model, tokens, name):
    kw = dict(n_prompt=300, n_steps=12, n_ctx=512)
    full = Run(model, tokens, **kw)
    other = Run(model, tokens, policy=POLICIES[name], budget=512, **kw)
    for a, b in zip(full.logits, other.logits):
        np.testing.assert_array_equal(a, b)


# --- dense layers, windows, errors -----------------------------------------------------------------

def test_selection_api_errors(model, tokens):
    status, ctx = make_context(model, n_ctx=64, policy=POLICIES["streaming"], budget=32)
    _check(status, "init")
    n = ffi.new("int32_t *")
    assert lib.ckv_context_kv_selection(ctx, 0, 0, ffi.NULL, 0, n) == lib.CKV_ERR_INVALID_ARG
    prompt = ffi.new("ckv_token[]", tokens[:10])
    _check(lib.ckv_decode(ctx, prompt, 10, False), "prefill")
    n_layer, n_head = model_shape(model)
    assert lib.ckv_context_kv_selection(ctx, n_layer, 0, ffi.NULL, 0, n) == lib.CKV_ERR_INVALID_ARG
    assert lib.ckv_context_kv_selection(ctx, 0, n_head, ffi.NULL, 0, n) == lib.CKV_ERR_INVALID_ARG
    assert lib.ckv_context_kv_selection(ctx, 3, 1, ffi.NULL, 0, n) == lib.CKV_ERR_BUFFER_TOO_SMALL
    assert n[0] == 10, "a prefill chunk attends every causal position"
    np.testing.assert_array_equal(selection(ctx, 3, 1), np.arange(10))
    out = ffi.new("int32_t *")
    assert lib.ckv_context_kv_n_clusters(ctx, 5, 0, out) == 0 and out[0] == 0
    assert lib.ckv_context_kv_n_clusters(ctx, -1, 0, out) == lib.CKV_ERR_INVALID_ARG
    _check(lib.ckv_context_truncate(ctx, 5), "truncate")
    assert lib.ckv_context_kv_selection(ctx, 0, 0, ffi.NULL, 0, n) == lib.CKV_ERR_INVALID_ARG


@pytest.mark.parametrize("kv, needle", [
    (dict(policy=7), "kv_policy.policy"),
    (dict(policy=-1), "kv_policy.policy"),
    (dict(policy=1, budget=16, n_sink=16), "budget"),
    (dict(policy=1, budget=0), "kv_policy.budget"),
    (dict(n_sink=-1), "kv_policy.n_sink"),
    (dict(n_dense_layers=-1), "kv_policy.n_dense_layers"),
    (dict(policy=1, budget=64, n_dense_layers=31), "kv_policy.n_dense_layers"),   # full ignores it
    (dict(page_size=0), "kv_policy.page_size"),
    (dict(policy=2, budget=20, n_sink=16, page_size=16), "page_size"),
    (dict(recent_ratio=1.5), "kv_policy.recent_ratio"),
    (dict(recent_ratio=-0.1), "kv_policy.recent_ratio"),
    (dict(recent_ratio=float("nan")), "kv_policy.recent_ratio"),
    (dict(recluster_interval=0), "recluster_interval"),
    (dict(tokens_per_cluster=0), "tokens_per_cluster"),
    (dict(kmeans_iters=0), "kmeans_iters"),
    (dict(select_per_kv_head=2), "select_per_kv_head"),
    (dict(kmeans_init=2), "kv_policy.kmeans_init"),
    (dict(kmeans_init=-1), "kv_policy.kmeans_init"),
])
def test_parameter_validation(model, kv, needle):
    status, ctx = make_context(model, n_ctx=64, **kv)
    assert status == lib.CKV_ERR_INVALID_ARG and ctx is None
    assert needle in ffi.string(lib.ckv_last_error()).decode()


def test_defaults(model):
    params = ffi.new("struct ckv_context_params *")
    lib.ckv_context_default_params(params)
    k = params.kv_policy
    assert (k.policy, k.budget, k.n_sink, k.n_dense_layers, k.page_size) == (0, 1024, 16, 2, 16)
    assert (k.recluster_interval, k.tokens_per_cluster, k.kmeans_iters) == (320, 80, 8)
    assert k.select_per_kv_head == 0 and k.recent_ratio == 0.5 and k.kmeans_init == 0


def test_gemma3_sliding_window_layers_stay_windowed(tokens):
    from clusterkv_local import models

    if not models.is_cached("gemma-3-270m"):
        pytest.skip("gemma-3-270m is not in the model cache")
    params = ffi.new("struct ckv_model_params *")
    lib.ckv_model_default_params(params)
    out = ffi.new("ckv_model **")
    _check(lib.ckv_model_load(models.model_path("gemma-3-270m", fetch=False).encode(), params, out),
           "load gemma")
    gemma = ffi.gc(out[0], lib.ckv_model_free)
    text = _essay_text().encode()
    buf, n = ffi.new("ckv_token[]", len(text)), ffi.new("int32_t *")
    _check(lib.ckv_tokenize(gemma, text, len(text), buf, len(text), True, False, n), "tokenize")
    run = Run(gemma, list(buf[0:620]), n_prompt=600, n_steps=2, n_ctx=1024,
              policy=POLICIES["streaming"], budget=64, n_dense_layers=1)
    n_layer, n_head = model_shape(gemma)
    pos = 601
    for il in range(n_layer):
        sel = run.every[pos][(il, 0)]
        if (il + 1) % 6 != 0:  # sliding-window layer (512 positions): never compressed
            np.testing.assert_array_equal(sel, np.arange(pos - 511, pos + 1))
        elif il >= 1:
            assert len(sel) == 64 and sel[-1] == pos
