"""The native sampler (native/src/sampler.c) through the raw cffi binding.

A numpy reference of llama.cpp's chain (penalties -> top_k -> top_p -> min_p -> temperature ->
draw) gives the candidate set and probabilities; the tests check greedy picks and penalties
exactly, the support of top_k / top_p / min_p and the draw frequencies over many seeded
draws, the exact token sequence a seed gives (a Python xoshiro256** predicts it), and that
bad parameters are refused. Only the model's vocabulary size is used (vocab_only load).
"""
import math
import os

import numpy as np
import pytest
from conftest import model_folders

from clusterkv_local._ffi import ffi, lib

MODEL_NAME = "smollm2-135m-instruct"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_model(name: str, filename: str):
    """The registry's cached copy if the models module works, else $CLUSTERKV_MODELS_DIR or
    the other model folders of conftest.model_folders(); None when the file is nowhere."""
    try:
        from clusterkv_local.models import model_path
        path = model_path(name)
        if path and os.path.isfile(path):
            return str(path)
    except Exception:  # the models module is optional here; fall back to plain folders
        pass
    for folder in model_folders():
        if folder and os.path.isfile(os.path.join(folder, filename)):
            return os.path.join(folder, filename)
    return None


@pytest.fixture(scope="module")
def model():
    path = find_model(MODEL_NAME, MODEL_FILE)
    if path is None:
        pytest.skip("%s not found" % MODEL_FILE)
    params = ffi.new("struct ckv_model_params *")
    lib.ckv_model_default_params(params)
    params.vocab_only = True
    out = ffi.new("ckv_model **")
    status = lib.ckv_model_load(path.encode(), params, out)
    assert status == 0, ffi.string(lib.ckv_last_error()).decode()
    yield out[0]
    lib.ckv_model_free(out[0])


@pytest.fixture(scope="module")
def n_vocab(model):
    return lib.ckv_vocab_n_tokens(model)


def make_params(**kw):
    p = ffi.new("struct ckv_sampler_params *")
    lib.ckv_sampler_default_params(p)
    for key, value in kw.items():
        setattr(p, key, value)
    return p


def make_sampler(model, **kw):
    out = ffi.new("ckv_sampler **")
    status = lib.ckv_sampler_init(model, make_params(**kw), out)
    assert status == 0, ffi.string(lib.ckv_last_error()).decode()
    return ffi.gc(out[0], lib.ckv_sampler_free)


def sample(sampler, logits: np.ndarray) -> int:
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    tok = ffi.new("ckv_token *")
    status = lib.ckv_sampler_sample(sampler, ffi.cast("const float *", logits.ctypes.data),
                                    logits.size, tok)
    assert status == 0, ffi.string(lib.ckv_last_error()).decode()
    return tok[0]


# --- numpy reference of the chain -----------------------------------------------------------

def ref_penalties(logits, history, repeat=1.0, freq=0.0, presence=0.0, last_n=64):
    out = logits.astype(np.float32).copy()
    window = history[-last_n:] if last_n > 0 else []
    ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
    for t, c in zip(ids, counts):
        l = out[t]
        l = l * np.float32(repeat) if l <= 0 else l / np.float32(repeat)
        out[t] = l - (np.float32(c) * np.float32(freq) + np.float32(presence))
    return out


def ref_candidates(logits, top_k=40, top_p=0.95, min_p=0.05, temperature=0.8):
    """Token ids and draw probabilities the chain leaves (logits already penalised)."""
    order = np.lexsort((np.arange(logits.size), -logits.astype(np.float64)))  # desc, id asc
    ids = order[:top_k] if 0 < top_k < logits.size else order
    l = logits[ids].astype(np.float64)
    if top_p < 1.0:
        p = np.exp(l - l.max())
        p /= p.sum()
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        ids, l = ids[:keep], l[:keep]
    if min_p > 0.0:
        mask = l >= l.max() + math.log(min_p)
        ids, l = ids[mask], l[mask]
    p = np.exp((l - l.max()) / temperature)
    return ids, p / p.sum()


def check_draws(sampler, logits, ref_ids, ref_p, n_draws):
    draws = np.array([sample(sampler, logits) for _ in range(n_draws)])
    assert set(draws.tolist()) <= set(ref_ids.tolist()), "a token outside the reference support"
    freq = np.array([(draws == t).sum() for t in ref_ids]) / n_draws
    sigma = np.sqrt(ref_p * (1 - ref_p) / n_draws)
    assert np.all(np.abs(freq - ref_p) <= 5 * sigma + 2e-3), (freq, ref_p)
    return draws


# --- tests ----------------------------------------------------------------------------------

def test_default_params():
    p = make_params()
    assert p.temperature == pytest.approx(0.8) and p.top_k == 40
    assert p.top_p == pytest.approx(0.95) and p.min_p == pytest.approx(0.05)
    assert p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
    assert p.penalty_last_n == 64


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_greedy_is_argmax_lowest_id_on_ties(model, n_vocab, temperature):
    rng = np.random.default_rng(1)
    s = make_sampler(model, temperature=temperature)
    for _ in range(5):
        logits = rng.normal(size=n_vocab).astype(np.float32)
        assert sample(s, logits) == int(np.argmax(logits))
    logits[[777, 123, 40000]] = logits.max() + 1.0
    assert sample(s, logits) == 123


