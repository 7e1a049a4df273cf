"""Hostile model metadata: a tiny valid llama GGUF (bench/make_synthetic_gguf.py's writer, random
weights) with one hyper-parameter patched in place. Each bad value must be refused at load with
a ModelFormatError naming it, never load and then give NaN logits or read past a tensor; values
that are odd but harmless must still load and generate.

The GGUF reader's own hostile files (truncations, bad types, offsets) are tests/native/test-gguf.c.
"""
import importlib.util
import math
import os
import struct

import numpy as np
import pytest
from conftest import require_native

require_native()
from clusterkv_local import (InvalidArgumentError, Llama, ModelFormatError,  # noqa: E402
                             UnsupportedError)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_model(path: str, **shapes) -> bytes:
    """Writes the tiny model (bench/make_synthetic_gguf.py's TINY_SHAPES, overridden by shapes)."""
    spec = importlib.util.spec_from_file_location("make_synthetic_gguf",
                                                  os.path.join(ROOT, "bench", "make_synthetic_gguf.py"))
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    writer.write_gguf(path, "q4_0", 0, dict(writer.TINY_SHAPES, **shapes))
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    return tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))


def patched(raw: bytes, key: str, fmt: str, value) -> bytes:
    """raw with the scalar value of metadata `key` replaced (same type, so same size)."""
    name = struct.pack("<Q", len(key)) + key.encode()
    at = raw.index(name) + len(name) + 4   # past the value's type id
    return raw[:at] + struct.pack(fmt, value) + raw[at + struct.calcsize(fmt):]


def write(tmp_path, data: bytes) -> str:
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    return str(path)


def greedy_logprobs(path: str) -> list:
    llm = Llama(path, n_ctx=64, logits_all=True, verbose=False)
    try:
        out = llm("ab", max_tokens=3, temperature=0.0, logprobs=1)
        return out["choices"][0]["logprobs"]["token_logprobs"]
    finally:
        llm.close()


def test_tiny_model_generates(tiny_gguf, tmp_path):
    # the baseline the hostile cases patch: it loads and gives finite, non-uniform log-probs
    lp = greedy_logprobs(write(tmp_path, tiny_gguf))
    assert len(lp) == 3 and all(math.isfinite(v) for v in lp)
    assert min(lp) > -math.log(1024) + 1.0   # 1024: the tiny model's vocabulary   # not the uniform distribution of NaN logits


U32, F32 = "<I", "<f"
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("key, fmt, value, says", [
    ("llama.attention.layer_norm_rms_epsilon", F32, NAN, "must be finite and >= 0"),
    ("llama.attention.layer_norm_rms_epsilon", F32, -1.0, "must be finite and >= 0"),
    ("llama.attention.layer_norm_rms_epsilon", F32, INF, "must be finite and >= 0"),
    ("llama.rope.freq_base", F32, 0.0, "must be finite and > 0"),
    ("llama.rope.freq_base", F32, -1.0, "must be finite and > 0"),
    ("llama.rope.freq_base", F32, NAN, "must be finite and > 0"),
    ("llama.rope.freq_base", F32, INF, "must be finite and > 0"),
    ("llama.block_count", U32, 0, "bad shape"),
    ("llama.block_count", U32, 3, "'blk.2.attn_norm.weight' is missing"),
    ("llama.block_count", U32, 1, "'blk.1.attn_norm.weight' is for layer 1 but block_count is 1"),
    ("llama.block_count", U32, 0xFFFFFFFF, "out of range"),
    ("llama.block_count", U32, 0x7FFFFFFF, "more than the file's"),   # no 2^31-entry layer table
    ("llama.embedding_length", U32, 0, "bad shape"),
    ("llama.embedding_length", U32, 255, "not a multiple of head_count 4"),
    ("llama.embedding_length", U32, 512, "'token_embd.weight' has shape"),
    ("llama.attention.head_count", U32, 3, "bad shape"),
    ("llama.attention.head_count", U32, 8, "rope.dimension_count 64 does not fit head size 32"),
    ("llama.attention.head_count_kv", U32, 0, "bad shape"),
    ("llama.attention.head_count_kv", U32, 8, "bad shape"),
    ("llama.feed_forward_length", U32, 255, "'blk.0.ffn_gate.weight' has shape"),
    ("llama.rope.dimension_count", U32, 63, "does not fit head size 64"),
    ("llama.rope.dimension_count", U32, 1000, "does not fit head size 64"),
    ("general.alignment", U32, 3, "power of two"),
])
def test_bad_hyperparameter_is_refused(tiny_gguf, tmp_path, key, fmt, value, says):
    path = write(tmp_path, patched(tiny_gguf, key, fmt, value))
    with pytest.raises(ModelFormatError) as info:
        Llama(path, n_ctx=64, verbose=False)
    assert says in info.value.message, info.value.message
    if "finite" in says:
        assert key in info.value.message


