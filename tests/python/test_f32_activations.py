"""f32_activations: matmuls on dequantised weights and f32 inputs, checked against an f64 numpy
forward pass of SmolLM2 (llama architecture) on the same dequantised weights.

The default path quantises activations to 8 bits as llama.cpp does; its logits then differ from
the exact product by that rounding. With f32_activations the only differences left are f32
summation order, so the logits must match the f64 reference far more closely: the test checks
both, which also shows the flag reaches the matmuls.
"""
import numpy as np
import pytest

from clusterkv_local import Llama

pytest.importorskip("gguf")
from numpy_reference import llama_forward_f64  # noqa: E402  (needs gguf)

TEXT = b"The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."


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
