"""f32_activations: matmuls on dequantised weights and f32 inputs, checked against an f64 numpy
forward pass of SmolLM2 (llama architecture) on the same dequantised weights.

The default path quantises activations to 8 bits as llama.cpp does; its logits then differ from
the exact product by that rounding. With f32_activations the only differences left are f32
summation order, so the logits must match the f64 reference far more closely: the test checks
both, which also shows the flag reaches the matmuls.
"""
import math

import numpy as np
import pytest

from clusterkv_local import Llama

gguf = pytest.importorskip("gguf")

TEXT = b"The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."


def _field(reader, key):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return int(value[0]) if value.dtype.kind in "iu" else float(value[0])


def _weight(reader, name) -> np.ndarray:
    t = reader._by_name[name]
    a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
    return a.reshape([int(x) for x in reversed(t.shape)])  # [rows, cols]: y = x @ W.T


def _rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_adjacent_pairs(x, base):  # x [T, H, D]; llama GGUFs rotate (x[2i], x[2i+1])
    d = x.shape[-1]
    angle = np.arange(x.shape[0])[:, None] * base ** (-np.arange(0, d, 2) / d)[None, :]
    c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def _causal_attention(q, k, v):  # q [T, H, D], k/v [T, KV, D]
    t, h, d = q.shape
    k, v = np.repeat(k, h // k.shape[1], 1), np.repeat(v, h // v.shape[1], 1)
    s = np.einsum("thd,shd->hts", q, k) / math.sqrt(d)
    s[:, np.triu(np.ones((t, t), dtype=bool), 1)] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(t, h * d)


def llama_forward_f64(path, ids) -> np.ndarray:
    """Logits [T, vocab] of a llama-architecture GGUF, every product in f64."""
    r = gguf.GGUFReader(path)
    r._by_name = {t.name: t for t in r.tensors}
    assert str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8") == "llama"
    n_layer, n_head = _field(r, "llama.block_count"), _field(r, "llama.attention.head_count")
    n_kv, eps = _field(r, "llama.attention.head_count_kv"), _field(r, "llama.attention.layer_norm_rms_epsilon")
    base, d = _field(r, "llama.rope.freq_base"), _field(r, "llama.embedding_length") // n_head
    emb = _weight(r, "token_embd.weight")
    x, t = emb[ids], len(ids)
    for il in range(n_layer):
        w = lambda name: _weight(r, "blk.%d.%s.weight" % (il, name))  # noqa: E731
        h = _rmsnorm(x, w("attn_norm"), eps)
        q = _rope_adjacent_pairs((h @ w("attn_q").T).reshape(t, n_head, d), base)
        k = _rope_adjacent_pairs((h @ w("attn_k").T).reshape(t, n_kv, d), base)
        v = (h @ w("attn_v").T).reshape(t, n_kv, d)
        x = x + _causal_attention(q, k, v) @ w("attn_output").T
        h = _rmsnorm(x, w("ffn_norm"), eps)
        g, u = h @ w("ffn_gate").T, h @ w("ffn_up").T
        x = x + (g / (1 + np.exp(-g)) * u) @ w("ffn_down").T
    out = _weight(r, "output.weight") if "output.weight" in r._by_name else emb
    return _rmsnorm(x, _weight(r, "output_norm.weight"), eps) @ out.T


def _kl_rows(ref, got) -> np.ndarray:
    lp = ref - ref.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = got - got.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(-1)


def _logits(path, ids, **kwargs) -> np.ndarray:
    with Llama(path, n_ctx=64, logits_all=True, verbose=False, type_k="f32", type_v="f32",
               **kwargs) as llm:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float64)


def test_f32_activations_match_an_f64_forward(default_model_path):
    with Llama(default_model_path, vocab_only=True, verbose=False) as vocab:
        ids = vocab.tokenize(TEXT)
    ref = llama_forward_f64(default_model_path, ids)
    exact = _logits(default_model_path, ids, f32_activations=True)
    quantised = _logits(default_model_path, ids)
    kl_exact, kl_quantised = _kl_rows(ref, exact), _kl_rows(ref, quantised)
    # measured 2026-11-29 (AVX-512): relative error 1.0e-6, KL max 9e-12; the 8-bit path 7e-3
    assert (exact.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(exact - ref).max() < 1e-4 * np.abs(ref).max()
    assert kl_exact.max() < 1e-9, kl_exact.max()
    # the 8-bit path is far from the exact product: the flag changes what the matmuls do
    assert kl_quantised.mean() > 1e-4, kl_quantised.mean()


def test_f32_activations_decode_matches_prefill(default_model_path):
    """Prefill rows and one-token decode steps run the same f32 matmuls."""
    ids = [1, 504, 2726, 18, 3458, 314, 253, 1789, 28, 601]
    batch = _logits(default_model_path, ids, f32_activations=True)
    with Llama(default_model_path, n_ctx=64, verbose=False, type_k="f32", type_v="f32",
               f32_activations=True) as llm:
        rows = []
        for token in ids:
            llm.eval([token])
            rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
    np.testing.assert_allclose(np.array(rows), batch, atol=1e-3 * np.abs(batch).max())


def test_f32_activations_must_be_a_bool(default_model_path):
    with pytest.raises(TypeError, match="f32_activations"):
        Llama(default_model_path, n_ctx=64, verbose=False, f32_activations=1)
