"""Embeddings (Llama(embedding=True), embed, create_embedding): the final-normed hidden states
against an f64 numpy forward pass, pooling and normalisation against the per-token rows, and
the llama-cpp-python shapes and errors."""
import numpy as np
import pytest

from conftest import N_THREADS, require_native

require_native()
from clusterkv_local import Llama  # noqa: E402
from clusterkv_local import _internals  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."


def _llm(path, **kwargs) -> Llama:
    kwargs.setdefault("n_ctx", 128)
    return Llama(path, embedding=True, n_threads=N_THREADS, verbose=False, **kwargs)


def test_token_vectors_match_an_f64_forward(default_model_path):
    pytest.importorskip("gguf")
    from numpy_reference import llama_hidden_f64

    with _llm(default_model_path, f32_activations=True, type_k="f32", type_v="f32") as llm:
        ids = llm.tokenize(TEXT.encode())
        rows = np.array(llm.embed(TEXT), dtype=np.float64)  # pooling none: one row per token
        llm.eval(ids)
        logits = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    hidden, head = llama_hidden_f64(default_model_path, ids)
    assert rows.shape == hidden.shape == (len(ids), 576)
    # f32 sums against f64 ones (measured 2026-12-07: 9e-7 of the largest value; the default
    # 8-bit path is 3e-2 away, so this bound also shows f32_activations reaches the rows)
    assert np.abs(rows - hidden).max() < 1e-4 * np.abs(hidden).max()
    # the vectors are the output head's input: the last one gives the last logits row
    np.testing.assert_allclose(rows[-1] @ head.T, logits, atol=1e-4 * np.abs(logits).max())


def test_pooling_and_normalize_follow_the_token_rows(default_model_path):
    with _llm(default_model_path) as llm:
        rows = np.array(llm.embed(TEXT))
    for pooling, expected in (("mean", rows.mean(0)), ("cls", rows[0]), ("last", rows[-1])):
        with _llm(default_model_path, pooling_type=pooling) as llm:
            vector = np.array(llm.embed(TEXT))
            unit = np.array(llm.embed(TEXT, normalize=True))
        assert vector.shape == (576,)
        np.testing.assert_allclose(vector, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(unit, expected / np.linalg.norm(expected), rtol=1e-5, atol=1e-6)
    with _llm(default_model_path) as llm:
        units = np.array(llm.embed(TEXT, normalize=True))
    np.testing.assert_allclose(np.linalg.norm(units, axis=1), 1.0, rtol=1e-5)


def test_texts_are_embedded_alone_and_chunking_changes_nothing(default_model_path):
    """Each text starts at position 0 whatever came before; small n_batch chunks give the same
    rows as one chunk."""
    with _llm(default_model_path, pooling_type="mean") as llm:
        alone = np.array(llm.embed("a dog in the park"))
        both, n_tokens = llm.embed([TEXT, "a dog in the park"], return_count=True)
        assert n_tokens == len(llm.tokenize(TEXT.encode())) + len(llm.tokenize(b"a dog in the park"))
        np.testing.assert_array_equal(np.array(both[1]), alone)
    with _llm(default_model_path, n_batch=4) as small, _llm(default_model_path) as one:
        np.testing.assert_allclose(np.array(small.embed(TEXT)), np.array(one.embed(TEXT)),
                                   rtol=1e-5, atol=1e-5)


def test_embed_leaves_generation_as_from_a_fresh_start(default_model_path):
    prompt = "The capital of France is"
    with _llm(default_model_path) as llm:
        before = llm(prompt, max_tokens=8, temperature=0)["choices"][0]["text"]
        llm.embed("something else entirely, long enough to overwrite the cache rows")
        assert llm.n_tokens == 0
        after = llm(prompt, max_tokens=8, temperature=0)["choices"][0]["text"]
    assert after == before


def test_create_embedding_has_the_openai_shape(default_model_path):
    with _llm(default_model_path, pooling_type="last") as llm:
        out = llm.create_embedding(["one", "two words"], model="smol")
        single = llm.create_embedding("one")
        n = len(llm.tokenize(b"one")) + len(llm.tokenize(b"two words"))
    assert out["object"] == "list" and out["model"] == "smol"
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 576 for d in out["data"])
    assert out["usage"] == {"prompt_tokens": n, "total_tokens": n}
    assert single["data"][0]["embedding"] == out["data"][0]["embedding"]
    assert single["model"] == llm.model_path


def test_long_texts_truncate_or_raise(default_model_path):
    text = " ".join(["word"] * 100)
    with _llm(default_model_path, n_ctx=32, pooling_type="mean") as llm:
        _, n_tokens = llm.embed(text, return_count=True)
        assert n_tokens == 32
        with pytest.raises(ValueError, match="exceed context window of 32"):
            llm.embed(text, truncate=False)


def test_bad_embedding_arguments_raise(default_model_path):
    with Llama(default_model_path, n_ctx=32, verbose=False) as llm:
        with pytest.raises(RuntimeError, match="embedding=True"):
            llm.embed("hi")
    with pytest.raises(ValueError, match="pooling_type must be one of none, mean, cls, last"):
        _llm(default_model_path, pooling_type="max")
    with pytest.raises(ValueError, match="pooling_type 4 is not supported"):
        _llm(default_model_path, pooling_type=4)
    with pytest.raises(TypeError, match="embedding must be a bool"):
        Llama(default_model_path, embedding=1, verbose=False)
    with _llm(default_model_path) as llm:
        with pytest.raises(TypeError, match="str or a list of str"):
            llm.embed([1, 2, 3])
        with pytest.raises(ValueError, match="no tokens"):
            llm.embed("")


def test_native_rows_without_and_with_the_flag(default_model_path):
    """ckv_get_embeddings: no rows unless the context asked for them; a batch step keeps one
    row per sequence, equal to that sequence's one-token decode."""
    model = _internals._Model(default_model_path)
    try:
        plain = _internals._Context(model, n_ctx=32)
        plain.decode([1, 2, 3])
        assert plain.embeddings().shape == (0, 576)
        plain.close()
        one = _internals._Context(model, n_ctx=32, embeddings=True)
        many = _internals._Context(model, n_ctx=32, n_seq_max=2, embeddings=True)
        one.decode([5, 6, 7])
        assert one.embeddings().shape == (3, 576)
        one.decode([8])
        single = one.embeddings()
        many.decode_seq(0, [5, 6, 7])
        many.decode_seq(1, [9])
        many.decode_batch([8, 10], [0, 1])
        rows = many.embeddings()
        assert rows.shape == (2, 576)
        np.testing.assert_array_equal(rows[0], single[0])
        one.close()
        many.close()
    finally:
        model.close()

