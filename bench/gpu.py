"""GPU throughput, ours against llama.cpp in the same run on the same GPU (issue 5).

Workloads, as llama-bench names them: pp512 (one 512-token prompt), tg128 (128 single-token
decodes) at depth 0, 2048, 8192 and 32768 (the depth prefilled untimed first), and pp32768
(the 32k prefill). Ours runs through bench/gpu-bench.cu (target bench-cuda: the CUDA backend
via native/cuda/cuda-backend.h, one untimed warm-up and --reps repetitions, like llama-bench;
its 32k prefill is the untimed depth fill of tg128 @ 32768, timed once). llama.cpp runs as

    llama-bench -m MODEL -ngl 99 -fa 1 -p 512 -n 128 -r R -o json
    llama-bench -m MODEL -ngl 99 -fa 1 -p 0 -n 128 -d 2048,8192 -r R -o json
    llama-bench -m MODEL -ngl 99 -fa 1 -p 0 -n 128 -d 32768 -r 1 -o json
    llama-bench -m MODEL -ngl 99 -fa 1 -p 32768 -n 0 -r 1 -o json

Models: synthetic GGUFs with Llama-3-8B's shapes (bench/make_synthetic_gguf.py, written to
--work-dir first, ~4.6 GB each), mixes q4_0 (all workloads), q4_k_m and q5_k_m (pp512 and tg128), and
optionally --extra-model files (pp512 and tg128 for ours only: llama.cpp cannot load the
layer-aliased test models).

Achieved bandwidth of a decode step = (the weight bytes it reads: every matrix but the
embedding table + the KV cache bytes at the mean depth of the run) x tokens/s.

llama-bench comes from --llama-bench PATH (a build made elsewhere, with LD_LIBRARY_PATH set
for its CUDA libraries) or is built here from --llama-src (the vendor/llama.cpp of the pinned
llama-cpp-python sdist, see bench/llama_cpp_build.py) with CUDA, only the llama-bench target;
the build time is recorded. Results go to --out (rewritten after every step, so a run cut
short still leaves what it measured).

Example (on the GPU machine, from the repo root):
    python3 bench/gpu.py --bench-cuda build/native/cuda/bench-cuda \\
        --llama-src .devcarry/llama.cpp --out /tmp/out/gpu.json
"""
import argparse
import datetime
import glob
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import make_synthetic_gguf  # noqa: E402

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
DEPTHS = [0, 2048, 8192, 32768]


