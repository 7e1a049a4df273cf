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

KV policies: --kv-policy NAME[:key=value,...] (repeatable) runs our decode under each policy in
the same run, repetitions interleaved policy by policy so that a load change on the machine hits
all of them alike; key=value pairs set struct ckv_kv_policy_params fields (budget,
select_per_kv_head, n_sink, ...). Per policy and depth it records the depth prefill's time and
the clustering time of the first decode step after it (clusterkv clusters lazily there), as a
share of that prefill; with `full` among them, each policy's decode speed-up over it.

Prints a table and writes bench/results/YYYY-MM-DD_cpu-<cpu>_cpu.json (never overwritten), or
--out PATH.

Example:
    python -m bench.cpu --threads 2 --reps 3          # from the repo root (or with the package installed)
    python -m bench.cpu --model /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf --skip-llama-cpp
    python -m bench.cpu --skip-llama-cpp --n-prompt 0 --depths 2048,4096 --kv-policy full \
        --kv-policy clusterkv --kv-policy clusterkv:select_per_kv_head=1   # KV decode speed-ups
    python -m bench.cpu --skip-llama-cpp --n-prompt 0 --depths 512 --batch-seqs 1,2,4,8
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


def parse_kv_policy(spec: str, budget: int) -> tuple:
    """'NAME[:key=value,...]' -> (label, {field: value}) with the policy and budget fields set."""
    name, _, rest = spec.partition(":")
    if name not in KV_POLICIES:
        raise ValueError("unknown KV policy %r in %r; valid: %s" % (name, spec, ", ".join(KV_POLICIES)))
    fields = {"policy": name, "budget": budget}
    valid = {f for f, _ in ffi.typeof("struct ckv_kv_policy_params").fields}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in valid or key == "policy":
            raise ValueError("bad KV policy parameter %r in %r; valid keys: %s"
                             % (item, spec, ", ".join(sorted(valid - {"policy"}))))
        fields[key] = float(value) if key == "recent_ratio" else int(value)
    if name == "full":
        fields.pop("budget")
    return spec, fields


class Ours:
    """A loaded model; contexts are made per depth, as llama-bench sizes n_ctx per test."""

    def __init__(self, path: str, threads: int, kv_policy: str = "full", kv_budget: int = 1024,
                 kv_fields: dict = None):
        params = ffi.new("struct ckv_model_params *")
        lib.ckv_model_default_params(params)
        out = ffi.new("ckv_model **")
        _check(lib.ckv_model_load(path.encode(), params, out), "ckv_model_load")
        self.model = out[0]
        self.threads = threads
        self.kv_policy, self.kv_budget = kv_policy, kv_budget
        self.kv_fields = kv_fields or {"policy": kv_policy, "budget": kv_budget}
        self.n_vocab = lib.ckv_vocab_n_tokens(self.model)
        self.bos = lib.ckv_token_bos(self.model) if lib.ckv_vocab_add_bos(self.model) else -1

    def context(self, n_ctx: int, n_seq_max: int = 1):
        params = ffi.new("struct ckv_context_params *")
        lib.ckv_context_default_params(params)
        params.n_ctx = n_ctx
        params.n_seq_max = n_seq_max
        params.n_threads = self.threads
        params.kv_type = lib.CKV_KV_F16
        for key, value in self.kv_fields.items():
            setattr(params.kv_policy, key,
                    getattr(lib, "CKV_KV_POLICY_" + value.upper()) if key == "policy" else value)
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


def time_test(ours: Ours, ctx, depth: int, n_prompt: int, n_gen: int, rng) -> tuple:
    """One repetition from the depth prefill; returns the wall and process CPU seconds of the
    timed part (CPU time counts every thread, spinning included)."""
    _check(lib.ckv_context_truncate(ctx, depth), "ckv_context_truncate")
    tokens = ours.random_tokens(rng, n_prompt or n_gen)
    t0, c0 = time.perf_counter(), time.process_time()
    if n_prompt:
        _check(lib.ckv_decode(ctx, tokens, n_prompt, False), "ckv_decode")
    for i in range(0 if n_prompt else n_gen):
        _check(lib.ckv_decode(ctx, tokens + i, 1, False), "ckv_decode")
    return time.perf_counter() - t0, time.process_time() - c0


def kv_stats(ctx) -> dict:
    st = ffi.new("struct ckv_kv_stats *")
    lib.ckv_context_get_kv_stats(ctx, st)
    return {"n_steps": st.n_steps, "t_cluster_ms": st.t_cluster_ms, "t_select_ms": st.t_select_ms,
            "attended_share": st.n_attended / st.n_cached if st.n_cached else 1.0}


