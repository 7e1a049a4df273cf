"""Writes a synthetic GGUF with Llama-3-8B's real shapes and random quantised weights.

For speed benches only (issue 5): 32 layers, n_embd 4096, 32 query / 8 KV heads of 128,
n_ff 14336, vocab 128256, rope base 500000, RMSNorm eps 1e-5. Every matrix has its own bytes,
so the GPU reads as much per token as for the real model. Weight mixes:

    q4_0    every matrix Q4_0, output Q6_K (what llama.cpp's quantize makes of Q4_0)
    q4_k_m  Q4_K, with Q6_K for output and for attn_v / ffn_down of the layers llama.cpp's
            Q4_K_M gives more bits (use_more_bits: the first and last eighth, every third between)
    q5_k_m  the same with Q5_K in place of Q4_K

Blocks are random bytes with sane fp16 scale fields (small d, so activations stay in f16
range), written directly: quantising 8e9 floats with the gguf package's numpy quantisers would
take minutes, and it has no Q4_K / Q6_K quantiser. Each type's blocks come from one 64 MiB pool
of random blocks, every tensor starting at a random block of it: drawing 4.6 GB of random bytes
takes longer than the benches, and the GPU's speed does not depend on the values. Plain numpy
and struct, no gguf package, so it runs on a machine that only has numpy.

The tokenizer section is a byte-level BPE ("gpt2", pre "llama-bpe") of the 256 byte tokens and
a few merges, padded with unused tokens to 128000, then Llama-3's 256 control tokens
(<|begin_of_text|> = 128000, <|end_of_text|> = 128001, <|eot_id|> = 128009): llama.cpp and
clusterkv both load it, and any text tokenises (to bytes).

Example:
    python bench/make_synthetic_gguf.py --mix q4_0 --out /tmp/llama3-8b-synth-q4_0.gguf
"""
import argparse
import os
import struct
import sys
import time

import numpy as np

# ggml type ids, block sizes (values) and bytes per block.
GGML_TYPES = {"F32": (0, 1, 4), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q8_0": (8, 32, 34),
              "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210)}
FILE_TYPE = {"q4_0": 2, "q4_1": 3, "q4_k_m": 15, "q5_k_m": 17}   # llama_ftype MOSTLY_*
ALIGN = 32

SHAPES = dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff=14336,
              n_vocab=128256, rope_base=500000.0, eps=1e-5, n_ctx_train=8192)
# SmolLM2-135M's shapes (--shape smollm2; with --mix q4_1 also its types: Q4_1 layers and a
# Q8_0 embedding table that is also the output head): the default model's speed on a machine
# without the file, in one device call.
SMOLLM2_SHAPES = dict(n_layer=30, n_embd=576, n_head=9, n_head_kv=3, head_dim=64, n_ff=1536,
                      n_vocab=49152, rope_base=100000.0, eps=1e-5, n_ctx_train=8192)
# A model of a few hundred KB with valid shapes (--shape tiny): the hostile-metadata tests and
# tools/fuzz_gguf.py patch or mutate its header.
TINY_SHAPES = dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=256, n_vocab=1024,
                   rope_base=10000.0, eps=1e-5, n_ctx_train=256)
SHAPE_SETS = {"llama3-8b": SHAPES, "smollm2": SMOLLM2_SHAPES, "tiny": TINY_SHAPES}

# GGUF metadata value types
U32, I32, F32, BOOL, STR, ARR = 4, 5, 6, 7, 8, 9


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, value) -> bytes:
    out = _str(key) + struct.pack("<I", vtype)
    if vtype == U32:
        return out + struct.pack("<I", value)
    if vtype == I32:
        return out + struct.pack("<i", value)
    if vtype == F32:
        return out + struct.pack("<f", value)
    if vtype == BOOL:
        return out + struct.pack("<?", value)
    if vtype == STR:
        return out + _str(value)
    raise ValueError("unsupported metadata type %d" % vtype)


def _kv_array(key: str, elem_type: int, values) -> bytes:
    out = _str(key) + struct.pack("<IIQ", ARR, elem_type, len(values))
    if elem_type == STR:
        return out + b"".join(_str(v) for v in values)
    if elem_type == I32:
        return out + np.asarray(values, dtype="<i4").tobytes()
    raise ValueError("unsupported array type %d" % elem_type)


