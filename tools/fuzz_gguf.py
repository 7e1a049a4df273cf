"""Byte-mutation fuzzing of model loading under ASan + UBSan.

Writes a tiny valid llama GGUF (bench/make_synthetic_gguf.py's writer: 2 layers, vocabulary of
1024 byte-level BPE tokens, random q4_0 weights), builds tools/fuzz_load.c against a sanitized
library, then for --seconds mutates the file's header (metadata and tensor infos: bit flips,
special bytes, 8-byte words set to 0 / 2^31-1 / 2^32-1 / 2^64-1 ..., truncations) and runs the
target on each mutant: load, tokenize, detokenize, token pieces, decode. A clean error is a
pass; a crash, a sanitizer report or a leak is saved to --out as crash_N.gguf with its report.
Exit status 1 when anything crashed.

    cmake -S . -B /tmp/basan -DCKV_CUDA=OFF -DCKV_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
    cmake --build /tmp/basan -j
    python tools/fuzz_gguf.py --build /tmp/basan --seconds 300 --seed 1

With --from MODEL.gguf the seed is that model shrunk to one tiny layer with its own metadata and
tokenizer (e.g. the Gemma-3 SPM or the Qwen2.5 BPE file from the model cache).

2026-12-07: ~50k mutants of the tiny llama model; one finding (a block_count of 67 million made the
loader allocate its layer table, 43 GB, before checking the tensors), fixed in 5e4d80d. Then 5576
mutants of the shrunk Gemma-3 (6.5 MB header) and 3549 of the shrunk Qwen2.5 (5.9 MB); with half the
mutations on structure words, 3283 (Gemma-3), 3218 (Qwen2.5) and 13301 (tiny llama): 0 crashes.
"""
import argparse
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import gguf
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [0, 1, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 63 - 1, 2 ** 64 - 1]   # lengths, counts, offsets


def write_tiny_model(path: str) -> bytes:
    """The valid seed file, written to path; returns its bytes."""
    spec = importlib.util.spec_from_file_location("make_synthetic_gguf",
                                                  os.path.join(ROOT, "bench", "make_synthetic_gguf.py"))
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    writer.write_gguf(path, "q4_0", 0, writer.TINY_SHAPES)
    with open(path, "rb") as f:
        return f.read()


def shrink_model(real: str, path: str) -> bytes:
    """A one-layer copy of the GGUF `real` with tiny widths and random weights, keeping every
    metadata key and its tokenizer (so the SPM and Qwen2 loaders are fuzzed too); written to
    path, returns its bytes. Widths map by value: n_embd and n_head x head_dim -> 64,
    n_head_kv x head_dim and head_dim -> 32, n_ff -> 64 (2 heads of 32, 1 KV head)."""
    r = gguf.GGUFReader(real)
    arch = str(r.fields["general.architecture"].contents())
    hp = {k[len(arch) + 1:]: r.fields[k].contents() for k in r.fields if k.startswith(arch + ".")}
    n_embd, n_head, n_kv = hp["embedding_length"], hp["attention.head_count"], hp["attention.head_count_kv"]
    head_dim = hp.get("attention.key_length", n_embd // n_head)
    width = {n_embd: 64, n_head * head_dim: 64, n_kv * head_dim: 32, head_dim: 32, hp["feed_forward_length"]: 64}
    tiny = {"block_count": 1, "embedding_length": 64, "feed_forward_length": 64, "attention.head_count": 2,
            "attention.head_count_kv": 1, "attention.key_length": 32, "attention.value_length": 32,
            "context_length": 256}
    w = gguf.GGUFWriter(path, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        name = key[len(arch) + 1:] if key.startswith(arch + ".") else None
        if name in tiny:
            w.add_key_value(key, tiny[name], field.types[0])
        elif field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), field.types[0])
    rng = np.random.default_rng(0)
    for t in r.tensors:
        if t.name.startswith("blk.") and not t.name.startswith("blk.0."):
            continue
        shape = [width.get(int(d), int(d)) for d in t.shape]   # ne order: [cols, rows]
        data = (rng.standard_normal(list(reversed(shape))) * 0.05).astype(np.float32)
        if len(shape) == 2 and shape[0] % 32 == 0:
            w.add_tensor(t.name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f:
        return f.read()


def structure_words(r: gguf.GGUFReader) -> list:
    """Three lists of (offset, size) in the header: each key's length and value type and each
    array's element type and count; each string's length inside arrays; every tensor info, as
    8-byte windows. mutate() picks a list first, so the few hundred key fields are hit as often
    as the hundreds of thousands of token lengths (a uniform pick in megabytes of token text
    would seldom hit either)."""
    base = r.data.__array_interface__["data"][0]
    at = lambda p: (p.__array_interface__["data"][0] - base, p.nbytes)  # noqa: E731
    keys, strings, tensors = [], [], []
    for field in r.fields.values():
        parts = field.parts
        if field.name.startswith("GGUF.") or not parts:
            continue
        is_array = field.types[0] == gguf.GGUFValueType.ARRAY
        keys += [at(parts[i]) for i in ([0, 2, 3, 4] if is_array else [0, 2])]
        if field.types[:2] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]:
            strings += [at(parts[i]) for i in range(5, len(parts), 2)]
    for t in r.tensors:
        first = at(t.field.parts[0])[0]
        last = sum(at(t.field.parts[-1]))
        tensors += [(o, 8) for o in range(first, last - 7, 4)]
    return [w for w in (keys, strings, tensors) if w]


