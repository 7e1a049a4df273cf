"""Our dequantisation of every supported weight type against gguf-py's reference
(`gguf.quants.dequantize`, itself checked against ggml's dequantize_row_*), through the public
API: a GGUF written with `gguf.GGUFWriter` holding random but valid blocks of each type, opened
with `metadata_only = true` and read back with `ckv_model_tensor_dequantize`. The tensor table
(`ckv_model_tensor_info`) must match `gguf.GGUFReader` too. The same checks run on the real
model files in the registry cache (conftest.model_folders()) when they are there.

Results must agree to the bit; the bound allows 1 ulp, which no type needs today.
"""
import os

import numpy as np
import pytest
from conftest import model_folders

gguf = pytest.importorskip("gguf")

try:
    from clusterkv_local._ffi import ffi, lib
except ImportError as exc:  # the native library is not built (yet)
    pytest.skip("clusterkv native library not importable: %s" % str(exc).splitlines()[0],
                allow_module_level=True)

Q = gguf.GGMLQuantizationType

# Byte offsets of the fp16 scale fields inside one block (ggml-common.h); everything else in a
# block may hold any bits.
SCALE_OFFSETS = {
    Q.Q4_0: [0], Q.Q5_0: [0], Q.Q8_0: [0],
    Q.Q4_1: [0, 2], Q.Q5_1: [0, 2], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q6_K: [208],
}
QUANT_TYPES = list(SCALE_OFFSETS)
FLOAT_TYPES = [Q.F32, Q.F16, Q.BF16]