def bench_ours(runs: list, tests: list, reps: int, seed: int = 1234) -> list:
    """runs: one Ours per KV policy. Every test runs under each policy with the repetitions
    interleaved (policy A, B, .., A, B, ..); each policy gets the same tokens. Returns per run
    its result rows and, per depth, the prefill time and the first decode step's clustering."""
    out = [{"results": [], "depth_prefill": {}} for _ in runs]
    for depth in sorted({d for _, _, d in tests}):
        ctx_cache = [{} for _ in runs]
        for n_prompt, n_gen, d in [t for t in tests if t[2] == depth]:
            n_ctx = depth + n_prompt + n_gen
            ctxs = []
            for i, ours in enumerate(runs):
                ctx = ctx_cache[i].get(n_ctx)
                if ctx is None:
                    ctx = ctx_cache[i][n_ctx] = ours.context(n_ctx)
                    if depth:  # untimed prefill, reused by every repetition
                        tokens = ours.random_tokens(np.random.default_rng(seed + depth), depth)
                        t0 = time.perf_counter()
                        _check(lib.ckv_decode(ctx, tokens, depth, False), "ckv_decode (depth prefill)")
                        out[i]["depth_prefill"][depth] = {"prefill_ms": 1e3 * (time.perf_counter() - t0)}
                ctxs.append(ctx)
            secs = [[] for _ in runs]
            for rep in range(reps + 1):  # repetition 0 is the warm-up, dropped
                for i, (ours, ctx) in enumerate(zip(runs, ctxs)):
                    lib.ckv_context_reset_kv_stats(ctx)
                    rng = np.random.default_rng(seed + 7919 * rep + n_prompt)
                    wall, cpu = time_test(ours, ctx, depth, n_prompt, n_gen, rng)
                    first = out[i]["depth_prefill"].get(depth)
                    if rep == 0 and n_gen and first is not None and "t_cluster_ms" not in first:
                        first["t_cluster_ms"] = kv_stats(ctx)["t_cluster_ms"]  # clusters lazily
                        first["cluster_share_of_prefill"] = first["t_cluster_ms"] / first["prefill_ms"]
                    if rep:
                        secs[i].append((wall, cpu))
            n = n_prompt or n_gen
            for i, ours in enumerate(runs):
                res = summarise(n_prompt, n_gen, depth, [n / w for w, _ in secs[i]])
                res["cpu_ms_per_token"] = statistics.median(1e3 * c / n for _, c in secs[i])
                if n_gen:
                    res["kv_stats_last_rep"] = kv_stats(ctxs[i])
                out[i]["results"].append(res)
                print("  ours  %-22s %-14s %8.2f t/s (median %.2f, cpu %.2f ms/tok)"
                      % (ours.label, test_name(n_prompt, n_gen, depth), res["tps_mean"],
                         res["tps_median"], res["cpu_ms_per_token"]), file=sys.stderr)
    return out


def bench_batch(ours: Ours, n_seqs: list, n_gen: int, depth: int, reps: int, seed: int = 99) -> list:
    """Batched decoding (ckv_decode_batch): for each n in n_seqs, n sequences prefilled to
    `depth` (untimed), then n_gen steps that each decode one token of every sequence. Returns
    per n the aggregate tokens/s (n * steps / s) and the steps/s, best of the repetitions."""
    n_max = max(n_seqs)
    ctx = ours.context(depth + n_gen * (reps + 1) + 1, n_max)
    for s in range(n_max if depth else 0):
        tokens = ours.random_tokens(np.random.default_rng(seed + s), depth)
        _check(lib.ckv_decode_seq(ctx, s, tokens, depth, False), "ckv_decode_seq (depth prefill)")
    out = []
    for n in n_seqs:
        seqs = ffi.new("int32_t[]", list(range(n)))
        rates = []
        for rep in range(reps + 1):   # repetition 0 is the warm-up, dropped
            for s in range(n):
                _check(lib.ckv_context_truncate_seq(ctx, s, depth), "ckv_context_truncate_seq")
            tokens = ours.random_tokens(np.random.default_rng(seed + rep), n * n_gen)
            t0 = time.perf_counter()
            for step in range(n_gen):
                _check(lib.ckv_decode_batch(ctx, tokens + step * n, seqs, n), "ckv_decode_batch")
            if rep:
                rates.append(n_gen / (time.perf_counter() - t0))
        best = max(rates)
        out.append({"test": "tg%d x %d seq @ d%d" % (n_gen, n, depth), "n_seq": n, "n_gen": n_gen,
                    "n_depth": depth, "steps_per_s": best, "tokens_per_s": n * best,
                    "samples_steps_per_s": rates})
        print("  ours  batch %d seq  %8.2f steps/s, %8.2f tokens/s aggregate" % (n, best, n * best),
              file=sys.stderr)
    return out


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


