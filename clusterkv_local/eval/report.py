"""The evaluation report: a policy x budget table of metrics (with the full-KV row), written as
JSON and markdown, plus PNG plots when matplotlib is installed (the optional "eval" extra).
"""
import json
import os
from typing import Any, Dict, List, Optional

import numpy as np

from .tasks import TASKS


def _accuracy(cases: List[Dict[str, Any]], task: str) -> Optional[Dict[str, Any]]:
    rows = [c for c in cases if c["task"] == task]
    if not rows:
        return None
    n_ok = sum(c["correct"] for c in rows)
    return {"correct": n_ok, "total": len(rows), "accuracy": n_ok / len(rows)}


def _case_key(case: Dict[str, Any]) -> tuple:
    return case["task"], case["length"], case["depth"]


def table_rows(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per configuration: retrieval accuracy per task, the retrieval cases the full run
    solved and this one missed, teacher-forced metrics averaged over lengths, KV statistics."""
    full = next((r for r in runs if r["policy"] == "full"), None)
    full_ok = {_case_key(c) for c in full["cases"] if c["correct"]} if full else set()
    rows = []
    for run in runs:
        row = {"policy": run["policy"], "budget": run["budget"], "label": run["label"]}
        for task in TASKS:
            row[task] = _accuracy(run["cases"], task)
        ok = {_case_key(c) for c in run["cases"] if c["correct"]}
        ran = {_case_key(c) for c in run["cases"]}  # h2o may run on fewer lengths
        row["missed_vs_full"] = len((full_ok & ran) - ok) if full and ran else None
        tf = run["teacher_forced"]
        for key in ("top1_agreement", "kl_mean", "kl_p99", "ppl", "ppl_full"):
            row[key] = float(np.mean([t[key] for t in tf])) if tf else None
        stats = run.get("kv_stats") or {}
        row["density"] = stats.get("density")
        steps = stats.get("n_steps") or 0
        row["select_ms_per_step"] = stats["t_select_ms"] / steps if steps else None
        row["cluster_ms"] = stats.get("t_cluster_ms")
        row["decode_ms_per_token"] = run.get("decode_ms_per_token")
        rows.append(row)
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _acc(cell: Optional[Dict[str, Any]]) -> str:
    return "-" if cell is None else "%d/%d" % (cell["correct"], cell["total"])


def _name(row: Dict[str, Any]) -> str:
    """The policy with the row's own parameters, e.g. "clusterkv +select_per_kv_head=1"."""
    extra = row["label"].partition("+")[2]
    return row["policy"] + (" +" + extra.replace("+", " +") if extra else "")


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    head = ("| policy | budget | passkey | NIAH | NIAH multi | missed vs full | top-1 agree | "
            "KL mean | KL p99 | ppl (full) | density | select ms/step | decode ms/tok |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ppl = "-" if r["ppl"] is None else "%.2f (%.2f)" % (r["ppl"], r["ppl_full"])
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            _name(r), "-" if r["budget"] is None else r["budget"], _acc(r["passkey"]),
            _acc(r["niah"]), _acc(r["niah_multi"]), _fmt(r["missed_vs_full"], "d"),
            _fmt(r["top1_agreement"], ".3f"), _fmt(r["kl_mean"], ".4f"), _fmt(r["kl_p99"], ".3f"),
            ppl, _fmt(r["density"], ".3f"), _fmt(r["select_ms_per_step"], ".2f"),
            _fmt(r["decode_ms_per_token"], ".1f")))
    return "\n".join(lines) + "\n"


def markdown_report(result: Dict[str, Any]) -> str:
    s = result["settings"]
    intro = ("# KV-policy evaluation: %s\n\n%s, commit %s. Haystack: **%s** (%s); prompt format "
             "%s; lengths %s; depths %s; teacher-forced: %d new tokens after each length.\n"
             "Retrieval cells are correct/total over lengths x depths; teacher-forced metrics "
             "compare each decode step's logits with the full-KV run (KL(full || policy), nats), "
             "averaged over lengths. Missed vs full: retrieval cases the full cache solved and "
             "this configuration did not.\n\n"
             % (result["model"]["name"], result["date"], result["commit"] or "unknown",
                result["haystack"], result["haystack_detail"], s["prompt_format"],
                ", ".join(map(str, s["lengths"])), ", ".join(map(str, s["depths"])),
                s["tf_tokens"]))
    intro += ("Matmuls: %s.\n\n" % ("f32 activations (no 8-bit activation rounding: the "
                                      "metrics show the KV policy's own effect)"
                                      if s.get("f32_activations") else
                                      "8-bit activations as llama.cpp (the default; its rounding "
                                      "noise alone costs a few points of top-1 agreement)"))
    if s.get("n_gpu_layers"):
        intro += "Backend: the GPU (n_gpu_layers %d; %s).\n\n" % (
            s["n_gpu_layers"], result.get("machine", {}).get("system_info", "?"))
    if s.get("h2o_lengths") and any(r["policy"] == "h2o" for r in result["table"]):
        intro += ("h2o cannot take over a prefilled cache, so it prefills each case itself and "
                  "was run on lengths %s only (its cells count those cases; its teacher-forced "
                  "metrics average those lengths).\n\n" % ", ".join(map(str, s["h2o_lengths"])))
    return intro + markdown_table(result["table"])


def write_report(result: Dict[str, Any], json_path: str) -> List[str]:
    """Writes JSON, markdown (same stem, .md) and, with matplotlib, a PNG; returns the paths."""
    folder = os.path.dirname(os.path.abspath(json_path))
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(json_path)[0]
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(markdown_report(result))
    paths = [json_path, stem + ".md"]
    png = plot(result["table"], stem + ".png")
    if png:
        paths.append(png)
    return paths


_PLOTS = [("top1_agreement", "top-1 agreement with full KV"), ("kl_mean", "mean KL(full||policy)"),
          ("passkey", "passkey accuracy"), ("niah", "NIAH accuracy")]


def _metric(row: Dict[str, Any], key: str) -> Optional[float]:
    value = row.get(key)
    return value["accuracy"] if isinstance(value, dict) else value


def plot(rows: List[Dict[str, Any]], path: str) -> Optional[str]:
    """Metric vs budget, one line per policy, full KV dashed; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    full = next((r for r in rows if r["policy"] == "full"), None)
    # one line per policy and its own parameters, in the same colour on every panel
    names = list(dict.fromkeys(_name(r) for r in rows if r["policy"] != "full"))
    for ax, (key, title) in zip(axes.flat, _PLOTS):
        for i, name in enumerate(names):
            pts = [(r["budget"], _metric(r, key)) for r in rows if _name(r) == name
                   and _metric(r, key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, color="C%d" % (i % 10),
                        linestyle="-" if "+" not in name else ":")
        if full is not None and _metric(full, key) is not None:
            ax.axhline(_metric(full, key), color="black", linestyle="--", label="full")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (tokens)")
        ax.set_title(title)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
