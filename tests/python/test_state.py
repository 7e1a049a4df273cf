"""Saved states (ckv_context_state_*, Llama.save_state / load_state) and the prompt caches
(LlamaRAMCache, LlamaDiskCache).

Reference: the context that made the state. A state loaded anywhere must decode exactly as the
context that prefilled its tokens: bit-identical logits, step by step, under every KV policy
(prefill is dense, and loading rebuilds the policy as after a prefill), whatever the n_ctx. A
cached completion must equal an uncached one token for token while evaluating fewer tokens.
"""
import os
import pickle

import numpy as np
import pytest

from conftest import N_THREADS, model_folders, require_native

require_native()
from clusterkv_local import (InvalidArgumentError, Llama, LlamaDiskCache,  # noqa: E402
                             LlamaRAMCache, LlamaState, ModelFormatError)
from clusterkv_local._internals import kv_policies_available  # noqa: E402

TEXT = (b"Caches work because programs reuse data: a small fast memory in front of a large slow "
        b"one pays off when accesses repeat. Line 17 of the ledger says the harbor opened in "
        b"1893, and the copper mine closed in 1921. ") * 14
# Sparse at this prompt length (about 600 tokens): the budgets are well below the context.
POLICIES = {
    "full": (None, None),
    "clusterkv": (256, {"recluster_interval": 64, "tokens_per_cluster": 32}),
    "quest": (128, {"page_size": 16}),
    "streaming": (128, None),
}


def _open(path, n_ctx=1024, policy="full", budget=None, params=None, **kw):
    return Llama(path, n_ctx=n_ctx, n_threads=N_THREADS, verbose=False, kv_policy=policy,
                 kv_budget=budget, kv_policy_params=params, **kw)


def _step_rows(llm, tokens):
    """Logits after each of tokens, fed one decode step at a time."""
    rows = []
    for t in tokens:
        llm.eval([t])
        rows.append(np.array(llm._ctx.logits(-1)))
    return np.stack(rows)


@pytest.fixture(scope="module")
def prompt(default_model_path):
    with _open(default_model_path) as llm:
        tokens = llm.tokenize(TEXT)
    assert 500 < len(tokens) < 1024 - 40
    return tokens[:-24], tokens[-24:]   # prefilled, then decode steps


def test_round_trip_is_bit_exact_in_a_larger_context(default_model_path, prompt):
    context, steps = prompt
    with _open(default_model_path) as a, _open(default_model_path, n_ctx=2048) as b:
        a.eval(context)
        state = a.save_state()
        assert state.n_tokens == len(context) and state.scores.shape == (1, a.n_vocab())
        assert list(state.input_ids) == context
        want = _step_rows(a, steps)
        b.load_state(state)
        assert b.n_tokens == len(context) and list(b._input_ids) == context
        assert np.array_equal(b._last_logits(), state.scores[0])
        assert np.array_equal(b._ctx.logits(-1), state.scores[0])   # the native row too
        assert np.array_equal(_step_rows(b, steps), want)


@pytest.mark.skipif(not kv_policies_available(), reason="built without the KV-policy calls")
@pytest.mark.parametrize("policy", ["clusterkv", "quest", "streaming"])
def test_loaded_state_decodes_as_its_prefill_under_each_policy(default_model_path, prompt, policy):
    """A state saved by a full context after prefill, loaded into a context of the policy,
    decodes exactly as that policy's context that prefilled the tokens itself. A state saved
    mid-decode by the policy's context (rows of steps that attended sparsely) loads as if those
    rows had been prefilled: as a full context holding them switched to the policy; for the
    policies whose bookkeeping is a function of the rows (quest's page bounds, streaming's
    window) also exactly as the saving context goes on."""
    context, steps = prompt
    budget, params = POLICIES[policy]
    with _open(default_model_path) as full:
        full.eval(context)
        state = full.save_state()
    with _open(default_model_path, 1024, policy, budget, params) as native, \
            _open(default_model_path, 1024, policy, budget, params) as loaded:
        native.eval(context)
        want = _step_rows(native, steps)
        loaded.eval(steps + context[:400])   # policy state of other rows, replaced by the load
        _step_rows(loaded, steps[:3])
        loaded.load_state(state)
        got = _step_rows(loaded, steps)
        assert np.array_equal(got, want)
        assert native.kv_stats()["density"] < 0.8   # the policy did leave positions out
        mid = native.save_state()   # after the decode steps
        more = steps[:6]
        with _open(default_model_path, 1024, policy, budget, params) as again, \
                _open(default_model_path) as switched:
            again.load_state(mid)
            switched.load_state(mid)
            switched.set_kv_policy(policy, budget, params)
            rows = _step_rows(again, more)
            assert np.array_equal(rows, _step_rows(switched, more))
            if policy != "clusterkv":   # clusterkv re-clusters all rows at once after a load
                assert np.array_equal(rows, _step_rows(native, more))


