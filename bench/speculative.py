"""Speculative decoding with prompt lookup (LlamaPromptLookupDecoding): time and forward passes.

Workload: the model copies a source file it was shown ("the same file again, unchanged"), a
task where the guesses are good, at temperature 0, --max-tokens tokens, for each guess length
in --n-pred (0 = no draft model). Each setting runs --reps times after a warm-up call that
evaluates the prompt (so the timed calls reuse it and time generation only); it records the
best wall time, tokens/s, forward passes and accepted tokens per pass, and checks that every
setting wrote the same text (the guesses never change the tokens).

Prints a table and writes bench/results/YYYY-MM-DD_<device>_speculative.json (or --out).

Example:
    python -m bench.speculative --threads 2 --n-pred 0,2,4,8
    python -m bench.speculative --n-gpu-layers -1 --n-pred 0,4,8,16
"""
import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from clusterkv_local import Llama, LlamaPromptLookupDecoding, models, system_info  # noqa: E402


def run(model: str, n_pred: int, args) -> dict:
    draft = LlamaPromptLookupDecoding(num_pred_tokens=n_pred) if n_pred else None
    source = open(os.path.join(ROOT, args.source), encoding="utf-8").read()[:args.source_chars]
    prompt = ("Here is a Python file:\n```python\n%s\n```\nThe same file again, unchanged:\n"
              "```python\n" % source)
    with Llama(model, n_ctx=args.ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
               draft_model=draft, verbose=False) as llm:
        llm(prompt, max_tokens=1, temperature=0)   # the prompt's KV, reused by the timed calls
        best, text, passes = None, None, 0
        for _ in range(args.reps):
            start = llm._n_decodes
            t0 = time.perf_counter()
            out = llm(prompt, max_tokens=args.max_tokens, temperature=0)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
            text, passes = out["choices"][0]["text"], llm._n_decodes - start
        n = out["usage"]["completion_tokens"]
    return {"n_pred": n_pred, "tokens": n, "seconds": round(best, 4), "tokens_per_s": round(n / best, 2),
            "passes": passes, "tokens_per_pass": round(n / passes, 2), "text": text}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: the registry's default model)")
    ap.add_argument("--n-pred", default="0,2,4,8", help="comma list of guess lengths (0: no draft)")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--source", default="clusterkv_local/speculative.py", help="the file to copy")
    ap.add_argument("--source-chars", type=int, default=1500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model = args.model or models.model_path(models.DEFAULT_MODEL)
    rows = [run(model, int(n), args) for n in args.n_pred.split(",")]
    same = len({r["text"] for r in rows}) == 1
    print("%6s %8s %10s %8s %12s" % ("n_pred", "seconds", "tokens/s", "passes", "tokens/pass"))
    for r in rows:
        print("%6d %8.3f %10.1f %8d %12.2f" % (r["n_pred"], r["seconds"], r["tokens_per_s"], r["passes"],
                                              r["tokens_per_pass"]))
    print("same text in every setting: %s" % same)
    device = "gpu" if args.n_gpu_layers else "cpu"
    out = args.out or os.path.join(ROOT, "bench", "results", "%s_%s_speculative.json"
                                   % (datetime.date.today().isoformat(), device))
    result = {"date": datetime.date.today().isoformat(), "system": system_info(),
              "model": os.path.basename(model), "threads": args.threads, "n_gpu_layers": args.n_gpu_layers,
              "max_tokens": args.max_tokens, "reps": args.reps, "same_text": same,
              "rows": [{k: v for k, v in r.items() if k != "text"} for r in rows]}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print("wrote %s" % out)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
