"""An f64 numpy forward pass of a llama-architecture GGUF on its dequantised weights (gguf
package), the independent reference of test_f32_activations and test_embeddings."""
import math

import gguf
import numpy as np


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


def llama_hidden_f64(path, ids):
    """(final-normed hidden states [T, n_embd], output head [vocab, n_embd]) of a
    llama-architecture GGUF, every product in f64."""
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
    return _rmsnorm(x, _weight(r, "output_norm.weight"), eps), out


def llama_forward_f64(path, ids) -> np.ndarray:
    """Logits [T, vocab] of a llama-architecture GGUF, every product in f64."""
    hidden, out = llama_hidden_f64(path, ids)
    return hidden @ out.T
