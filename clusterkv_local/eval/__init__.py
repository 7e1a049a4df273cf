"""Long-context evaluation of the KV policies: `clusterkv-local eval` / `run_eval(EvalSettings())`.

    >>> from clusterkv_local.eval import EvalSettings, run_eval, write_report
    >>> result = run_eval(EvalSettings(lengths=(2048,), policies=("full", "clusterkv")))
    >>> write_report(result, "kv-eval.json")

Data flow: haystack.py (essays or synthetic text) -> tasks.py (passkey / NIAH cases, token
level) -> runner.py (each policy x budget: dense prefill, the query and answer as decode steps;
teacher-forced continuations against the full-KV logits, metrics.py; one dense prefill per case
shared by the policies through Llama.set_kv_policy) -> report.py (table, JSON, markdown, PNG).
"""
import datetime
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from .. import models
from .haystack import Haystack, load_haystack, synthetic_text
from .report import markdown_report, table_rows, write_report
from .tasks import FORMATS, PASSKEY_FILLER, TASKS, PromptKit, niah_case, passkey_case

ALL_POLICIES = ("full", "streaming", "quest", "h2o", "clusterkv")
ALL_TASKS = TASKS + ("tf",)


@dataclass
class EvalSettings:
    """What to evaluate. Lengths are total tokens (context + query); depths are in [0, 1]."""

    model: Optional[str] = None                  # registry name or GGUF path; None: default
    policies: Sequence[str] = ALL_POLICIES
    budgets: Sequence[int] = (256, 512, 1024, 2048)
    lengths: Sequence[int] = (2048, 4096)
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)
    tasks: Sequence[str] = ALL_TASKS
    tf_tokens: int = 256                         # teacher-forced decode steps per length
    n_keys: int = 4                              # needles in niah_multi
    prompt_format: str = "completion"            # or "chat"
    passkey_haystack: str = "filler"             # "filler" (classic) or "essays"
    passkey_repeat: int = 3                      # copies of the passkey sentence at the depth
    haystack: str = "auto"                       # auto | pg_essays | synthetic
    haystack_dir: Optional[str] = None           # a local essay folder (verified)
    n_threads: Optional[int] = None
    n_gpu_layers: int = 0                        # -1: the whole model on the GPU (every
                                                 # policy but h2o runs there)
    f32_activations: bool = False                # matmuls without 8-bit activations: removes
                                                 # the rounding noise that any tiny change of
                                                 # attention triggers (see Llama); slower
    seed: int = 0
    kv_policy_params: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per policy
    extra_configs: Sequence[str] = ()            # more rows, "clusterkv@1024:select_per_kv_head=1"
    h2o_lengths: Optional[Sequence[int]] = None  # h2o prefills itself: only these lengths (None:
                                                 # all); the other policies share one prefill

    def check(self) -> None:
        for p in self.policies:
            if p not in ALL_POLICIES:
                raise ValueError("unknown policy %r; valid: %s" % (p, ", ".join(ALL_POLICIES)))
        for t in self.tasks:
            if t not in ALL_TASKS:
                raise ValueError("unknown task %r; valid: %s" % (t, ", ".join(ALL_TASKS)))
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError("depths must be in [0, 1], got %s" % list(self.depths))
        if self.prompt_format not in FORMATS:
            raise ValueError("prompt_format must be one of %s" % ", ".join(FORMATS))
        if self.passkey_haystack not in ("filler", "essays"):
            raise ValueError("passkey_haystack must be filler or essays")
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError("lengths must be >= 64 tokens, got %s" % list(self.lengths))
        from .runner import parse_config
        for text in self.extra_configs:
            if parse_config(text).policy not in ALL_POLICIES:
                raise ValueError("extra configuration %r: unknown policy; valid: %s"
                                 % (text, ", ".join(ALL_POLICIES)))


# Tiny run for CI and smoke tests (well under a minute on 2 cores).
QUICK = dict(lengths=(192,), depths=(0.5,), budgets=(64,), tf_tokens=8,
             tasks=("passkey", "niah", "tf"))