def test_top_k_1_is_argmax_at_any_temperature(model, n_vocab):
    rng = np.random.default_rng(2)
    s = make_sampler(model, temperature=5.0, top_k=1, seed=9)
    for _ in range(10):
        logits = rng.normal(size=n_vocab).astype(np.float32)
        assert sample(s, logits) == int(np.argmax(logits))


def test_penalties_move_the_argmax_exactly(model, n_vocab):
    base = np.full(n_vocab, -5.0, dtype=np.float32)
    a, b = 10, 20
    cases = [  # (logit a, logit b, params, history, expected)
        (2.0, 1.9, dict(repeat_penalty=1.1), [a], b),              # 2.0/1.1 = 1.818 < 1.9
        (2.0, 1.9, dict(repeat_penalty=1.04), [a], a),             # 1.923 > 1.9
        (-1.0, -1.05, dict(repeat_penalty=1.1), [a], b),           # -1.1 < -1.05
        (2.0, 1.5, dict(presence_penalty=0.6), [a], b),            # 1.4 < 1.5
        (2.0, 1.5, dict(frequency_penalty=0.2), [a, a], a),        # 1.6 > 1.5
        (2.0, 1.5, dict(frequency_penalty=0.2), [a, a, a], b),     # 1.4 < 1.5
        (2.0, 1.9, dict(repeat_penalty=1.1, penalty_last_n=2), [a, 7, 8], a),  # a left the window
        (2.0, 1.9, dict(repeat_penalty=1.1, penalty_last_n=0), [a], a),        # penalties off
    ]
    for la, lb, params, history, expected in cases:
        logits = base.copy()
        logits[a], logits[b] = la, lb
        s = make_sampler(model, temperature=0.0, **params)
        for t in history:
            lib.ckv_sampler_accept(s, t)
        assert sample(s, logits) == expected, (la, lb, params, history)


def test_penalties_match_reference_on_random_rows(model, n_vocab):
    rng = np.random.default_rng(3)
    params = dict(repeat_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.7, penalty_last_n=16)
    s = make_sampler(model, temperature=0.0, **params)
    history = []
    for step in range(40):
        logits = rng.normal(scale=2.0, size=n_vocab).astype(np.float32)
        top = np.argsort(-logits)[:8]  # penalise near the top so the argmax often moves
        ref = ref_penalties(logits, history, 1.3, 0.4, 0.7, 16)
        assert sample(s, logits) == int(np.argmax(ref)), step
        t = int(rng.choice(top))
        history.append(t)
        lib.ckv_sampler_accept(s, t)
    lib.ckv_sampler_reset(s, 0)  # history cleared: plain arg-max again
    assert sample(s, logits) == int(np.argmax(logits))


def structured_logits(n_vocab, seed, scale=1.5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=n_vocab).astype(np.float32)
    logits[rng.choice(n_vocab, 12, replace=False)] += np.linspace(8.0, 5.0, 12).astype(np.float32)
    return logits


@pytest.mark.parametrize("chain", [
    dict(top_k=5, top_p=1.0, min_p=0.0, temperature=1.0),
    dict(top_k=40, top_p=0.9, min_p=0.0, temperature=0.7),
    dict(top_k=0, top_p=1.0, min_p=0.1, temperature=1.3),
    dict(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8),   # the defaults
])
def test_chain_support_and_frequencies(model, n_vocab, chain):
    logits = structured_logits(n_vocab, seed=4)
    ids, p = ref_candidates(logits, **chain)
    s = make_sampler(model, seed=1234, **chain)
    check_draws(s, logits, ids, p, n_draws=3000)


def test_top_p_without_top_k_on_a_flat_row(model, n_vocab):
    # A flat row: top_p = 0.5 keeps tens of thousands of candidates (the quickselect path).
    logits = np.random.default_rng(5).normal(scale=0.05, size=n_vocab).astype(np.float32)
    ids, p = ref_candidates(logits, top_k=0, top_p=0.5, min_p=0.0, temperature=1.0)
    assert ids.size > 1000
    s = make_sampler(model, seed=77, top_k=0, top_p=0.5, min_p=0.0, temperature=1.0)
    draws = np.array([sample(s, logits) for _ in range(2000)])
    assert set(draws.tolist()) <= set(ids.tolist())
    assert len(set(draws.tolist())) > 500  # spread over the kept set, not stuck at the top


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.8, 0.95])
def test_top_p_cut_without_top_k_matches_reference(model, n_vocab, top_p):
    # 60 live tokens at shuffled ids (the rest ~ -30): the unsorted quickselect path must cut
    # exactly where the sorted cumulative sum does, neither earlier nor later.
    rng = np.random.default_rng(int(top_p * 100))
    logits = np.full(n_vocab, -30.0, dtype=np.float32)
    live = rng.choice(n_vocab, 60, replace=False)
    logits[live] = np.linspace(3.0, -1.0, 60).astype(np.float32)
    ids, p = ref_candidates(logits, top_k=0, top_p=top_p, min_p=0.0, temperature=1.0)
    s = make_sampler(model, seed=11, top_k=0, top_p=top_p, min_p=0.0, temperature=1.0)
    draws = check_draws(s, logits, ids, p, n_draws=3000)
    assert ids[-1] in set(draws.tolist()), "the last kept token was never drawn: cut too early?"


