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


def ref_typical(ids, l, typical_p):
    """Locally typical sampling: by |surprise - entropy| ascending (ties: earlier first), until
    the mass exceeds typical_p; then back in descending logit order for top_p."""
    q = np.exp(l - l.max())
    q /= q.sum()
    entropy = -(q * np.log(q)).sum()
    order = np.lexsort((np.arange(ids.size), np.abs(-np.log(q) - entropy)))
    kept = min(int(np.searchsorted(np.cumsum(q[order]), typical_p, side="right")) + 1, ids.size)
    ids, l = ids[order[:kept]], l[order[:kept]]
    back = np.lexsort((ids, -l))
    return ids[back], l[back]


def ref_candidates(logits, top_k=40, top_p=0.95, min_p=0.05, temperature=0.8, typical_p=1.0):
    """Token ids and draw probabilities the chain leaves (logits already penalised)."""
    order = np.lexsort((np.arange(logits.size), -logits.astype(np.float64)))  # desc, id asc
    ids = order[:top_k] if 0 < top_k < logits.size else order
    l = logits[ids].astype(np.float64)
    if typical_p < 1.0:
        ids, l = ref_typical(ids, l, typical_p)
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
    dict(top_k=40, top_p=1.0, min_p=0.0, temperature=1.0, typical_p=0.5),
    dict(top_k=0, top_p=0.9, min_p=0.0, temperature=0.9, typical_p=0.7),
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


def test_typical_keeps_the_tokens_nearest_the_entropy(model, n_vocab):
    # p = 0.5, 0.3, 0.15, 0.05: entropy 1.14 nats; surprises 0.69, 1.20, 1.90, 3.00, so the
    # distances rank 1 (0.06), 0 (0.45), 2 (0.76), 3 (1.86).
    logits = np.full(n_vocab, -40.0, dtype=np.float32)
    logits[[10, 11, 12, 13]] = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    for typical_p, support in [(0.2, {11}), (0.3, {11, 10}), (0.79, {11, 10}), (0.81, {11, 10, 12})]:
        s = make_sampler(model, seed=9, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0,
                         typical_p=typical_p)
        assert {sample(s, logits) for _ in range(300)} == support, typical_p


def ref_mirostat_v1_k(logits_sorted_desc, mu, n_vocab, m=100):
    l = logits_sorted_desc[:m].astype(np.float64)
    i = np.arange(l.size - 1)
    t, b = np.log((i + 2) / (i + 1)), l[:-1] - l[1:]
    s_hat = (t * b).sum() / (t * t).sum()
    e = s_hat - 1
    k = (e * 2.0 ** mu / (1 - n_vocab ** -e)) ** (1 / s_hat)
    return max(int(k), 1)


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_follows_its_reference_step_by_step(model, n_vocab, version):
    """A numpy Mirostat fed the same uniforms (Python xoshiro256**) picks the same 40 tokens,
    with mu moving by eta * (surprise - tau) after each accepted token."""
    tau, eta, temp, seed = 3.0, 0.5, 0.9, 99
    rng = np.random.default_rng(12)
    rows = [structured_logits(n_vocab, seed=int(rng.integers(1000)), scale=2.0)
            for _ in range(40)]
    s = make_sampler(model, seed=seed, mirostat=version, mirostat_tau=tau, mirostat_eta=eta,
                     temperature=temp, top_k=0)
    uniforms = xoshiro_uniforms(seed, len(rows))
    mu, picked, kept_sizes = 2 * tau, [], []
    for row, u in zip(rows, uniforms):
        l = row.astype(np.float32) / np.float32(temp)
        order = np.lexsort((np.arange(n_vocab), -l.astype(np.float64)))
        logz = np.log(np.exp(l.astype(np.float64) - l.max()).sum()) + l.max()
        if version == 1:
            kept = order[:min(ref_mirostat_v1_k(l[order], mu, n_vocab), n_vocab)]
        else:
            kept = order[(l[order] - logz) >= -mu * math.log(2)]
            kept = kept if kept.size else order[:1]
        p = np.exp(l[kept].astype(np.float64) - l[kept].max())
        p /= p.sum()
        pick = int(min(np.searchsorted(np.cumsum(p), u * p.sum()), kept.size - 1))
        token = kept[pick]
        assert sample(s, row) == token
        lib.ckv_sampler_accept(s, int(token))
        mu -= eta * (-math.log2(p[pick]) - tau)
        picked.append(int(token))
        kept_sizes.append(kept.size)
    assert len(set(picked)) > 3 and max(kept_sizes) > 1  # neither stuck nor greedy


def test_mirostat_mu_moves_only_for_the_drawn_token(model, n_vocab):
    """A draw that is thrown away (e.g. refused by a grammar) must not move mu: accepting
    another token leaves the next draw where a fresh sampler's would be."""
    row = structured_logits(n_vocab, seed=5, scale=2.0)
    fresh = make_sampler(model, seed=1, mirostat=2, mirostat_tau=2.0, mirostat_eta=1.0)
    used = make_sampler(model, seed=1, mirostat=2, mirostat_tau=2.0, mirostat_eta=1.0)
    first = sample(used, row)
    lib.ckv_sampler_accept(used, (first + 1) % n_vocab)   # not the drawn token
    lib.ckv_sampler_reset(fresh, 1)
    sample(fresh, row)                                     # same RNG position as `used`
    lib.ckv_sampler_accept(fresh, (first + 1) % n_vocab)
    assert [sample(used, row) for _ in range(20)] == [sample(fresh, row) for _ in range(20)]


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
    ("typical_p", 0.0), ("typical_p", 1.01), ("mirostat", 3), ("mirostat", -1),
    ("mirostat_tau", 0.0), ("mirostat_tau", float("inf")), ("mirostat_eta", -0.1),
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