def _prompt_kit(llm) -> PromptKit:
    def chat_wrap(user_text: str):
        rendered = llm.render_chat([{"role": "user", "content": user_text}])
        before, after = rendered.split("\x00")
        bos_text = llm._formatter().bos_token
        if bos_text and before.startswith(bos_text):
            before = before[len(bos_text):]
        return before, after

    def tokenize(text: str) -> List[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    bos = llm.token_bos()
    add_bos = bos >= 0 and llm._model.add_bos()
    return PromptKit(tokenize, lambda t: llm.detokenize([t]).decode("utf-8", "ignore"),
                     [bos] if add_bos else [], chat_wrap if llm.chat_format else None)


def build_cases(kit: PromptKit, settings: EvalSettings, hay_tokens: List[int],
                filler_tokens: List[int]) -> list:
    cases = []
    passkey_hay = filler_tokens if settings.passkey_haystack == "filler" else hay_tokens
    for length in settings.lengths:
        for depth in settings.depths:
            if "passkey" in settings.tasks:
                cases.append(passkey_case(kit, passkey_hay, length, depth, settings.seed,
                                          settings.prompt_format, settings.passkey_repeat))
            if "niah" in settings.tasks:
                cases.append(niah_case(kit, hay_tokens, length, depth, 1, settings.seed,
                                       settings.prompt_format))
            if "niah_multi" in settings.tasks:
                cases.append(niah_case(kit, hay_tokens, length, depth, settings.n_keys,
                                       settings.seed, settings.prompt_format))
    return cases


def _commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _tokens_for(kit: PromptKit, text: str, n_tokens: int) -> List[int]:
    """The first n_tokens tokens of text (tokenizing only a prefix long enough for them)."""
    n_chars = 6 * n_tokens + 1000
    while True:
        tokens = kit.tokenize(text[:n_chars])
        if len(tokens) >= n_tokens + 1 or n_chars >= len(text):
            return tokens[:n_tokens]
        n_chars *= 2


def run_eval(settings: EvalSettings, log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Runs every configuration; returns the JSON-ready result (see report.py for the table).

    Example:
        >>> result = run_eval(EvalSettings(**QUICK))
        >>> [row["label"] for row in result["table"]][:2]
        ['full', 'streaming@64']
    """
    from ..llama import Llama
    from .._internals import system_info
    from . import runner

    settings.check()
    model_path = models.resolve(settings.model, fetch=True)
    haystack = load_haystack(settings.haystack, settings.haystack_dir)
    log("haystack: %s (%s)" % (haystack.name, haystack.detail))
    n_new = settings.tf_tokens if "tf" in settings.tasks else 0
    n_ctx = max(settings.lengths) + max(n_new, 16) + 16
    configs = runner.policy_configs(settings.policies, settings.budgets, settings.extra_configs)
    if not configs:
        raise ValueError("no configuration to run: give at least one policy")

    start = time.perf_counter()
    with Llama(model_path, n_ctx=n_ctx, n_threads=settings.n_threads, seed=0,
               verbose=False, f32_activations=settings.f32_activations,
               n_gpu_layers=settings.n_gpu_layers) as llm:
        info = llm.model_info
        if n_ctx > info.n_ctx_train:
            log("warning: n_ctx %d exceeds the model's trained %d" % (n_ctx, info.n_ctx_train))
        kit = _prompt_kit(llm)
        need = max(settings.lengths) + n_new + 64
        hay_tokens = _tokens_for(kit, haystack.text, need)
        filler_tokens = _tokens_for(kit, PASSKEY_FILLER * (need // 20 + 10), need)
        if len(hay_tokens) < need:
            raise ValueError("the %s haystack has only %d tokens, %d needed"
                             % (haystack.name, len(hay_tokens), need))
        cases = build_cases(kit, settings, hay_tokens, filler_tokens)
        texts = [runner.teacher_text(L, hay_tokens, n_new, kit.bos)
                 for L in settings.lengths] if n_new else []
        meta = {"model": {"name": info.name, "file": os.path.basename(model_path),
                          "arch": info.arch, "n_params": info.n_params,
                          "n_ctx_train": info.n_ctx_train},
                "machine": {"platform": platform.platform(), "processor": platform.processor(),
                            "system_info": system_info(), "n_threads": llm.n_threads}}
        runs = runner.run_configs(llm, configs, cases, texts, settings.kv_policy_params, log,
                                  settings.h2o_lengths)
    return dict({"schema": 1, "bench": "kv-eval",
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "commit": _commit(), "haystack": haystack.name,
                 "haystack_detail": haystack.detail, "settings": asdict(settings),
                 "seconds": time.perf_counter() - start}, **meta,
                runs=runs, table=table_rows(runs))


__all__ = ["ALL_POLICIES", "ALL_TASKS", "EvalSettings", "Haystack", "QUICK", "load_haystack",
           "markdown_report", "run_eval", "synthetic_text", "table_rows", "write_report"]