def test_top_p_boundary_is_the_smallest_prefix_reaching_p(model, n_vocab):
    logits = np.full(n_vocab, -30.0, dtype=np.float32)
    logits[[3, 4, 5]] = np.log(np.array([0.5, 0.3, 0.2])).astype(np.float32)
    # cumulative 0.5, 0.8, 1.0: p = 0.75 keeps {3, 4}; p = 0.85 keeps {3, 4, 5}
    for top_p, support in [(0.75, {3, 4}), (0.85, {3, 4, 5}), (0.4, {3})]:
        s = make_sampler(model, seed=5, top_k=0, top_p=top_p, min_p=0.0, temperature=1.0)
        assert {sample(s, logits) for _ in range(400)} == support, top_p


def test_min_p_is_relative_to_the_max(model, n_vocab):
    logits = np.full(n_vocab, -30.0, dtype=np.float32)
    logits[[7, 8, 9]] = np.log(np.array([0.6, 0.25, 0.15])).astype(np.float32)
    # relative to p_max = 0.6: min_p = 0.3 keeps >= 0.18 -> {7, 8}
    s = make_sampler(model, seed=6, top_k=0, top_p=1.0, min_p=0.3, temperature=1.0)
    assert {sample(s, logits) for _ in range(400)} == {7, 8}


# --- the RNG: a seed gives the same tokens everywhere ----------------------------------------

M64 = (1 << 64) - 1


def xoshiro_uniforms(seed, n):
    """splitmix64-seeded xoshiro256**, doubles in [0, 1) from the top 53 bits (as sampler.c)."""
    x, s = seed, []
    for _ in range(4):
        x = (x + 0x9E3779B97F4A7C15) & M64
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        s.append(z ^ (z >> 31))
    rotl = lambda v, k: ((v << k) | (v >> (64 - k))) & M64
    out = []
    for _ in range(n):
        result = (rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t
        s[3] = rotl(s[3], 45)
        out.append((result >> 11) * 2.0 ** -53)
    return out


def test_seed_gives_a_platform_independent_sequence(model, n_vocab):
    # Equal logits and no filters: the draw picks index ceil(n_vocab * u) - 1 exactly.
    logits = np.zeros(n_vocab, dtype=np.float32)
    s = make_sampler(model, seed=20240601, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0)
    got = [sample(s, logits) for _ in range(64)]
    want = [max(math.ceil(n_vocab * u) - 1, 0) for u in xoshiro_uniforms(20240601, 64)]
    assert got == want


def test_same_seed_same_sequence_and_reset(model, n_vocab):
    logits = structured_logits(n_vocab, seed=8, scale=3.0)
    run = lambda s: [sample(s, logits) for _ in range(50)]
    a, b = make_sampler(model, seed=42), make_sampler(model, seed=42)
    first = run(a)
    assert first == run(b)
    assert first != run(make_sampler(model, seed=43))
    lib.ckv_sampler_reset(a, 42)
    assert run(a) == first


@pytest.mark.parametrize("field, value", [
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")),
    ("min_p", -0.1), ("min_p", 1.1), ("min_p", float("nan")),
    ("penalty_last_n", -1),
    ("repeat_penalty", 0.0), ("repeat_penalty", -1.0), ("repeat_penalty", float("nan")),
    ("frequency_penalty", float("nan")), ("presence_penalty", float("inf")),
])
def test_bad_params_are_refused(model, field, value):
    out = ffi.new("ckv_sampler **")
    assert lib.ckv_sampler_init(model, make_params(**{field: value}), out) == lib.CKV_ERR_INVALID_ARG
    assert out[0] == ffi.NULL
    assert field in ffi.string(lib.ckv_last_error()).decode()


def test_bad_calls_are_refused(model, n_vocab):
    s = make_sampler(model)
    logits = np.zeros(n_vocab + 1, dtype=np.float32)
    tok = ffi.new("ckv_token *")
    ptr = ffi.cast("const float *", logits.ctypes.data)
    assert lib.ckv_sampler_sample(s, ptr, n_vocab + 1, tok) == lib.CKV_ERR_INVALID_ARG
    assert lib.ckv_sampler_sample(s, ffi.NULL, n_vocab, tok) == lib.CKV_ERR_INVALID_ARG
    assert lib.ckv_sampler_sample(s, ptr, n_vocab, ffi.NULL) == lib.CKV_ERR_INVALID_ARG
    out = ffi.new("ckv_sampler **")
    assert lib.ckv_sampler_init(ffi.NULL, make_params(), out) == lib.CKV_ERR_INVALID_ARG
    lib.ckv_sampler_accept(s, -1)         # ignored, not a crash
    lib.ckv_sampler_accept(s, n_vocab)
    lib.ckv_sampler_free(ffi.NULL)
