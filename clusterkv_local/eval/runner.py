"""Runs the evaluation: every (policy, budget) on the retrieval cases and on teacher-forced
continuations, against the full-KV reference.

Cost model (CPU): the dense prefill of a 4k-8k context dominates (tens of seconds on 2 cores;
a case's query and answer are ~20 decode steps). Prefill is dense under every policy, so each
case is prefilled once, under `full`, and every configuration then truncates back to the
context, switches policy (Llama.set_kv_policy: quest rebuilds its page bounds from the cache,
clusterkv clusters at the first decode step) and decodes the query and answer; this is exactly
what a context created with that policy would compute (tests/python/test_kv_switch.py).
Teacher-forced texts likewise: one prefill, the full-KV continuation is the reference, then each
configuration decodes the same continuation from the same cache.
h2o cannot take over a cache (it scores positions by the prefill's attention weights), so it
keeps its own prefill per case and is run only on the lengths in `h2o_lengths` (all by default).
"""
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..llama import Llama, kv_param_from_text
from . import tasks as _tasks
from .metrics import StepFidelity


class PolicyConfig(NamedTuple):
    policy: str
    budget: Optional[int]                   # None for full
    extra: Tuple[Tuple[str, Any], ...] = ()  # kv_policy_params of this row only

    @property
    def label(self) -> str:
        base = self.policy if self.budget is None else "%s@%d" % (self.policy, self.budget)
        return base + "".join("+%s=%s" % kv for kv in self.extra)


def policy_configs(policies: Sequence[str], budgets: Sequence[int],
                   extra: Sequence[str] = ()) -> List[PolicyConfig]:
    """full once (first), then every other policy at every budget, then the extra rows.

    Example:
        >>> [c.label for c in policy_configs(["full", "quest"], [256, 512],
        ...                                  ["clusterkv@1024:select_per_kv_head=1"])]
        ['full', 'quest@256', 'quest@512', 'clusterkv@1024+select_per_kv_head=1']
    """
    configs = [PolicyConfig("full", None)] if "full" in policies else []
    configs += [PolicyConfig(p, b) for p in policies if p != "full" for b in budgets]
    return configs + [parse_config(text) for text in extra]