@pytest.mark.parametrize("key, fmt, value", [
    ("llama.context_length", U32, 0),           # n_ctx comes from the caller
    ("llama.rope.dimension_count", U32, 32),    # partial rotary
    ("llama.attention.layer_norm_rms_epsilon", F32, 0.0),
    ("tokenizer.ggml.bos_token_id", U32, 5000),   # outside the vocabulary: ignored, as llama.cpp does
    ("tokenizer.ggml.eos_token_id", U32, 0xFFFFFFFF),
])
def test_odd_but_harmless_values_load(tiny_gguf, tmp_path, key, fmt, value):
    lp = greedy_logprobs(write(tmp_path, patched(tiny_gguf, key, fmt, value)))
    assert len(lp) == 3 and all(math.isfinite(v) for v in lp)


def test_a_one_layer_model_loads(tmp_path):
    # no KV policy asked for: the full policy does not need the two dense layers
    lp = greedy_logprobs(write(tmp_path, tiny_model(str(tmp_path / "one.gguf"), n_layer=1)))
    assert len(lp) == 3 and all(math.isfinite(v) for v in lp)


def test_unsupported_architecture_is_named(tiny_gguf, tmp_path):
    name = struct.pack("<Q", 5) + b"llama"   # general.architecture's value (the first "llama" string)
    data = tiny_gguf.replace(name, struct.pack("<Q", 5) + b"mamba", 1)
    with pytest.raises(UnsupportedError, match="mamba"):
        Llama(write(tmp_path, data), n_ctx=64, verbose=False)


def test_unsupported_weight_type_is_named(tiny_gguf, tmp_path):
    # blk.0.attn_q.weight's tensor info: name, n_dims (2), dims, then the ggml type id
    name = b"blk.0.attn_q.weight"
    at = tiny_gguf.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    at += 4 + 8 * struct.unpack_from("<I", tiny_gguf, at)[0]
    data = tiny_gguf[:at] + struct.pack("<I", 16) + tiny_gguf[at + 4:]   # 16 = IQ2_XXS
    with pytest.raises(UnsupportedError, match="iq2_xxs"):
        Llama(write(tmp_path, data), n_ctx=64, verbose=False)


def test_a_tensor_no_weight_uses_is_refused(tiny_gguf, tmp_path):
    # output.weight renamed (same length): the model would run tied and silently ignore it, as it
    # would ignore a variant's extra biases or norms; llama.cpp refuses such a file too
    name = struct.pack("<Q", 13) + b"output.weight"
    data = tiny_gguf.replace(name, struct.pack("<Q", 13) + b"output.extra1", 1)
    with pytest.raises(UnsupportedError, match="tensor 'output.extra1' is not used by this build's "
                                               "llama architecture"):
        Llama(write(tmp_path, data), n_ctx=64, verbose=False)


def _rows(path: str, tokens, **kw):
    llm = Llama(path, n_ctx=64, logits_all=True, verbose=False, **kw)
    try:
        llm.eval(tokens)
        return llm.scores[:len(tokens)].copy(), llm.save_state()
    finally:
        llm.close()


def test_rope_overrides_act_as_the_file_metadata(tmp_path):
    """rope_freq_base / rope_freq_scale given to Llama give the logits of a file that stores
    those values (rope.freq_base; rope.scaling linear with factor 1 / scale), bit for bit."""
    tokens = [1, 5, 9, 3, 17, 2, 8, 30, 11, 4, 6, 12, 7, 19, 25, 13]
    plain = str(tmp_path / "plain.gguf")
    tiny_model(plain)
    based = str(tmp_path / "base.gguf")
    tiny_model(based, rope_base=50000.0)
    scaled = str(tmp_path / "scaled.gguf")
    tiny_model(scaled, rope_scaling_factor=4.0)
    default, state = _rows(plain, tokens)
    for override, file in ((dict(rope_freq_base=50000.0), based), (dict(rope_freq_scale=0.25), scaled)):
        got, _ = _rows(plain, tokens, **override)
        want, _ = _rows(file, tokens)
        assert np.array_equal(got, want) and not np.array_equal(got, default)
        with Llama(plain, n_ctx=64, verbose=False, **override) as llm:
            with pytest.raises(InvalidArgumentError, match="another model"):
                llm.load_state(state)   # its keys were rotated by other RoPE settings
    assert np.array_equal(_rows(plain, tokens, rope_freq_base=10000.0, rope_freq_scale=1.0)[0],
                          default)
    with pytest.raises(InvalidArgumentError, match="rope_freq_base"):
        Llama(plain, n_ctx=64, verbose=False, rope_freq_base=-1.0)
    with pytest.raises(ValueError, match="finite"):
        Llama(plain, n_ctx=64, verbose=False, rope_freq_scale=float("nan"))