def random_blocks(rng, qtype, n_rows, n_blocks_per_row):
    """Random blocks with finite scales of either sign (2^-12 .. 2^-1), as (rows, row bytes)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(n_rows * n_blocks_per_row, type_size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        scale = (rng.uniform(1, 2, size=len(data)) * 2.0 ** -rng.integers(1, 13, size=len(data))
                 * rng.choice([-1, 1], size=len(data))).astype(np.float16)
        data[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return data.reshape(n_rows, n_blocks_per_row * type_size)


def random_floats(rng, qtype, n_rows, n_cols):
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32) * 3
    if qtype == Q.F32:
        return x, None
    if qtype == Q.F16:
        return x.astype(np.float16), None
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation: any finite bf16 will do
    return bf16.view(np.uint8).reshape(n_rows, 2 * n_cols), Q.BF16


def tensor_name(qtype, shape_id):
    return "t.%s.%d" % (qtype.name.lower(), shape_id)


@pytest.fixture(scope="module")
def synthetic_gguf(tmp_path_factory):
    """Every weight type in a few shapes: one row, several rows, and a 3-D tensor."""
    rng = np.random.default_rng(1234)
    path = str(tmp_path_factory.mktemp("quants") / "all-types.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for qtype in QUANT_TYPES + FLOAT_TYPES:
        block_size = gguf.GGML_QUANT_SIZES[qtype][0]
        per_row = 1 if block_size == 1 else 2  # blocks per row (or 64-element float rows)
        for shape_id, n_rows in enumerate([1, 5, 6]):
            if qtype in QUANT_TYPES:
                data, raw = random_blocks(rng, qtype, n_rows, per_row), qtype
            else:
                data, raw = random_floats(rng, qtype, n_rows, 64 if block_size == 1 else per_row)
            if shape_id == 2:  # [ne0, 3, 2]: rows of a 3-D tensor come out in GGUF order
                data = data.reshape(2, 3, data.shape[-1])
            writer.add_tensor(tensor_name(qtype, shape_id), data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_metadata_only(path):
    params = ffi.new("struct ckv_model_params *")
    lib.ckv_model_default_params(params)
    params.metadata_only = True
    out = ffi.new("ckv_model **")
    status = lib.ckv_model_load(path.encode(), params, out)
    assert status == 0, "%s: %s" % (path, ffi.string(lib.ckv_last_error()).decode())
    return ffi.gc(out[0], lib.ckv_model_free)


def our_tensors(model):
    """name -> struct ckv_tensor_info fields, from the public tensor table."""
    table = {}
    info = ffi.new("struct ckv_tensor_info *")
    for i in range(lib.ckv_model_n_tensors(model)):
        assert lib.ckv_model_tensor_info(model, i, info) == 0
        table[ffi.string(info.name).decode()] = (info.type, list(info.ne)[:info.n_dims], info.offset, info.size)
    return table


def our_dequantize(model, name, n):
    out = np.full(n, np.nan, dtype=np.float32)
    status = lib.ckv_model_tensor_dequantize(model, name.encode(), ffi.cast("float *", ffi.from_buffer(out)), n)
    assert status == 0, ffi.string(lib.ckv_last_error()).decode()
    return out


def assert_same_floats(ours, ref, what):
    ref = np.ascontiguousarray(ref, dtype=np.float32).reshape(-1)
    assert ours.shape == ref.shape, what
    assert np.isfinite(ref).all(), what  # finite scales in, finite values out
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1, "%s: %d values differ, up to %d ulp" % (what, (ulps > 0).sum(), ulps.max())


def check_file(path, names=None, reader=None):
    """Compares the tensor table and the dequantised values of path (all, or names) with gguf-py."""
    reader = reader or gguf.GGUFReader(path)
    model = load_metadata_only(path)
    table = our_tensors(model)
    assert len(table) == len(reader.tensors)
    checked = set()
    for t in reader.tensors:
        qtype, ne, offset, size = table[t.name]
        assert (qtype, ne, offset, size) == (int(t.tensor_type), [int(x) for x in t.shape],
                                             t.data_offset, t.n_bytes), t.name
        if names is None or t.name in names:
            ours = our_dequantize(model, t.name, int(t.n_elements))
            assert_same_floats(ours, gguf.quants.dequantize(t.data, t.tensor_type), t.name)
            checked.add(Q(t.tensor_type))
    return checked


def test_every_weight_type_matches_gguf_py(synthetic_gguf):
    checked = check_file(synthetic_gguf)
    assert checked == set(QUANT_TYPES + FLOAT_TYPES)


def test_buffer_too_small_and_unknown_name(synthetic_gguf):
    model = load_metadata_only(synthetic_gguf)
    out = np.zeros(4, dtype=np.float32)
    ptr = ffi.cast("float *", ffi.from_buffer(out))
    assert lib.ckv_model_tensor_dequantize(model, b"t.q4_0.1", ptr, 4) != 0
    assert ffi.string(lib.ckv_last_error())
    assert lib.ckv_model_tensor_dequantize(model, b"no.such.tensor", ptr, 4) != 0
    assert b"no.such.tensor" in ffi.string(lib.ckv_last_error())


def test_size_only_types_are_refused_not_dequantised(tmp_path):
    # A GGUF may hold types we know only the block size of (they list, but have no kernel):
    # dequantising one must fail with CKV_ERR_UNSUPPORTED naming the type, not crash.
    path = str(tmp_path / "size-only.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    iq4_nl = np.random.default_rng(7).integers(0, 256, size=(2, 18), dtype=np.uint8)
    writer.add_tensor("t.iq4_nl", iq4_nl, raw_dtype=Q.IQ4_NL)   # 2 rows of one 32-element block
    writer.add_tensor("t.i8", np.arange(-8, 8, dtype=np.int8))
    writer.add_tensor("t.f32", np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = load_metadata_only(path)
    out = np.zeros(64, dtype=np.float32)
    ptr = ffi.cast("float *", ffi.from_buffer(out))
    for name, type_name in [(b"t.iq4_nl", b"iq4_nl"), (b"t.i8", b"i8")]:
        assert lib.ckv_model_tensor_dequantize(model, name, ptr, out.size) == lib.CKV_ERR_UNSUPPORTED
        message = ffi.string(lib.ckv_last_error())
        assert name in message and type_name in message, message
    assert lib.ckv_model_tensor_dequantize(model, b"t.f32", ptr, out.size) == 0  # still works
    assert out[:4].tolist() == [0.0, 1.0, 2.0, 3.0]


def model_file(name):
    for folder in model_folders():
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    pytest.skip("%s is not in %s" % (name, model_folders()))


def sample_tensors(reader, per_type=2):
    """The smallest tensors of each type the file uses: every type, quickly."""
    by_type = {}
    for t in sorted(reader.tensors, key=lambda t: int(t.n_bytes)):
        by_type.setdefault(int(t.tensor_type), []).append(t.name)
    return {name for names in by_type.values() for name in names[:per_type]}


# The default model's token embeddings are also its (tied) output head: checked whole.
@pytest.mark.parametrize("name, types, extra", [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", {Q.Q4_1, Q.Q8_0, Q.F32}, {"token_embd.weight"}),
    ("gemma-3-270m-q4_k_m.gguf", {Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.F32}, set()),
    ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", {Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.F32}, set()),
])
def test_real_model_tensors_match_gguf_py(name, types, extra):
    path = model_file(name)
    reader = gguf.GGUFReader(path)  # slow on large vocabularies (seconds): read once
    checked = check_file(path, sample_tensors(reader) | extra, reader)
    assert types <= checked, "types seen: %s" % sorted(t.name for t in checked)
