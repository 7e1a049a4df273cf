"""CPU throughput, ours against llama.cpp in the same run: llama-bench's workloads.

Workloads (peers.md 2.3): `pp512` (one 512-token prompt) and `tg64` (64 single-token decodes),
each at depth 0, 2048 and 4096, where the depth is an untimed prefill done before the timed
part (the `tg64 @ d4096` of llama-bench). As llama-bench: random token ids (BOS first when the
vocabulary adds one), n_ctx = depth + n_prompt + n_gen, f16 KV cache, no sampling or
tokenisation in the timed part, one warm-up repetition dropped, then --reps repetitions
reported as the mean +- sd of per-repetition tokens/s (and the median). Our runtime is driven
through the raw cffi binding; the depth prefill is done once per depth and every repetition
starts from it again (ckv_context_truncate), as llama-bench restores a saved state.

llama.cpp runs as `llama-bench -m MODEL -t T -p 512 -n 64 -d 0,2048,4096 -r R -o json`, same
model, same threads, built by bench/llama_cpp_build.py (or --llama-bench PATH).

Prints a table and writes bench/results/YYYY-MM-DD_cpu-<cpu>_cpu.json (never overwritten).

Example:
    python -m bench.cpu --threads 2 --reps 3          # from the repo root (or with the package installed)
    python -m bench.cpu --model /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf --skip-llama-cpp
"""
import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from clusterkv_local._ffi import ffi, lib, library_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KV_POLICIES = ("full", "streaming", "quest", "h2o", "clusterkv")


# --- our runtime ----------------------------------------------------------------------------

def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError("%s: %s (%s)" % (what, ffi.string(lib.ckv_status_name(status)).decode(),
                                            ffi.string(lib.ckv_last_error()).decode()))


class Ours:
    """A loaded model; contexts are made per depth, as llama-bench sizes n_ctx per test."""

    def __init__(self, path: str, threads: int, kv_policy: str = "full", kv_budget: int = 1024):
        params = ffi.new("struct ckv_model_params *")
        lib.ckv_model_default_params(params)
        out = ffi.new("ckv_model **")
        _check(lib.ckv_model_load(path.encode(), params, out), "ckv_model_load")
        self.model = out[0]
        self.threads = threads
        self.kv_policy, self.kv_budget = kv_policy, kv_budget
        self.n_vocab = lib.ckv_vocab_n_tokens(self.model)
        self.bos = lib.ckv_token_bos(self.model) if lib.ckv_vocab_add_bos(self.model) else -1

    def context(self, n_ctx: int):
        params = ffi.new("struct ckv_context_params *")
        lib.ckv_context_default_params(params)
        params.n_ctx = n_ctx
        params.n_threads = self.threads
        params.kv_type = lib.CKV_KV_F16
        params.kv_policy.policy = getattr(lib, "CKV_KV_POLICY_" + self.kv_policy.upper())
        params.kv_policy.budget = self.kv_budget
        out = ffi.new("ckv_context **")
        _check(lib.ckv_context_init(self.model, params, out), "ckv_context_init")
        return ffi.gc(out[0], lib.ckv_context_free)

    def random_tokens(self, rng, n: int):
        ids = rng.integers(0, self.n_vocab, size=n).tolist()
        if self.bos >= 0:
            ids[0] = self.bos
        return ffi.new("ckv_token[]", ids)

    def info(self) -> dict:
        info = ffi.new("struct ckv_model_info *")
        lib.ckv_model_get_info(self.model, info)
        types = {}
        t = ffi.new("struct ckv_tensor_info *")
        for i in range(lib.ckv_model_n_tensors(self.model)):
            if lib.ckv_model_tensor_info(self.model, i, t) == 0:
                name = ffi.string(t.type_name).decode()
                types[name] = types.get(name, 0) + int(t.size)
        return {"arch": ffi.string(info.arch).decode(), "n_params": int(info.n_params),
                "size": int(info.size), "tensor_types_bytes": types,
                "quant": max(types, key=types.get) if types else "?"}