def parse_config(text: str) -> PolicyConfig:
    """"POLICY@BUDGET[:KEY=VALUE,...]" -> PolicyConfig (values typed by kv_param_from_text).

    Example:
        >>> parse_config("clusterkv@1024:select_per_kv_head=1")
        PolicyConfig(policy='clusterkv', budget=1024, extra=(('select_per_kv_head', 1),))
    """
    head, _, tail = text.partition(":")
    policy, at, budget = head.partition("@")
    if not at or not budget.strip().isdigit():
        raise ValueError("configuration %r: expected POLICY@BUDGET[:KEY=VALUE,...]" % text)
    extra = []
    for item in filter(None, (x.strip() for x in tail.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError("configuration %r: %r is not KEY=VALUE" % (text, item))
        extra.append((key.strip(), kv_param_from_text(key.strip(), value)))
    return PolicyConfig(policy.strip(), int(budget), tuple(extra))


def config_params(config: PolicyConfig,
                  params_by_policy: Dict[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The kv_policy_params of a configuration: the policy's entries of params_by_policy,
    then the configuration's own extras."""
    params = dict(params_by_policy.get(config.policy) or {})
    params.update(config.extra)
    return params or None


def _last_row(llm: Llama) -> np.ndarray:
    return llm.scores[llm.n_tokens - 1]


def switch_policy(llm: Llama, config: PolicyConfig, params_by_policy: Dict[str, Dict[str, Any]],
                  n_keep: int) -> None:
    """Back to the first n_keep tokens (the prefilled context), then config's policy."""
    llm.n_tokens = n_keep
    llm.set_kv_policy(config.policy, config.budget, config_params(config, params_by_policy))


def answer_from_context(llm: Llama, case: _tasks.Case) -> str:
    """With case.context evaluated: the query one decode step per token, then greedy tokens
    (stopping at end-of-generation or a newline after some text). Returns the reply text."""
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


def decode_continuation(llm: Llama, continuation: Sequence[int],
                        on_row: Callable[[int, np.ndarray], None]) -> None:
    """With the prompt evaluated: continuation[:-1] one decode step each; on_row(i, logits)
    gets the logits predicting continuation[i + 1]."""
    for i, token in enumerate(continuation[:-1]):
        llm.eval([int(token)])
        on_row(i, _last_row(llm))


class TeacherText(NamedTuple):
    length: int
    prompt: List[int]
    continuation: List[int]


def teacher_text(length: int, hay_tokens: Sequence[int], n_new: int, bos: List[int]) -> TeacherText:
    prompt = bos + list(hay_tokens[:length - len(bos)])
    continuation = list(hay_tokens[length - len(bos):length - len(bos) + n_new])
    if len(continuation) < 2:
        raise ValueError("the haystack is too short for %d + %d tokens" % (length, n_new))
    return TeacherText(length, prompt, continuation)


class _Tally:
    """One configuration's results, gathered over cases and texts (the policy is switched for
    each, so its kv_stats and timings are summed here)."""

    def __init__(self, config: PolicyConfig):
        self.config = config
        self.cases: List[Dict[str, Any]] = []
        self.fidelity: List[Dict[str, Any]] = []
        self.stats = dict(n_steps=0, n_attended=0, n_cached=0, t_cluster_ms=0.0, t_select_ms=0.0)
        self.clusters_per_layer: Optional[List[int]] = None
        self.decode_ms = 0.0
        self.decode_tokens = 0
        self.prefill_ms = 0.0  # only for configurations that prefill themselves (h2o)
        self.seconds = 0.0
        self.kv_policy: Optional[Dict[str, Any]] = None

    def start(self, llm: Llama) -> float:
        llm.reset_kv_stats()
        llm.reset_timings()
        return time.perf_counter()

    def finish(self, llm: Llama, t0: float) -> None:
        stats, timings = llm.kv_stats(), llm.timings()
        for key in self.stats:
            self.stats[key] += stats[key]
        self.clusters_per_layer = [sum(row) for row in stats["clusters"]]
        self.decode_ms += timings["decode_ms"]
        self.decode_tokens += timings["decode_tokens"]
        self.prefill_ms += timings["prompt_ms"]
        self.seconds += time.perf_counter() - t0
        self.kv_policy = llm.kv_policy

    def result(self) -> Dict[str, Any]:
        c, s = self.config, dict(self.stats)
        s["density"] = s["n_attended"] / s["n_cached"] if s["n_cached"] else None
        s["clusters_per_layer"] = self.clusters_per_layer  # after the last case
        return {"policy": c.policy, "budget": c.budget, "label": c.label,
                "extra": dict(c.extra), "kv_policy": self.kv_policy, "cases": self.cases,
                "teacher_forced": self.fidelity, "kv_stats": s,
                "decode_ms_per_token": (self.decode_ms / self.decode_tokens
                                        if self.decode_tokens else None),
                "prefill_ms": self.prefill_ms or None, "seconds": self.seconds}


def _case_row(case: _tasks.Case, reply: str) -> Dict[str, Any]:
    return {"task": case.task, "length": case.length, "depth": case.depth,
            "needle_at": case.needle_at, "n_context": len(case.context), "answer": case.answer,
            "reply": reply, "correct": _tasks.is_correct(case, reply)}


def _log_case(log: Callable[[str], None], label: str, row: Dict[str, Any]) -> None:
    log("  %-16s %-10s L=%-5d depth=%.2f %s %r" % (label, row["task"], row["length"],
                                                  row["depth"], "ok  " if row["correct"]
                                                  else "MISS", row["reply"].strip()[:24]))


def _run_case(llm: Llama, tallies: List[_Tally], case: _tasks.Case,
              params_by_policy: Dict[str, Dict[str, Any]], log: Callable[[str], None]) -> None:
    """One dense prefill of the case under full, then every (switching) configuration."""
    llm.reset()
    llm.set_kv_policy("full")
    llm.eval(case.context)
    for tally in tallies:
        switch_policy(llm, tally.config, params_by_policy, len(case.context))
        t0 = tally.start(llm)
        row = _case_row(case, answer_from_context(llm, case))
        tally.finish(llm, t0)
        tally.cases.append(row)
        _log_case(log, tally.config.label, row)


def _run_text(llm: Llama, tallies: List[_Tally], text: TeacherText,
              params_by_policy: Dict[str, Dict[str, Any]],
              log: Callable[[str], None]) -> np.ndarray:
    """One dense prefill of the prompt; full's continuation is the reference of the others
    (tallies holds a full one). Returns the reference logits."""
    llm.reset()
    llm.set_kv_policy("full")
    llm.eval(text.prompt)
    reference = np.empty((len(text.continuation) - 1, llm.n_vocab()), dtype=np.float32)
    for tally in sorted(tallies, key=lambda t: t.config.policy != "full"):  # full first
        switch_policy(llm, tally.config, params_by_policy, len(text.prompt))
        t0 = tally.start(llm)
        if tally.config.policy == "full":
            decode_continuation(llm, text.continuation, reference.__setitem__)
            row = _full_row(text, reference)
        else:
            fidelity = StepFidelity()
            decode_continuation(llm, text.continuation, lambda i, r: fidelity.add(
                reference[i], r, text.continuation[i + 1]))
            row = dict(length=text.length, **fidelity.summary())
        tally.finish(llm, t0)
        tally.fidelity.append(row)
        log("  %-16s teacher-forced L=%d: %s" % (tally.config.label, text.length, _short(row)))
    return reference


def _run_own_prefill(llm: Llama, tally: _Tally, cases: Sequence[_tasks.Case],
                     texts: Sequence[TeacherText], references: Dict[int, np.ndarray],
                     params_by_policy: Dict[str, Dict[str, Any]],
                     log: Callable[[str], None]) -> None:
    """A policy that must see the prefill (h2o): created empty, prefilled per case."""
    for case in cases:
        llm.reset()
        switch_policy(llm, tally.config, params_by_policy, 0)
        t0 = tally.start(llm)
        llm.eval(case.context)
        row = _case_row(case, answer_from_context(llm, case))
        tally.finish(llm, t0)
        tally.cases.append(row)
        _log_case(log, tally.config.label, row)
    for text in texts:
        llm.reset()
        switch_policy(llm, tally.config, params_by_policy, 0)
        t0 = tally.start(llm)
        llm.eval(text.prompt)
        fidelity = StepFidelity()
        ref = references[text.length]
        decode_continuation(llm, text.continuation, lambda i, r: fidelity.add(
            ref[i], r, text.continuation[i + 1]))
        tally.finish(llm, t0)
        tally.fidelity.append(dict(length=text.length, **fidelity.summary()))
        log("  %-16s teacher-forced L=%d: %s" % (tally.config.label, text.length,
                                                 _short(tally.fidelity[-1])))


def run_configs(llm: Llama, configs: Sequence[PolicyConfig], cases: Sequence[_tasks.Case],
                texts: Sequence[TeacherText], params_by_policy: Dict[str, Dict[str, Any]],
                log: Callable[[str], None],
                own_prefill_lengths: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
    """Every configuration on every case and text, through one Llama (created with n_ctx for
    the longest case). h2o configurations prefill themselves, on the cases and texts whose
    length is in own_prefill_lengths (None: all). Returns one result dict per configuration,
    in the order of configs."""
    tallies = [_Tally(c) for c in configs]
    shared = [t for t in tallies if t.config.policy != "h2o"]
    own = [t for t in tallies if t.config.policy == "h2o"]
    if texts and not any(t.config.policy == "full" for t in shared):
        shared.insert(0, _Tally(PolicyConfig("full", None)))  # the teacher-forced reference
    references: Dict[int, np.ndarray] = {}
    start = time.perf_counter()
    for case in cases:
        _run_case(llm, shared, case, params_by_policy, log)
    log("retrieval cases done for %d configurations (%.0f s)" % (len(shared),
                                                                 time.perf_counter() - start))
    for text in texts:
        references[text.length] = _run_text(llm, shared, text, params_by_policy, log)
    def keep(length: int) -> bool:
        return own_prefill_lengths is None or length in own_prefill_lengths

    for tally in own:
        _run_own_prefill(llm, tally, [c for c in cases if keep(c.length)],
                         [t for t in texts if keep(t.length)], references, params_by_policy, log)
        log("%s done (%.0f s so far)" % (tally.config.label, time.perf_counter() - start))
    by_config = {id(t.config): t for t in tallies}
    return [by_config[id(c)].result() for c in configs]


def _full_row(text: TeacherText, reference: np.ndarray) -> Dict[str, Any]:
    """The full-KV run's own metrics: agreement 1, KL 0, and its perplexity."""
    fidelity = StepFidelity()
    for i, row in enumerate(reference):
        fidelity.add(row, row, text.continuation[i + 1])
    return dict(length=text.length, **fidelity.summary())


def _short(row: Dict[str, Any]) -> str:
    return "agree %.3f, KL mean %.4f p99 %.4f, ppl %.2f (full %.2f)" % (
        row["top1_agreement"], row["kl_mean"], row["kl_p99"], row["ppl"], row["ppl_full"])