def log(msg: str) -> None:
    print("[gpu.py %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cuda_lib_path() -> str:
    """Folders holding libcudart / libcublas on this machine, for a llama-bench built elsewhere."""
    dirs = ["/usr/local/cuda/lib64"] + sorted(glob.glob("/opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib")) + \
        sorted(glob.glob("/usr/local/lib/python3*/dist-packages/nvidia/*/lib"))
    old = os.environ.get("LD_LIBRARY_PATH", "")
    return ":".join([d for d in dirs if os.path.isdir(d)] + ([old] if old else []))


def build_llama_bench(src: str, build_dir: str, jobs: int, timeout: float) -> dict:
    t0 = time.time()
    cfg = ["cmake", "-S", src, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_CUDA=ON",
           "-DCMAKE_CUDA_ARCHITECTURES=90", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
           "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
           "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    if not glob.glob("/usr/local/cuda/lib64/libcublas.so*"):   # take cuBLAS from a pip wheel's folder
        for lib in glob.glob("/opt/*/.venv/lib/python3*/site-packages/nvidia/cu*/lib/libcublas.so.*"):
            d = os.path.dirname(lib)
            inc = os.path.join(os.path.dirname(d), "include")
            cfg += ["-DCUDA_cublas_LIBRARY=" + lib,
                    "-DCUDA_cublasLt_LIBRARY=" + glob.glob(os.path.join(d, "libcublasLt.so.*"))[0],
                    "-DCMAKE_CUDA_FLAGS=-I" + inc, "-DCMAKE_CXX_FLAGS=-I" + inc]
            break
    subprocess.run(cfg, check=True, stdout=subprocess.DEVNULL, timeout=timeout)
    subprocess.run(["cmake", "--build", build_dir, "--target", "llama-bench", "-j%d" % jobs], check=True,
                   stdout=subprocess.DEVNULL, timeout=max(1.0, timeout - (time.time() - t0)))
    return {"path": os.path.join(build_dir, "bin", "llama-bench"), "build_s": round(time.time() - t0, 1),
            "jobs": jobs}


def run_json(cmd: list, env: dict, timeout: float):
    log(" ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (cmd[0], out.returncode, out.stderr[-2000:]))
    return json.loads(out.stdout)


def test_key(n_prompt: int, n_gen: int, depth: int) -> str:
    name = "pp%d" % n_prompt if n_prompt else "tg%d" % n_gen
    return name + ("@d%d" % depth if depth else "")


def ours(bench_cuda: str, model: str, reps: int, ubatch: int, depths: list, timeout: float) -> dict:
    cmd = [bench_cuda, model, "--reps", str(reps), "--ubatch", str(ubatch), "--pp", "512",
           "--tg", "128", "--depths", ",".join(str(d) for d in depths)]
    res = run_json(cmd, dict(os.environ), timeout)
    tests = {test_key(t["n_prompt"], t["n_gen"], t["n_depth"]): t for t in res.pop("tests")}
    return {"meta": res, "tests": tests}


def llama(llama_bench: str, model: str, reps: int, depths: list, timeout: float) -> dict:
    env = dict(os.environ, LD_LIBRARY_PATH=cuda_lib_path())
    base = [llama_bench, "-m", model, "-ngl", "99", "-fa", "1", "-o", "json"]
    runs = [["-p", "512", "-n", "128", "-r", str(reps)]]
    short = [d for d in depths if 0 < d <= 8192]
    if short:
        runs.append(["-p", "0", "-n", "128", "-d", ",".join(map(str, short)), "-r", str(reps)])
    for d in (d for d in depths if d > 8192):
        runs.append(["-p", "0", "-n", "128", "-d", str(d), "-r", "1"])
        runs.append(["-p", str(d), "-n", "0", "-r", "1"])
    tests, t0 = {}, time.time()
    for r in runs:
        for t in run_json(base + r, env, max(1.0, timeout - (time.time() - t0))):
            tests[test_key(t["n_prompt"], t["n_gen"], t["n_depth"])] = {
                k: t.get(k) for k in ("n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts", "samples_ts",
                                      "n_batch", "n_ubatch", "flash_attn", "backends", "gpu_info", "build_commit")}
    return tests


def compare(our: dict, ref: dict) -> dict:
    """Per workload: ours, llama.cpp, ratio and the decode bandwidth both achieve."""
    meta, rows = our["meta"] if our else {}, {}
    for key in sorted(set((our or {}).get("tests", {})) | set(ref or {})):
        o = (our or {}).get("tests", {}).get(key)
        r = (ref or {}).get(key)
        row = {"ours_tok_s": o and round(o["avg_ts"], 2), "llama_cpp_tok_s": r and round(r["avg_ts"], 2)}
        if o and r:
            row["ratio_ours_over_llama_cpp"] = round(o["avg_ts"] / r["avg_ts"], 3)
        t = o or r
        if t["n_gen"] and meta:
            step = meta["decode_weight_bytes"] + meta["kv_bytes_per_position"] * (t["n_depth"] + t["n_gen"] / 2)
            row["bytes_per_token"] = int(step)
            if o:
                row["ours_GB_s"] = round(step * o["avg_ts"] / 1e9, 1)
            if r:
                row["llama_cpp_GB_s"] = round(step * r["avg_ts"] / 1e9, 1)
        rows[key] = row
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench-cuda", required=True, help="the bench-cuda executable (bench/gpu-bench.cu)")
    ap.add_argument("--llama-bench", help="a CUDA llama-bench built elsewhere")
    ap.add_argument("--llama-src", help="llama.cpp source tree to build llama-bench from (with CUDA)")
    ap.add_argument("--work-dir", default="/tmp/ckv-gpu-bench", help="synthetic models and the llama.cpp build")
    ap.add_argument("--mixes", default="q4_0,q4_k_m")
    ap.add_argument("--extra-model", action="append", default=[], help="more GGUFs, ours only (pp512, tg128)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ubatch", type=int, default=2048, help="our tokens per forward call in prefill")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--budget-s", type=float, default=540, help="stop starting new steps after this")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    t_start = time.time()
    left = lambda: args.budget_s - (time.time() - t_start)  # noqa: E731
    os.makedirs(args.work_dir, exist_ok=True)
    result = {"date": datetime.date.today().isoformat(), "gpu": gpu_name(),
              "llama_cpp": {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "commit": LLAMA_CPP_COMMIT,
                            "flags": "-ngl 99 -fa 1, n_batch 2048, n_ubatch 512 (defaults)"},
              "ours": {"ubatch": args.ubatch, "reps": args.reps}, "models": {}, "errors": []}

    def save() -> None:
        with open(args.out + ".part", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.out + ".part", args.out)

    # llama.cpp build in the background while the models are written and ours runs.
    build = None
    if args.llama_src and not args.llama_bench:
        bdir = os.path.join(args.work_dir, "llama-build")
        log("building llama-bench from %s with -j%d" % (args.llama_src, args.jobs))
        build = subprocess.Popen([sys.executable, "-c",
                                  "import json,sys; sys.path.insert(0, %r); import gpu; "
                                  "print(json.dumps(gpu.build_llama_bench(%r, %r, %d, %f)))"
                                  % (os.path.join(REPO, "bench"), args.llama_src, bdir, args.jobs, left())],
                                 stdout=subprocess.PIPE, text=True)
    llama_bench = args.llama_bench

    jobs = []
    for mix in [m for m in args.mixes.split(",") if m]:
        path = os.path.join(args.work_dir, "llama3-8b-synth-%s.gguf" % mix)
        if not os.path.exists(path):
            t0 = time.time()
            make_synthetic_gguf.write_gguf(path, mix)
            log("wrote %s in %.1f s" % (path, time.time() - t0))
        jobs.append(("llama3-8b-synth-" + mix, path, DEPTHS if mix == "q4_0" else [0], True))
    jobs += [(os.path.basename(p), p, [0], False) for p in args.extra_model]

    ours_res = {}
    for name, path, depths, _ in jobs:
        if left() < 30:
            result["errors"].append("ours %s: skipped, out of time" % name)
            continue
        try:
            ours_res[name] = ours(args.bench_cuda, path, args.reps, args.ubatch, depths, left())
            result["models"][name] = {"ours_meta": ours_res[name]["meta"], "workloads": compare(ours_res[name], {})}
        except (RuntimeError, subprocess.SubprocessError, ValueError) as e:
            result["errors"].append("ours %s: %s" % (name, e))
        save()

    if build:
        out, _ = build.communicate()
        if build.returncode == 0:
            info = json.loads(out.strip().splitlines()[-1])
            result["llama_cpp"]["build"] = info
            llama_bench = info["path"]
            log("llama-bench built in %.1f s" % info["build_s"])
        else:
            result["errors"].append("llama-bench build failed (rc %d)" % build.returncode)
        save()
    if llama_bench:
        for name, path, depths, comparable in jobs:
            if not comparable:
                continue
            if left() < 30:
                result["errors"].append("llama.cpp %s: skipped, out of time" % name)
                continue
            try:
                ref = llama(llama_bench, path, args.reps, depths, left())
                result["models"].setdefault(name, {})["llama_cpp_raw"] = ref
                result["models"][name]["workloads"] = compare(ours_res.get(name), ref)
            except (RuntimeError, subprocess.SubprocessError, ValueError) as e:
                result["errors"].append("llama.cpp %s: %s" % (name, e))
            save()
    result["wall_s"] = round(time.time() - t_start, 1)
    save()
    for name, m in result["models"].items():
        log(name)
        for key, row in m.get("workloads", {}).items():
            log("  %-14s %s" % (key, row))
    for e in result["errors"]:
        log("error: " + e)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