def _byte_tokens() -> list:
    """GPT-2's bytes_to_unicode: the printable stand-in of each of the 256 bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def tokenizer_kvs(n_vocab: int) -> list:
    tokens = _byte_tokens()
    merges = ["Ġ t", "h e", "i n", "e r", "a n", "o n"]
    tokens += [m.replace(" ", "") for m in merges]
    n_control = 256
    n_pad = n_vocab - n_control - len(tokens)
    if n_pad < 0:
        raise SystemExit("vocab %d is too small for the byte tokens" % n_vocab)
    tokens += ["[PAD%d]" % i for i in range(n_pad)]
    types = [1] * (n_vocab - n_control)            # NORMAL
    control = ["<|reserved_special_token_%d|>" % i for i in range(n_control)]
    control[0], control[1], control[9] = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
    tokens += control
    types += [3] * n_control                        # CONTROL
    bos = n_vocab - n_control
    return [
        _kv("tokenizer.ggml.model", STR, "gpt2"),
        _kv("tokenizer.ggml.pre", STR, "llama-bpe"),
        _kv_array("tokenizer.ggml.tokens", STR, tokens),
        _kv_array("tokenizer.ggml.token_type", I32, types),
        _kv_array("tokenizer.ggml.merges", STR, merges),
        _kv("tokenizer.ggml.bos_token_id", U32, bos),
        _kv("tokenizer.ggml.eos_token_id", U32, bos + 1),
        _kv("tokenizer.ggml.eot_token_id", U32, bos + 9),
        _kv("tokenizer.ggml.add_bos_token", BOOL, True),
    ]


def _use_more_bits(i: int, n: int) -> bool:   # llama.cpp's llama-quant.cpp
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_plan(mix: str, s: dict) -> list:
    """(name, ne list, type name) of every tensor, in file order."""
    e, f, kv = s["n_embd"], s["n_ff"], s["n_head_kv"] * s["head_dim"]
    base = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_k_m": "Q5_K"}.get(mix, "Q4_K")
    if mix == "q4_1":   # SmolLM2's file: the embedding table (Q8_0) is also the output head
        plan = [("token_embd.weight", [e, s["n_vocab"]], "Q8_0"), ("output_norm.weight", [e], "F32")]
    else:
        plan = [("token_embd.weight", [e, s["n_vocab"]], base),
                ("output_norm.weight", [e], "F32"),
                ("output.weight", [e, s["n_vocab"]], "Q6_K")]
    for i in range(s["n_layer"]):
        more = mix in ("q4_k_m", "q5_k_m") and _use_more_bits(i, s["n_layer"])
        p = "blk.%d." % i
        plan += [(p + "attn_norm.weight", [e], "F32"),
                 (p + "attn_q.weight", [e, e], base),
                 (p + "attn_k.weight", [e, kv], base),
                 (p + "attn_v.weight", [e, kv], "Q6_K" if more else base),
                 (p + "attn_output.weight", [e, e], base),
                 (p + "ffn_norm.weight", [e], "F32"),
                 (p + "ffn_gate.weight", [e, f], base),
                 (p + "ffn_up.weight", [e, f], base),
                 (p + "ffn_down.weight", [f, e], "Q6_K" if more else base)]
    return plan


def tensor_bytes(ne: list, tname: str) -> int:
    _, block, size = GGML_TYPES[tname]
    n = int(np.prod(ne))
    assert n % block == 0
    return n // block * size


POOL_BYTES = 64 << 20


def random_blocks(rng, tname: str, nbytes: int) -> np.ndarray:
    """Random blocks of type tname (nbytes of them) with their fp16 scale fields set sanely."""
    _, _, size = GGML_TYPES[tname]
    blocks = np.frombuffer(bytearray(rng.bytes(nbytes)), dtype=np.uint8).reshape(-1, size)
    n = blocks.shape[0]

    def put_f16(offset: int, lo: float, hi: float) -> None:
        v = rng.uniform(lo, hi, size=n).astype("<f2").view(np.uint8).reshape(n, 2)
        blocks[:, offset:offset + 2] = v

    if tname in ("Q4_0", "Q8_0"):
        put_f16(0, 0.002, 0.006)                 # d
    elif tname == "Q4_1":
        put_f16(0, 0.002, 0.006)                 # d
        put_f16(2, -0.045, -0.015)               # m (values d * q + m centred near 0)
    elif tname in ("Q4_K", "Q5_K"):
        put_f16(0, 0.0002, 0.0006)               # d (times 6-bit sub-block scales)
        put_f16(2, 0.0002, 0.0006)               # dmin
    elif tname == "Q6_K":
        put_f16(208, 0.00005, 0.00015)           # d (times int8 sub-block scales)
    return blocks.reshape(-1)


def write_tensor(f, rng, pools: dict, ne: list, tname: str) -> None:
    """The tensor's bytes: norm weights drawn fresh, quantised blocks read cyclically from the
    type's pool starting at a random block."""
    if tname == "F32":   # norm weights: around 1
        f.write(rng.uniform(0.8, 1.2, size=int(np.prod(ne))).astype("<f4").tobytes())
        return
    size = GGML_TYPES[tname][2]
    if tname not in pools:
        pools[tname] = random_blocks(rng, tname, POOL_BYTES // size * size)
    pool = memoryview(pools[tname])
    left = tensor_bytes(ne, tname)
    pos = int(rng.integers(len(pool) // size)) * size
    while left > 0:
        n = min(left, len(pool) - pos)
        f.write(pool[pos:pos + n])
        left -= n
        pos = 0


def write_gguf(path: str, mix: str, seed: int = 0, s: dict = SHAPES) -> int:
    rng = np.random.default_rng(seed)
    pools = {}
    plan = tensor_plan(mix, s)
    kvs = [
        _kv("general.architecture", STR, "llama"),
        _kv("general.name", STR, "synthetic %s shapes (%s, random weights)" % (
            "SmolLM2-135M" if s is SMOLLM2_SHAPES else "tiny" if s is TINY_SHAPES else "Llama-3-8B", mix)),
        _kv("general.file_type", U32, FILE_TYPE[mix]),
        _kv("general.alignment", U32, ALIGN),
        _kv("llama.context_length", U32, s["n_ctx_train"]),
        _kv("llama.embedding_length", U32, s["n_embd"]),
        _kv("llama.block_count", U32, s["n_layer"]),
        _kv("llama.feed_forward_length", U32, s["n_ff"]),
        _kv("llama.attention.head_count", U32, s["n_head"]),
        _kv("llama.attention.head_count_kv", U32, s["n_head_kv"]),
        _kv("llama.rope.freq_base", F32, s["rope_base"]),
        _kv("llama.rope.dimension_count", U32, s["head_dim"]),
        _kv("llama.attention.layer_norm_rms_epsilon", F32, s["eps"]),
        _kv("llama.vocab_size", U32, s["n_vocab"]),
    ] + tokenizer_kvs(s["n_vocab"])
    if s.get("rope_scaling_factor"):   # linear RoPE scaling (tests of the overrides)
        kvs += [_kv("llama.rope.scaling.type", STR, "linear"),
                _kv("llama.rope.scaling.factor", F32, s["rope_scaling_factor"])]
    infos, offset = [], 0
    for name, ne, tname in plan:
        infos.append(_str(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) +
                     struct.pack("<IQ", GGML_TYPES[tname][0], offset))
        nbytes = tensor_bytes(ne, tname)
        offset += nbytes + (-nbytes) % ALIGN
    header = b"GGUF" + struct.pack("<IQQ", 3, len(plan), len(kvs)) + b"".join(kvs) + b"".join(infos)
    header += b"\0" * ((-len(header)) % ALIGN)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(header)
        for name, ne, tname in plan:
            write_tensor(f, rng, pools, ne, tname)
            f.write(b"\0" * ((-tensor_bytes(ne, tname)) % ALIGN))
    os.replace(tmp, path)
    return len(header) + offset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mix", choices=sorted(FILE_TYPE), default="q4_0")
    ap.add_argument("--out", required=True, help="output .gguf path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", choices=sorted(SHAPE_SETS), default="llama3-8b")
    args = ap.parse_args(argv)
    t0 = time.time()
    size = write_gguf(args.out, args.mix, args.seed, SHAPE_SETS[args.shape])
    print("%s: %.2f GB in %.1f s" % (args.out, size / 1e9, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