def test_kv_types_convert_and_round_trip(default_model_path, prompt):
    """f16 rows load into an f32 cache exactly (every f16 is an f32), and back unchanged."""
    context, steps = prompt
    with _open(default_model_path) as f16, _open(default_model_path, type_k="f32", type_v="f32") as f32, \
            _open(default_model_path, n_ctx=800) as again:
        f16.eval(context)
        state = f16.save_state()
        f32.load_state(state)
        wide = f32.save_state()
        assert wide.llama_state_size == 2 * state.llama_state_size - 48 - 4 * f16.n_vocab()
        again.load_state(wide)
        assert again.save_state().llama_state == state.llama_state
        want = _step_rows(f16, steps[:4])
        assert np.array_equal(_step_rows(again, steps[:4]), want)
        # the f32 cache holds the same rows; only the new steps' rows are kept wider there, a
        # small difference (a wrong conversion would give another distribution altogether)
        wider = _step_rows(f32, steps[:4])
        assert np.abs(wider - want).mean() < 0.2
        assert np.sum(np.argmax(wider, axis=1) == np.argmax(want, axis=1)) >= 3


def test_logits_all_scores_travel(llm_all_logits):
    llm = llm_all_logits
    llm.reset()
    tokens = llm.tokenize(b"Saving and loading keep every row of logits.")
    llm.eval(tokens)
    want = np.array(llm.scores[:len(tokens)])
    state = llm.save_state()
    assert state.scores.shape == (len(tokens), llm.n_vocab())
    llm.reset()
    llm.eval(llm.tokenize(b"Something else entirely, to overwrite the rows."))
    llm.load_state(state)
    assert np.array_equal(llm.scores[:len(tokens)], want)


def test_state_pickles(llm):
    llm.reset()
    llm.eval(llm.tokenize(b"A state is plain data."))
    state = llm.save_state()
    copy = pickle.loads(pickle.dumps(state))
    assert copy.llama_state == state.llama_state and np.array_equal(copy.scores, state.scores)
    llm.eval(llm.tokenize(b" More text after it.", add_bos=False))
    llm.load_state(copy)
    assert llm.n_tokens == state.n_tokens


def test_a_state_after_a_lazy_trim_holds_only_the_kept_tokens(llm):
    llm.reset()
    tokens = llm.tokenize(b"One two three four five six seven eight nine ten")
    llm.eval(tokens)
    llm.n_tokens = 4        # what generate() does before it evaluates the rest
    state = llm.save_state()
    assert state.n_tokens == 4 and state.scores.shape == (0, llm.n_vocab())
    assert llm._ctx.n_past() == 4


def _other_model_path():
    for folder in model_folders():
        path = os.path.join(folder, "gemma-3-270m-q4_k_m.gguf")
        if os.path.exists(path):
            return path
    return None


def test_bad_states_raise_and_change_nothing(default_model_path, prompt):
    context, _ = prompt
    with _open(default_model_path) as llm, _open(default_model_path, n_ctx=256) as small:
        llm.eval(context[:100])
        good = llm.save_state()
        before = llm._ctx.logits(-1).copy()
        blob = good.llama_state
        for bad, err in ((blob[:-1], ModelFormatError), (b"XXXXXXXX" + blob[8:], ModelFormatError),
                         (blob[:8] + b"\x07" + blob[9:], ModelFormatError), (b"", ModelFormatError),
                         (blob[:16] + bytes([blob[16] ^ 1]) + blob[17:], InvalidArgumentError)):
            with pytest.raises(err):
                llm._ctx.state_load(bad)
            assert llm._ctx.n_past() == 100 and np.array_equal(llm._ctx.logits(-1), before)
        small.eval(context[:200])
        big = small.save_state()
        llm.eval(context[100:300])
        with pytest.raises(InvalidArgumentError, match="positions; the context holds 256"):
            small._ctx.state_load(llm.save_state().llama_state)
        with pytest.raises(ValueError, match="context window is 256"):
            small.load_state(llm.save_state())
        assert small.n_tokens == 200 and small.save_state().llama_state == big.llama_state
        with pytest.raises(TypeError):
            llm.load_state(blob)
        with pytest.raises(ValueError, match="malformed LlamaState"):
            llm.load_state(LlamaState(good.input_ids[:5], good.scores, good.n_tokens, blob,
                                      len(blob), 0))


@pytest.mark.skipif(not kv_policies_available(), reason="built without the KV-policy calls")
def test_h2o_refuses_a_state(default_model_path):
    with _open(default_model_path) as full, _open(default_model_path, policy="h2o",
                                                   budget=64) as h2o:
        full.eval(full.tokenize(b"Heavy hitters need the prefill's attention weights."))
        with pytest.raises(InvalidArgumentError, match="h2o"):
            h2o.load_state(full.save_state())
        full.reset()
        h2o.load_state(full.save_state())    # an empty state is fine
        assert h2o.n_tokens == 0