def time_test(ours: Ours, ctx, depth: int, n_prompt: int, n_gen: int, rng) -> float:
    """One repetition from the depth prefill; returns the seconds of the timed part."""
    _check(lib.ckv_context_truncate(ctx, depth), "ckv_context_truncate")
    if n_prompt:
        tokens = ours.random_tokens(rng, n_prompt)
        t0 = time.perf_counter()
        _check(lib.ckv_decode(ctx, tokens, n_prompt, False), "ckv_decode")
        return time.perf_counter() - t0
    tokens = ours.random_tokens(rng, n_gen)
    t0 = time.perf_counter()
    for i in range(n_gen):
        _check(lib.ckv_decode(ctx, tokens + i, 1, False), "ckv_decode")
    return time.perf_counter() - t0


def bench_ours(ours: Ours, tests: list, reps: int, seed: int = 1234) -> list:
    rng = np.random.default_rng(seed)
    results = []
    for depth in sorted({d for _, _, d in tests}):
        ctx_cache = {}
        for n_prompt, n_gen, d in [t for t in tests if t[2] == depth]:
            n_ctx = depth + n_prompt + n_gen
            ctx = ctx_cache.get(n_ctx)
            if ctx is None:
                ctx = ctx_cache[n_ctx] = ours.context(n_ctx)
                if depth:  # untimed prefill, reused by every repetition
                    _check(lib.ckv_decode(ctx, ours.random_tokens(rng, depth), depth, False),
                           "ckv_decode (depth prefill)")
            secs = [time_test(ours, ctx, depth, n_prompt, n_gen, rng) for _ in range(reps + 1)][1:]
            n = n_prompt or n_gen
            results.append(summarise(n_prompt, n_gen, depth, [n / s for s in secs]))
            print("  ours  %-14s %8.2f t/s" % (test_name(n_prompt, n_gen, depth),
                                                results[-1]["tps_mean"]), file=sys.stderr)
    return results


def summarise(n_prompt: int, n_gen: int, depth: int, tps: list) -> dict:
    mean = statistics.fmean(tps)
    return {"test": test_name(n_prompt, n_gen, depth), "n_prompt": n_prompt, "n_gen": n_gen,
            "n_depth": depth, "tps_mean": mean,
            "tps_sd": statistics.stdev(tps) if len(tps) > 1 else 0.0,
            "tps_median": statistics.median(tps), "ms_per_token": 1000.0 / mean,
            "samples_tps": tps}


def test_name(n_prompt: int, n_gen: int, depth: int) -> str:
    name = "pp%d" % n_prompt if n_prompt else "tg%d" % n_gen
    return name + (" @ d%d" % depth if depth else "")


# --- llama.cpp ------------------------------------------------------------------------------

def llama_bench_path(args) -> tuple:
    if args.llama_bench:
        return args.llama_bench, {}
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "llama_cpp_build.py"), "--json"],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    return info["llama_bench"], info


def bench_llama_cpp(exe: str, model: str, args) -> tuple:
    cmd = [exe, "-m", model, "-t", str(args.threads), "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-d", ",".join(map(str, args.depths)), "-r", str(args.reps), "-o", "json"]
    print("+ " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError("llama-bench failed (%d):\n%s" % (proc.returncode, proc.stderr[-3000:]))
    rows = json.loads(proc.stdout)
    results = [summarise(r["n_prompt"], r["n_gen"], r["n_depth"], r["samples_ts"]) for r in rows]
    for res, r in zip(results, rows):
        res["llama_bench_avg_ts"], res["llama_bench_stddev_ts"] = r["avg_ts"], r["stddev_ts"]
    first = rows[0]
    about = {k: first.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends",
                                       "model_type", "n_batch", "n_ubatch", "type_k", "type_v",
                                       "flash_attn", "repack")}
    about["command"] = " ".join(cmd)
    return results, about


# --- report ---------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               stdout=subprocess.PIPE, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def result_path(out_dir: str, cpu: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower().replace("(r)", "").replace("(tm)", "")).strip("-")
    base = os.path.join(out_dir, "%s_cpu-%s_cpu" % (datetime.date.today().isoformat(), slug))
    path, n = base + ".json", 2
    while os.path.exists(path):
        path, n = "%s_%d.json" % (base, n), n + 1
    return path