def kv_report(runs: list, per_policy: list) -> list:
    """Per policy: its fields, results, the depth prefills (with clustering share) and, when
    `full` ran too, the decode speed-up over it (ratio of median tokens/s, same test)."""
    full = next((p["results"] for r, p in zip(runs, per_policy) if r.kv_policy == "full"), None)
    report = []
    for ours, res in zip(runs, per_policy):
        entry = {"label": ours.label, "params": ours.kv_fields, "results": res["results"],
                 "depth_prefill": res["depth_prefill"]}
        if full is not None:
            base = {r["test"]: r for r in full}
            entry["speedup_vs_full"] = {r["test"]: r["tps_median"] / base[r["test"]]["tps_median"]
                                        for r in res["results"] if r["test"] in base}
        report.append(entry)
    return report


def print_kv_table(report: list) -> None:
    print("\n%-40s %-14s %10s %10s %9s %9s" % ("KV policy", "test", "median t/s", "cpu ms/tok",
                                               "vs full", "cluster%"))
    for entry in report:
        for r in entry["results"]:
            pre = entry["depth_prefill"].get(r["n_depth"], {})
            share = pre.get("cluster_share_of_prefill")
            print("%-40s %-14s %10.2f %10.2f %9s %9s" % (
                entry["label"], r["test"], r["tps_median"], r["cpu_ms_per_token"],
                "%.2fx" % entry["speedup_vs_full"][r["test"]] if "speedup_vs_full" in entry else "-",
                "-" if share is None else "%.1f%%" % (100 * share)))


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
    ap.add_argument("--kv-policy", action="append",
                    help="KV policy of our decode steps, NAME[:key=value,...] (e.g. "
                         "clusterkv:select_per_kv_head=1); repeat to compare policies in one run "
                         "(default full; llama.cpp always runs dense)")
    ap.add_argument("--kv-budget", type=int, default=1024, help="positions per head and step")
    ap.add_argument("--batch-seqs", default="", help="comma-separated sequence counts for "
                    "batched decoding (ckv_decode_batch, first --kv-policy, at the first depth, "
                    "n_gen steps); e.g. 1,2,4. Empty: skipped")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--out", help="result file (default: dated name in --out-dir)")
    args = ap.parse_args(argv)
    if args.reps < 3:
        ap.error("--reps must be >= 3")
    args.depths = [int(d) for d in args.depths.split(",")]
    try:
        kv_runs = [parse_kv_policy(spec, args.kv_budget) for spec in args.kv_policy or ["full"]]
    except ValueError as exc:
        ap.error(str(exc))
    model = args.model if args.model and os.path.isfile(args.model) else find_model(args.model or DEFAULT_MODEL)
    tests = [(t[0], t[1], d) for d in args.depths for t in ((args.n_prompt, 0), (0, args.n_gen))
             if t[0] or t[1]]

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
    runs = []
    for label, fields in kv_runs:
        runs.append(Ours(model, args.threads, fields["policy"], fields.get("budget", args.kv_budget),
                         fields))
        runs[-1].label = label
    per_policy = bench_ours(runs, tests, args.reps)
    ours, mine = runs[0], per_policy[0]["results"]
    batch = bench_batch(ours, [int(n) for n in args.batch_seqs.split(",")], args.n_gen,
                        args.depths[0], args.reps) if args.batch_seqs else []

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
        "kv": {"type": "f16", "policy": ours.kv_policy,
               **({"budget": ours.kv_budget} if ours.kv_policy != "full" else {})},
        "kv_policies": kv_report(runs, per_policy),
        "threads": args.threads, "reps": args.reps, "warmup_dropped": 1,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "llama_cpp": llama_about, "results": rows, "batch": batch,
    }
    print_table(rows)
    if len(runs) > 1:
        print_kv_table(record["kv_policies"])
    os.makedirs(args.out_dir, exist_ok=True)
    path = args.out or result_path(args.out_dir, cpu)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print("\nwritten to %s" % os.path.relpath(path, REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
