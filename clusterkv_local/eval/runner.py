"""Runs the evaluation: every (policy, budget) on the retrieval cases and on teacher-forced
continuations, against the full-KV reference.

Cost model (CPU): the dense prefill dominates, and a policy's state (clusters, page bounds,
heavy-hitter scores) is built from it, so each configuration prefills each case itself. What is
shared: the model (mmapped once per Llama, cheap), the tokenized haystack and cases, and the
full-KV teacher-forced logits, computed once and compared step by step (never stored per policy).
One Llama per configuration serves all its cases: Llama.eval truncates the context back to the
empty cache between cases.
"""
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from .._internals import kv_policies_available, kv_policy_defaults
from ..llama import Llama
from . import tasks as _tasks
from .metrics import StepFidelity


class PolicyConfig(NamedTuple):
    policy: str
    budget: Optional[int]  # None for full

    @property
    def label(self) -> str:
        return self.policy if self.budget is None else "%s@%d" % (self.policy, self.budget)


def policy_configs(policies: Sequence[str], budgets: Sequence[int]) -> List[PolicyConfig]:
    """full once (first), then every other policy at every budget.

    Example:
        >>> [c.label for c in policy_configs(["full", "quest"], [256, 512])]
        ['full', 'quest@256', 'quest@512']
    """
    configs = [PolicyConfig("full", None)] if "full" in policies else []
    configs += [PolicyConfig(p, b) for p in policies if p != "full" for b in budgets]
    return configs


