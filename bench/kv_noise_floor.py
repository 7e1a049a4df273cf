"""The noise floor of the KV-policy fidelity metrics: how far the full cache moves from itself.

Runs the eval harness's teacher-forced texts (clusterkv_local.eval: essays, a prompt of each
length, then --tf-tokens decode steps) twice with the full KV policy, once with an f16 and once
with an f32 KV cache, and reports top-1 agreement and KL(f16 || f32) per step, as the eval does
for a policy against full. With 8-bit activations (the default, as llama.cpp) the last-bit
differences of the KV precision flip activation rounding steps, so this floor is what any change
of attention costs before it is an approximation; with f32 activations it nearly vanishes.

    python bench/kv_noise_floor.py --lengths 4096,7800 --out bench/results/DATE_cpu_kv-noise-floor.json
"""
import argparse
import datetime
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from clusterkv_local import Llama, models  # noqa: E402
from clusterkv_local.eval import load_haystack, runner  # noqa: E402
from clusterkv_local.eval import _prompt_kit, _tokens_for  # noqa: E402
from clusterkv_local.eval.metrics import StepFidelity  # noqa: E402


def continuation_rows(path, text, n_ctx, threads, kv_type, f32_activations) -> np.ndarray:
    """Logits of every teacher-forced step of text, full KV cache of kv_type."""
    with Llama(path, n_ctx=n_ctx, n_threads=threads, verbose=False, type_k=kv_type,
               type_v=kv_type, f32_activations=f32_activations) as llm:
        llm.eval(text.prompt)
        rows = []
        runner.decode_continuation(llm, text.continuation, lambda i, row: rows.append(row.copy()))
    return np.array(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--lengths", default="4096,7800")
    ap.add_argument("--tf-tokens", type=int, default=384)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--modes", default="q8,f32", help="activation modes: q8 (default path), f32")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    path = models.resolve(args.model, fetch=True)
    haystack = load_haystack("auto", None)
    n_ctx = max(lengths) + args.tf_tokens + 32
    with Llama(path, vocab_only=True, verbose=False) as vocab:
        kit = _prompt_kit(vocab)
        hay = _tokens_for(kit, haystack.text, max(lengths) + args.tf_tokens + 64)
    rows = []
    for mode in args.modes.split(","):
        for length in lengths:
            text = runner.teacher_text(length, hay, args.tf_tokens, kit.bos)
            ref = continuation_rows(path, text, n_ctx, args.threads, "f16", mode == "f32")
            other = continuation_rows(path, text, n_ctx, args.threads, "f32", mode == "f32")
            fidelity = StepFidelity()
            for i in range(len(ref)):
                fidelity.add(ref[i], other[i], text.continuation[i + 1])
            row = dict(activations=mode, length=length, **fidelity.summary())
            rows.append(row)
            print("%-4s L=%-5d top-1 %.4f  KL mean %.2e  p99 %.2e" % (
                mode, length, row["top1_agreement"], row["kl_mean"], row["kl_p99"]), flush=True)
    result = {"bench": "kv-noise-floor", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "model": os.path.basename(path), "haystack": haystack.name,
              "compared": "full KV f16 vs full KV f32, teacher-forced", "tf_tokens": args.tf_tokens,
              "threads": args.threads, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("written to", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