def test_a_state_of_another_model_is_refused(default_model_path):
    other = _other_model_path()
    if other is None:
        pytest.skip("gemma-3-270m is not in the model cache")
    with _open(default_model_path) as smol, _open(other, n_ctx=256) as gemma:
        gemma.eval(gemma.tokenize(b"Another model's rows."))
        smol.eval(smol.tokenize(b"Our own rows."))
        with pytest.raises(ValueError, match="another model"):
            smol.load_state(gemma.save_state())        # told by its vocabulary size
        with pytest.raises(InvalidArgumentError, match="another model"):
            smol._ctx.state_load(gemma.save_state().llama_state)   # by the native check
        assert smol.n_tokens == smol._ctx.n_past() > 0


def test_sequences_save_and_load_separately(default_model_path):
    """Per sequence: a batch step's row i is sequence i's logits, saved with it."""
    llm = _open(default_model_path, n_ctx=256, n_seq_max=2)
    one = _open(default_model_path, n_ctx=256)
    try:
        ctx = llm._ctx
        a, b = llm.tokenize(b"The first sequence"), llm.tokenize(b"A second, longer sequence here")
        ctx.decode_seq(0, a)
        ctx.decode_seq(1, b)
        ctx.decode_batch([a[-1], b[-1]], [0, 1])
        row1 = np.array(ctx.logits(1))
        state1 = ctx.state_save(1)
        one._ctx.state_load(state1)
        assert one._ctx.n_past() == len(b) + 1
        assert np.array_equal(one._ctx.logits(-1), row1)
        one._ctx.decode([7])
        ctx.decode_seq(1, [7])
        assert np.array_equal(one._ctx.logits(-1), ctx.logits(-1))
        # loaded into sequence 0 of the batch context: sequence 1 keeps its own cache
        ctx.state_load(state1, 0)
        assert ctx.n_past_seq(0) == len(b) + 1 and ctx.n_past_seq(1) == len(b) + 2
        with pytest.raises(InvalidArgumentError):
            ctx.state_save(2)
    finally:
        llm.close()
        one.close()


# --- the prompt caches -----------------------------------------------------------------------

QUESTION = "Q: What did line 17 of the ledger say? A:"


def _complete(llm, prompt):
    return llm(prompt, max_tokens=12, temperature=0)["choices"][0]["text"]


@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_cache_restores_the_longest_prefix(default_model_path, tmp_path, kind):
    doc, other = TEXT.decode(), "Q: When did the mine close? A:"
    with _open(default_model_path) as plain, _open(default_model_path) as plain2:
        want = [_complete(plain, doc + QUESTION), _complete(plain2, doc + other)]
    cache = LlamaRAMCache() if kind == "ram" else LlamaDiskCache(str(tmp_path / "states"))
    with _open(default_model_path) as first:
        first.set_cache(cache)
        assert _complete(first, doc + QUESTION) == want[0]
    # a new Llama (a restarted app): the document comes from the cache, only the rest is run
    with _open(default_model_path) as second:
        second.set_cache(cache)
        second.reset_timings()
        assert _complete(second, doc + other) == want[1]
        n_doc = len(second.tokenize(doc.encode()))
        assert second.timings()["prompt_tokens"] < 40 < n_doc
    if kind == "disk":
        files = os.listdir(tmp_path / "states")
        assert len(files) == 2 and all(f.endswith(".npz") for f in files)


def test_ram_cache_evicts_the_least_recently_used(llm):
    llm.reset()
    states = []
    for text in (b"alpha beta gamma", b"delta epsilon zeta", b"eta theta iota"):
        llm.reset()
        llm.eval(llm.tokenize(text))
        states.append((llm._input_ids.tolist(), llm.save_state()))
    size = [s.nbytes() for _, s in states]
    cache = LlamaRAMCache(capacity_bytes=max(size[0] + size[1], size[0] + size[2]))
    cache[states[0][0]] = states[0][1]
    cache[states[1][0]] = states[1][1]
    assert cache[states[0][0] + [5]] is states[0][1]   # now the most recent
    cache[states[2][0]] = states[2][1]  # over capacity: states[1] goes
    kept = set(cache.cache_state)
    assert kept == {tuple(states[0][0]), tuple(states[2][0])}
    assert cache.cache_size <= cache.capacity_bytes
    with pytest.raises(KeyError):
        cache[[99999]]


def test_disk_cache_evicts_and_skips_foreign_files(llm, tmp_path):
    folder = tmp_path / "c"
    cache = LlamaDiskCache(str(folder), capacity_bytes=1)
    llm.reset()
    llm.eval(llm.tokenize(b"disk states"))
    key = llm._input_ids.tolist()
    cache[key] = llm.save_state()
    assert os.listdir(folder) == []     # larger than the capacity: dropped at once
    cache = LlamaDiskCache(str(folder))
    (folder / "junk.npz").write_bytes(b"not an npz")
    (folder / "notes.txt").write_text("ignored")
    cache[key] = llm.save_state()
    got = cache[key + [5, 6]]
    assert got.llama_state == llm.save_state().llama_state and got.n_tokens == len(key)
    assert key in cache and [key[0] + 1] not in cache
    with pytest.raises(ValueError):
        LlamaDiskCache(str(folder), capacity_bytes=-1)


def test_set_cache_takes_only_caches(llm):
    with pytest.raises(TypeError):
        llm.set_cache({})
    llm.set_cache(None)
    assert llm.cache is None