def config_params(config: PolicyConfig,
                  params_by_policy: Dict[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The kv_policy_params of a configuration. ClusterKV always attends its sinks and its
    unclustered recent tail (up to recluster_interval positions), so the library requires
    budget >= n_sink + recluster_interval; below that (B = 256 with the default 16 + 320) the
    interval is lowered to half the budget left after the sinks, unless it was given."""
    params = dict(params_by_policy.get(config.policy) or {})
    if config.policy == "clusterkv" and "recluster_interval" not in params:
        defaults = kv_policy_defaults()
        n_sink = params.get("n_sink", defaults["n_sink"])
        if config.budget < n_sink + defaults["recluster_interval"]:
            params["recluster_interval"] = max(1, (config.budget - n_sink) // 2)
    return params or None


def open_llama(model_path: str, config: PolicyConfig, n_ctx: int, n_threads: Optional[int],
               params_by_policy: Dict[str, Dict[str, Any]]) -> Llama:
    return Llama(model_path, n_ctx=n_ctx, n_threads=n_threads, seed=0, verbose=False,
                 kv_policy=config.policy, kv_budget=config.budget,
                 kv_policy_params=config_params(config, params_by_policy))


def _last_row(llm: Llama) -> np.ndarray:
    return llm.scores[llm.n_tokens - 1]


def answer_case(llm: Llama, case: _tasks.Case) -> str:
    """Dense prefill of the context, the query one decode step per token, then greedy tokens
    (stopping at end-of-generation or a newline after some text). Returns the reply text."""
    llm.reset()
    llm.eval(case.context)
    for token in case.query:
        llm.eval([token])
    reply = []
    for _ in range(case.max_new):
        token = int(np.argmax(_last_row(llm)))
        if llm._model.is_eog(token):
            break
        reply.append(token)
        text = llm.detokenize(reply).decode("utf-8", errors="ignore")
        if "\n" in text.strip():
            break
        llm.eval([token])
    return llm.detokenize(reply).decode("utf-8", errors="ignore")


def teacher_forced(llm: Llama, prompt: Sequence[int], continuation: Sequence[int],
                   on_row: Callable[[int, np.ndarray], None]) -> None:
    """Dense prefill of prompt, then continuation[:-1] one decode step each; on_row(i, logits)
    gets the logits predicting continuation[i + 1]."""
    llm.reset()
    llm.eval(list(prompt))
    for i, token in enumerate(continuation[:-1]):
        llm.eval([int(token)])
        on_row(i, _last_row(llm))


class TeacherText(NamedTuple):
    length: int
    prompt: List[int]
    continuation: List[int]
    reference: np.ndarray  # [len(continuation) - 1, n_vocab] float32, full-KV logits


def full_reference(llm: Llama, length: int, hay_tokens: Sequence[int], n_new: int,
                   bos: List[int]) -> TeacherText:
    prompt = bos + list(hay_tokens[:length - len(bos)])
    continuation = list(hay_tokens[length - len(bos):length - len(bos) + n_new])
    if len(continuation) < 2:
        raise ValueError("the haystack is too short for %d + %d tokens" % (length, n_new))
    rows = np.empty((len(continuation) - 1, llm.n_vocab()), dtype=np.float32)

    def keep(i: int, row: np.ndarray) -> None:
        rows[i] = row

    teacher_forced(llm, prompt, continuation, keep)
    return TeacherText(length, prompt, continuation, rows)


def compare_to_reference(llm: Llama, text: TeacherText) -> Dict[str, Any]:
    fidelity = StepFidelity()
    teacher_forced(llm, text.prompt, text.continuation,
                   lambda i, row: fidelity.add(text.reference[i], row, text.continuation[i + 1]))
    return dict(length=text.length, **fidelity.summary())


def run_config(llm: Llama, config: PolicyConfig, cases: Sequence[_tasks.Case],
               texts: Sequence[TeacherText], log: Callable[[str], None]) -> Dict[str, Any]:
    """All cases and teacher-forced texts through one configuration's Llama."""
    has_stats = kv_policies_available()
    if has_stats:
        llm.reset_kv_stats()
    llm.reset_timings()
    start = time.perf_counter()
    results = []
    for case in cases:
        reply = answer_case(llm, case)
        ok = _tasks.is_correct(case, reply)
        results.append({"task": case.task, "length": case.length, "depth": case.depth,
                        "needle_at": case.needle_at, "n_context": len(case.context),
                        "answer": case.answer, "reply": reply, "correct": ok})
        log("  %-16s %-10s L=%-5d depth=%.2f %s %r" % (config.label, case.task, case.length,
                                                      case.depth, "ok  " if ok else "MISS",
                                                      reply.strip()[:24]))
    fidelity = []
    for text in texts:
        if config.policy == "full":  # the reference itself
            fidelity.append(_full_row(text))
        else:
            fidelity.append(compare_to_reference(llm, text))
        log("  %-16s teacher-forced L=%d: %s" % (config.label, text.length, _short(fidelity[-1])))
    timings = llm.timings()
    return {"policy": config.policy, "budget": config.budget, "label": config.label,
            "kv_policy": llm.kv_policy, "cases": results, "teacher_forced": fidelity,
            "kv_stats": _stats_summary(llm.kv_stats()) if has_stats else None,
            "decode_ms_per_token": (timings["decode_ms"] / timings["decode_tokens"]
                                    if timings["decode_tokens"] else None),
            "prefill_ms": timings["prompt_ms"], "seconds": time.perf_counter() - start}


def _full_row(text: TeacherText) -> Dict[str, Any]:
    """The full-KV run's own metrics: agreement 1, KL 0, and its perplexity."""
    fidelity = StepFidelity()
    for i, row in enumerate(text.reference):
        fidelity.add(row, row, text.continuation[i + 1])
    return dict(length=text.length, **fidelity.summary())


def _short(row: Dict[str, Any]) -> str:
    return "agree %.3f, KL mean %.4f p99 %.4f, ppl %.2f (full %.2f)" % (
        row["top1_agreement"], row["kl_mean"], row["kl_p99"], row["ppl"], row["ppl_full"])


def _stats_summary(stats: Dict[str, Any]) -> Dict[str, Any]:
    """kv_stats without the per-layer cluster table (kept small for the report)."""
    out = {k: v for k, v in stats.items() if k != "clusters"}
    out["clusters_per_layer"] = [sum(row) for row in stats["clusters"]]
    return out