def mutate(raw: bytes, header: int, rng: random.Random, words: list = ()) -> bytes:
    if rng.random() < 0.1:
        return raw[:rng.randrange(0, header + 64)]
    data = bytearray(raw)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        if words and rng.random() < 0.5:   # a length, type or count field
            off, size = rng.choice(rng.choice(words))
            flipped = int.from_bytes(data[off:off + size], "little") ^ (1 << rng.randrange(8 * size))
            value = rng.choice(WORDS + [rng.randrange(2 ** 16), flipped])
            data[off:off + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
            continue
        i, r = rng.randrange(0, header), rng.random()
        if r < 0.3:
            data[i] ^= 1 << rng.randrange(8)
        elif r < 0.6:
            data[i] = rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF])
        else:
            j = i & ~7
            data[j:j + 8] = rng.choice(WORDS + [rng.randrange(2 ** 16)]).to_bytes(8, "little")
    return bytes(data)


def build_target(build: str, out_dir: str) -> str:
    lib = os.path.join(build, "libclusterkv.so")
    if not os.path.exists(lib):
        sys.exit("no %s: build the library with -DCKV_SANITIZE=ON first" % lib)
    exe = os.path.join(out_dir, "fuzz_load")
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-O1", "-g", "-fsanitize=address,undefined", "-I", os.path.join(ROOT, "native", "include"),
                    os.path.join(ROOT, "tools", "fuzz_load.c"), "-L", build, "-lclusterkv",
                    "-Wl,-rpath," + os.path.abspath(build), "-o", exe], check=True)
    return exe


def is_crash(r: subprocess.CompletedProcess) -> bool:
    return r.returncode != 0 or any(s in r.stderr for s in ("Sanitizer", "runtime error"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", required=True, help="build folder of a -DCKV_SANITIZE=ON library")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="where crashing inputs go (default: a temp folder)")
    ap.add_argument("--from", dest="real", default=None,
                    help="shrink this GGUF (e.g. the Gemma-3 or Qwen2.5 file) to one tiny layer, keeping "
                         "its metadata and tokenizer, and fuzz that instead of the tiny llama model")
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="ckv-fuzz-")
    os.makedirs(out, exist_ok=True)
    seed_path = os.path.join(out, "seed.gguf")
    raw = shrink_model(args.real, seed_path) if args.real else write_tiny_model(seed_path)
    reader = gguf.GGUFReader(seed_path)
    header = reader.data_offset   # metadata and tensor infos: what the loader parses
    words = structure_words(reader)
    exe = build_target(args.build, out)
    env = dict(os.environ, UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    rng, case = random.Random(args.seed), os.path.join(out, "case.gguf")
    t0, n, crashes, outcomes = time.time(), 0, 0, {}
    while time.time() - t0 < args.seconds:
        with open(case, "wb") as f:
            f.write(mutate(raw, header, rng, words))
        r = subprocess.run([exe, case], capture_output=True, text=True, errors="replace", env=env, timeout=120)
        n += 1
        step = r.stdout.split(":")[0] or "?"
        outcomes[step] = outcomes.get(step, 0) + 1
        if is_crash(r):
            crashes += 1
            keep = os.path.join(out, "crash_%d" % crashes)
            shutil.copy(case, keep + ".gguf")
            with open(keep + ".txt", "w") as f:
                f.write(r.stderr)
            print("crash (exit %d): %s.gguf\n%s" % (r.returncode, keep, r.stderr[-2000:]), flush=True)
    print("%d mutants of a %d-byte header in %.0f s, %d crashed; outcomes %s; inputs in %s"
          % (n, header, time.time() - t0, crashes, outcomes, out))
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