def print_table(rows: list) -> None:
    print("\n%-14s %22s %22s %7s" % ("test", "ours t/s (ms/tok)", "llama.cpp t/s (ms/tok)", "ratio"))
    for r in rows:
        cell = lambda x: "-" if x is None else "%8.2f +- %5.2f (%.2f)" % (
            x["tps_mean"], x["tps_sd"], x["ms_per_token"])
        ratio = "-" if r["ratio"] is None else "%.3f" % r["ratio"]
        print("%-14s %22s %22s %7s" % (r["test"], cell(r["ours"]), cell(r["llama_cpp"]), ratio))


def find_model(name: str) -> str:
    try:
        from clusterkv_local.models import model_path
        return model_path(name)
    except Exception as exc:  # fall back to the plain folders
        for folder in (os.environ.get("CLUSTERKV_MODELS_DIR"), "/tmp/models"):
            if folder and os.path.isfile(os.path.join(folder, DEFAULT_FILE)):
                return os.path.join(folder, DEFAULT_FILE)
        raise SystemExit("no model: %s; pass --model PATH" % exc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF path or registry name (default: %s)" % DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (>= 3), after one warm-up")
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--depths", default="0,2048,4096", help="comma-separated prefill depths")
    ap.add_argument("--llama-bench", help="llama-bench binary (default: build it with llama_cpp_build.py)")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--kv-policy", default="full", choices=KV_POLICIES,
                    help="KV policy of our decode steps (llama.cpp always runs dense)")
    ap.add_argument("--kv-budget", type=int, default=1024, help="positions per head and step")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "bench", "results"))
    args = ap.parse_args(argv)
    if args.reps < 3:
        ap.error("--reps must be >= 3")
    args.depths = [int(d) for d in args.depths.split(",")]
    model = args.model if args.model and os.path.isfile(args.model) else find_model(args.model or DEFAULT_MODEL)
    tests = [(t[0], t[1], d) for d in args.depths for t in ((args.n_prompt, 0), (0, args.n_gen))]

    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        print("warning: load average %.2f before the run; numbers may be disturbed" % load_before,
              file=sys.stderr)
    llama, llama_about = [], None
    if not args.skip_llama_cpp:
        exe, build_info = llama_bench_path(args)
        llama, llama_about = bench_llama_cpp(exe, model, args)
        llama_about.update({k: build_info[k] for k in ("llama_cpp_python", "llama_cpp_commit", "amx")
                            if k in build_info})
    ours = Ours(model, args.threads, args.kv_policy, args.kv_budget)
    mine = bench_ours(ours, tests, args.reps)

    by_test = {r["test"]: r for r in llama}
    rows = []
    for r in mine:
        ref = by_test.get(r["test"])
        rows.append({"test": r["test"], "ours": r, "llama_cpp": ref,
                     "ratio": r["tps_mean"] / ref["tps_mean"] if ref else None})
    info = ours.info()
    for row in rows:
        if row["test"].startswith("tg"):
            row["ours"]["gb_per_s"] = info["size"] * row["ours"]["tps_mean"] / 1e9
    cpu = cpu_name()
    record = {
        "bench": "cpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(), "library": library_path,
        "machine": {"cpu": cpu, "logical_cpus": os.cpu_count(), "system": platform.platform(),
                    "ckv_system_info": ffi.string(lib.ckv_system_info()).decode(),
                    "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0]},
        "model": {"file": os.path.basename(model), "path": model, **info},
        "kv": {"type": "f16", "policy": args.kv_policy,
               **({"budget": args.kv_budget} if args.kv_policy != "full" else {})},
        "threads": args.threads, "reps": args.reps, "warmup_dropped": 1,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "llama_cpp": llama_about, "results": rows,
    }
    print_table(rows)
    os.makedirs(args.out_dir, exist_ok=True)
    path = result_path(args.out_dir, cpu)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print("\nwritten to %s" % os.path.relpath(path, REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
