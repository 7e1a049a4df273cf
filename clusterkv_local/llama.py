"""The user API: `Llama`, signature-compatible with llama-cpp-python for the common calls.

Data flow: Llama.__init__ loads a _Model and a _Context (_internals.py) -> tokenize -> eval
(ckv_decode) -> sample (ckv_sampler) -> generate (token iterator, longest-prefix KV reuse) ->
create_completion (stop strings, UTF-8-safe streaming, OpenAI-shaped dicts) ->
create_chat_completion (chat.py renders the GGUF's Jinja2 template).

Compatibility rules: keyword names, defaults and return shapes follow llama-cpp-python 0.3.x.
Unknown keywords raise TypeError; llama-cpp-python keywords we accept but do not implement warn
when given a non-default value (never a silent no-op). Deviations are listed in the docstrings
of the methods concerned.
"""
import fnmatch
import math
import os
import random
import sys
import time
import uuid
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import models as _models
from ._ffi import ffi
from ._internals import (KV_POLICIES, KV_POLICY_FIELDS, KV_TYPES, ModelInfo, SamplerParams,
                         TensorInfo, _Context, _Grammar, _Model, _Sampler, logits_to_logprobs,
                         system_info, token_array)
from .cache import BaseLlamaCache, LlamaState, longest_token_prefix
from .chat import ChatFormatter, resolve_chat_format
from .grammar import LlamaGrammar, as_grammar
from .json_schema import JSON_GBNF
from .speculative import LlamaDraftModel
from .tool_calls import (auto_tool_names, chunks_with_calls, forced_call, is_legacy,
                         parse_tool_calls, response_with_calls)

__version__ = "0.1.0"

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # as llama.cpp: "pick a random seed"

# llama-cpp-python constructor keywords accepted but not implemented, with the value at which
# they do nothing (no warning then).
_UNIMPLEMENTED_INIT = {
    "split_mode": 1, "main_gpu": 0, "tensor_split": None,
    "kv_overrides": None, "n_ubatch": 512, "n_threads_batch": None, "rope_scaling_type": -1,
    "attention_type": -1,
    "yarn_ext_factor": -1.0, "yarn_attn_factor": 1.0, "yarn_beta_fast": 32.0,
    "yarn_beta_slow": 1.0, "yarn_orig_ctx": 0, "offload_kqv": True,
    "flash_attn": False, "op_offload": None, "swa_full": None, "no_perf": False,
    "lora_base": None, "lora_scale": 1.0, "lora_path": None, "numa": False,
    "chat_handler": None, "tokenizer": None, "spm_infill": False,
}


def _warn_unimplemented(name: str, value: Any) -> None:
    warnings.warn("clusterkv_local.Llama: %s=%r is accepted for llama-cpp-python compatibility "
                  "but not implemented; it has no effect" % (name, value), UserWarning,
                  stacklevel=4)


def _warn_sampling(tfs_z: float = 1.0, penalize_nl: bool = True) -> None:
    # llama.cpp itself dropped both (tail-free sampling; the newline exemption from penalties).
    for name, value, noop in (("tfs_z", tfs_z, 1.0), ("penalize_nl", penalize_nl, True)):
        if value != noop:
            _warn_unimplemented(name, value)


# llama.cpp's pooling types (llama-cpp-python: llama_cpp.LLAMA_POOLING_TYPE_*). RANK needs a
# classifier head, which none of the supported architectures has.
LLAMA_POOLING_TYPE_UNSPECIFIED = -1
LLAMA_POOLING_TYPE_NONE = 0
LLAMA_POOLING_TYPE_MEAN = 1
LLAMA_POOLING_TYPE_CLS = 2
LLAMA_POOLING_TYPE_LAST = 3
_POOLING_NAMES = {"none": LLAMA_POOLING_TYPE_NONE, "mean": LLAMA_POOLING_TYPE_MEAN,
                  "cls": LLAMA_POOLING_TYPE_CLS, "last": LLAMA_POOLING_TYPE_LAST}


def _pooling_type(pooling_type: Any, metadata: Dict[str, str], arch: str) -> int:
    """The pooling embed() applies: the one asked for, else the GGUF's {arch}.pooling_type,
    else none (per-token vectors), as llama.cpp resolves LLAMA_POOLING_TYPE_UNSPECIFIED."""
    if isinstance(pooling_type, str):
        if pooling_type.lower() not in _POOLING_NAMES:
            raise ValueError("pooling_type must be one of %s or -1 (the model's), got %r"
                             % (", ".join(_POOLING_NAMES), pooling_type))
        return _POOLING_NAMES[pooling_type.lower()]
    pooling_type = _require_int("pooling_type", pooling_type, -1)
    if pooling_type == LLAMA_POOLING_TYPE_UNSPECIFIED:
        text = metadata.get(arch + ".pooling_type", "")
        pooling_type = int(text) if text.strip().lstrip("-").isdigit() else LLAMA_POOLING_TYPE_NONE
    if pooling_type not in _POOLING_NAMES.values():
        raise ValueError("pooling_type %d is not supported (none 0, mean 1, cls 2, last 3)"
                         % pooling_type)
    return pooling_type


def _pool(rows: np.ndarray, pooling_type: int) -> np.ndarray:
    """One input's [n_tokens, n_embd] hidden states -> its embedding (rows when none)."""
    if pooling_type == LLAMA_POOLING_TYPE_MEAN:
        return rows.mean(axis=0, dtype=np.float64).astype(np.float32)
    if pooling_type == LLAMA_POOLING_TYPE_CLS:
        return rows[0]
    if pooling_type == LLAMA_POOLING_TYPE_LAST:
        return rows[-1]
    return rows


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Unit length along the last axis (llama-cpp-python's normalize=True); zero rows stay."""
    norm = np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Logits processors and stopping criteria (llama-cpp-python's list types)
# ---------------------------------------------------------------------------------------------


class LogitsProcessorList(list):
    """Callables `(input_ids: np.intc[n], scores: np.float32[n_vocab]) -> scores`, in order."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class StoppingCriteriaList(list):
    """Callables `(input_ids, logits) -> bool`; generation stops when any returns True."""

    def __call__(self, input_ids: np.ndarray, logits: np.ndarray) -> bool:
        return any(criterion(input_ids, logits) for criterion in self)


def _logit_bias_processor(bias: Dict[int, float], n_vocab: int) -> Callable:
    ids = np.array([int(k) for k in bias], dtype=np.int64)
    values = np.array([float(v) for v in bias.values()], dtype=np.float32)
    if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
        raise ValueError("logit_bias token ids must be in [0, %d)" % n_vocab)
    if np.isnan(values).any():   # -inf (ban a token) and +inf (force it) are meaningful; NaN is not
        raise ValueError("logit_bias values must not be NaN")

    def apply(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = np.array(scores, dtype=np.float32, copy=True)
        out[ids] += values
        return out

    return apply


# ---------------------------------------------------------------------------------------------
# Streaming text: UTF-8 holdback and stop strings (pure Python, unit-tested directly)
# ---------------------------------------------------------------------------------------------


def utf8_complete_len(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside an unfinished UTF-8
    sequence: the bytes after it could still become a character when more bytes arrive.

    Example:
        >>> utf8_complete_len("é".encode()[:1])
        0
    """
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if byte < 0x80:
            return n
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else \
            4 if byte & 0xF8 == 0xF0 else 1
        return n - back if back < need else n
    return n  # only stray continuation bytes: invalid, nothing to wait for


def stop_holdback(data: bytes, stops: Sequence[bytes]) -> int:
    """Bytes at the end of `data` that are a proper prefix of some stop string, i.e. that must
    not be streamed yet because they could turn out to be the start of a stop.

    Example:
        >>> stop_holdback(b"Hello wor", [b"world"])
        3
    """
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(data)), best, -1):
            if data.endswith(stop[:k]):
                best = k
                break
    return best


class TextAssembler:
    """Collects generated bytes, cuts them at the first stop string and hands out text chunks
    that never split a UTF-8 code point nor leak part of a stop string.

    Joining every take() and a final take(final=True) gives exactly text().
    """

    def __init__(self, stops: Sequence[bytes] = ()):
        self.stops = [s for s in stops if s]
        self._max_stop = max((len(s) for s in self.stops), default=0)
        self.data = bytearray()
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: bytes) -> bool:
        """Appends a token's bytes; returns True (and truncates) once a stop string appears."""
        start = max(0, len(self.data) - self._max_stop + 1)
        self.data += piece
        hits = [i for i in (self.data.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            del self.data[min(hits):]
            self.stopped = True
        return self.stopped

    def take(self, final: bool = False) -> str:
        """The next chunk of text that is safe to emit ("" if none yet)."""
        pending = bytes(self.data[self.emitted:])
        if not final:
            pending = pending[:len(pending) - stop_holdback(pending, self.stops)]
            pending = pending[:utf8_complete_len(pending)]
        self.emitted += len(pending)
        return pending.decode("utf-8", errors="ignore")

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", errors="ignore")


def _stop_bytes(stop: Union[None, str, Sequence[str]]) -> List[bytes]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    out = []
    for s in stop:
        if not isinstance(s, str):
            raise TypeError("stop must be a string or a list of strings, got %r" % (s,))
        if s:
            out.append(s.encode("utf-8"))
    return out


# ---------------------------------------------------------------------------------------------
# Parameter checks
# ---------------------------------------------------------------------------------------------


def _require_int(name: str, value: Any, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError("%s must be an int, got %r" % (name, value))
    if minimum is not None and value < minimum:
        raise ValueError("%s must be >= %d, got %d" % (name, minimum, value))
    return int(value)


def _require_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError("%s must be a number, got %r" % (name, value))
    if not math.isfinite(value):
        raise ValueError("%s must be finite, got %r" % (name, value))
    return float(value)


def _sampler_params(temp: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                    frequency_penalty: float, presence_penalty: float, penalty_last_n: int,
                    typical_p: float = 1.0, mirostat_mode: int = 0, mirostat_tau: float = 5.0,
                    mirostat_eta: float = 0.1) -> SamplerParams:
    """Validated native sampler settings. temp < 0 is llama-cpp-python's "plain distribution"
    (no truncation, no temperature); temp == 0 is greedy. mirostat_mode 1 or 2 replaces
    top_k / typical_p / top_p / min_p, as in llama-cpp-python."""
    temp = _require_float("temperature", temp)
    top_k = _require_int("top_k", top_k)
    top_p = _require_float("top_p", top_p)
    min_p = _require_float("min_p", min_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1], got %r" % top_p)
    if not 0.0 <= min_p <= 1.0:
        raise ValueError("min_p must be in [0, 1], got %r" % min_p)
    if _require_float("repeat_penalty", repeat_penalty) <= 0.0:
        raise ValueError("repeat_penalty must be > 0, got %r" % repeat_penalty)
    frequency_penalty = _require_float("frequency_penalty", frequency_penalty)
    presence_penalty = _require_float("presence_penalty", presence_penalty)
    if not 0.0 < _require_float("typical_p", typical_p) <= 1.0:
        raise ValueError("typical_p must be in (0, 1], got %r" % typical_p)
    if _require_int("mirostat_mode", mirostat_mode) not in (0, 1, 2):
        raise ValueError("mirostat_mode must be 0, 1 or 2, got %r" % mirostat_mode)
    if _require_float("mirostat_tau", mirostat_tau) <= 0.0:
        raise ValueError("mirostat_tau must be > 0, got %r" % mirostat_tau)
    if _require_float("mirostat_eta", mirostat_eta) < 0.0:
        raise ValueError("mirostat_eta must be >= 0, got %r" % mirostat_eta)
    if temp < 0.0:
        temp, top_k, top_p, min_p, typical_p, mirostat_mode = 1.0, 0, 1.0, 0.0, 1.0, 0
    return SamplerParams(temp, top_k, top_p, min_p, float(repeat_penalty), frequency_penalty,
                         presence_penalty, penalty_last_n, float(typical_p), int(mirostat_mode),
                         float(mirostat_tau), float(mirostat_eta))


def _as_processor(logits_processor: Any) -> Optional[Callable]:
    if logits_processor is None:
        return None
    if callable(logits_processor):
        return logits_processor
    return LogitsProcessorList(logits_processor)


def _kv_type(type_k: Any, type_v: Any) -> int:
    chosen = []
    for name, value in (("type_k", type_k), ("type_v", type_v)):
        if value is None:
            continue
        key = value.lower() if isinstance(value, str) else {0: "f32", 1: "f16"}.get(value)
        if key not in KV_TYPES:
            warnings.warn("%s=%r is not supported (KV cache types: f16, f32); using f16"
                          % (name, value), UserWarning, stacklevel=3)
            key = "f16"
        chosen.append(key)
    if len(set(chosen)) > 1:
        warnings.warn("type_k and type_v differ; this runtime keeps K and V in one type: using "
                      "f16", UserWarning, stacklevel=3)
        return KV_TYPES["f16"]
    return KV_TYPES[chosen[0]] if chosen else KV_TYPES["f16"]


# Which kv_policy_params keys each policy reads (budget is kv_budget; policy is kv_policy).
_KV_COMMON_KEYS = ("n_sink", "n_dense_layers")
_KV_POLICY_KEYS = {
    "full": (),
    "streaming": _KV_COMMON_KEYS,
    "quest": _KV_COMMON_KEYS + ("page_size",),
    "h2o": _KV_COMMON_KEYS + ("recent_ratio",),
    "clusterkv": _KV_COMMON_KEYS + ("recluster_interval", "tokens_per_cluster", "kmeans_iters",
                                    "seed", "select_per_kv_head", "kmeans_init"),
}
# kv_policy_params["kmeans_init"]: enum ckv_kmeans_init by name (the number works too)
KMEANS_INITS = {"random": 0, "strided": 1}
_KV_PARAM_KEYS = tuple(k for k in KV_POLICY_FIELDS if k not in ("policy", "budget"))


def kv_param_from_text(key: str, text: str) -> Any:
    """A kv_policy_params value written as text (CLI --kv-param, eval --extra): a float for the
    float fields, a name or a number for kmeans_init, an int otherwise. Keys and ranges are
    checked later, by kv_policy_settings and the library.

    Example:
        >>> kv_param_from_text("recent_ratio", "0.25"), kv_param_from_text("kmeans_init", "strided")
        (0.25, 'strided')
    """
    text = text.strip()
    if KV_POLICY_FIELDS.get(key) == "float":
        return float(text)
    if key == "kmeans_init" and not text.lstrip("-").isdigit():
        return text   # a name: random, strided
    return int(text)


def _kv_param_value(key: str, value: Any) -> Any:
    if KV_POLICY_FIELDS[key] == "float":
        return _require_float("kv_policy_params[%r]" % key, value)
    if key == "select_per_kv_head" and isinstance(value, bool):
        return int(value)
    if key == "kmeans_init" and isinstance(value, str):
        if value.lower() not in KMEANS_INITS:
            raise ValueError("kv_policy_params['kmeans_init']: unknown %r; valid: %s"
                             % (value, ", ".join(KMEANS_INITS)))
        return KMEANS_INITS[value.lower()]
    return _require_int("kv_policy_params[%r]" % key, value,
                        0 if KV_POLICY_FIELDS[key].startswith("uint") else None)


def kv_policy_settings(kv_policy: str = "full", kv_budget: Optional[int] = None,
                       kv_policy_params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Validated {field of struct ckv_kv_policy_params: value} for the native context.

    Names and keys are checked here (ValueError naming the valid choices); numeric ranges are
    checked by the library, whose message surfaces as InvalidArgumentError (a ValueError).

    Example:
        >>> kv_policy_settings("quest", 512, {"page_size": 32})
        {'policy': 2, 'budget': 512, 'page_size': 32}
    """
    if not isinstance(kv_policy, str) or kv_policy.lower() not in KV_POLICIES:
        raise ValueError("unknown kv_policy %r; valid policies: %s"
                         % (kv_policy, ", ".join(KV_POLICIES)))
    name = kv_policy.lower()
    params = dict(kv_policy_params or {})
    for key in params:
        if key in ("policy", "budget"):
            raise ValueError("kv_policy_params[%r]: give it as the kv_%s argument" % (key, key))
        if key not in _KV_PARAM_KEYS:
            raise ValueError("unknown kv_policy_params key %r; valid keys: %s"
                             % (key, ", ".join(_KV_PARAM_KEYS)))
        if key not in _KV_POLICY_KEYS[name]:
            users = [p for p, keys in _KV_POLICY_KEYS.items() if key in keys]
            raise ValueError("kv_policy_params[%r] is not used by kv_policy=%r (it is used by %s);"
                             " keys for %r: %s" % (key, name, ", ".join(users), name,
                                                   ", ".join(_KV_POLICY_KEYS[name]) or "none"))
    if name == "full" and kv_budget is not None:
        raise ValueError("kv_budget does not apply to kv_policy='full' (it attends every "
                         "position); choose one of %s" % ", ".join(p for p in KV_POLICIES
                                                                   if p != "full"))
    settings: Dict[str, Any] = {"policy": KV_POLICIES[name]}
    if kv_budget is not None:
        settings["budget"] = _require_int("kv_budget", kv_budget)
    for key, value in params.items():
        settings[key] = _kv_param_value(key, value)
    return settings


def _context_settings(n_ctx: Any, n_batch: Any, n_threads: Any) -> tuple:
    """Validated (n_ctx, n_batch, n_threads); n_threads None, 0 or -1 -> 0 (library default:
    the number of physical cores)."""
    n_ctx = _require_int("n_ctx", n_ctx, 0)
    n_batch = _require_int("n_batch", n_batch, 1)
    if n_threads is None or n_threads in (0, -1):
        n_threads = 0
    return n_ctx, n_batch, _require_int("n_threads", n_threads, 0)


class _CompletionState:
    """What one completion has produced so far."""

    def __init__(self, stops: List[bytes]):
        self.tokens: List[int] = []
        self.token_ends: List[int] = []  # byte offset in text.data where each token's piece ends
        self.text = TextAssembler(stops)
        self.finish_reason = "length"
        self.reported = 0  # tokens whose logprobs went out in a stream chunk


# ---------------------------------------------------------------------------------------------
# Llama
# ---------------------------------------------------------------------------------------------


class Llama:
    """A GGUF model with one context (KV cache) and a sampler.

    Example:
        >>> llm = Llama("SmolLM2-135M-Instruct.Q4_1.gguf", n_ctx=2048, verbose=False)
        >>> llm("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"]
        ' Paris...'

    One Llama is used by one thread at a time (as llama-cpp-python); use one per thread.
    """

    def __init__(self, model_path: str, *, n_gpu_layers: int = 0, vocab_only: bool = False,
                 use_mmap: bool = True, seed: int = LLAMA_DEFAULT_SEED, n_ctx: int = 512,
                 n_batch: int = 512, n_threads: Optional[int] = None, logits_all: bool = False,
                 last_n_tokens_size: int = 64, chat_format: Optional[str] = None,
                 type_k: Any = None, type_v: Any = None, verbose: bool = True,
                 metadata_only: bool = False, kv_policy: str = "full",
                 kv_budget: Optional[int] = None,
                 kv_policy_params: Optional[Dict[str, Any]] = None,
                 f32_activations: bool = False, n_seq_max: int = 1, kv_offload: bool = False,
                 embedding: bool = False, pooling_type: Any = LLAMA_POOLING_TYPE_UNSPECIFIED,
                 rope_freq_base: float = 0.0, rope_freq_scale: float = 0.0,
                 draft_model: Optional[LlamaDraftModel] = None, use_mlock: bool = False,
                 **kwargs: Any):
        """Loads `model_path`. Keywords as llama-cpp-python (all keyword-only).

        Extensions: `metadata_only=True` parses only metadata and the tensor table (works for
        any architecture; no tokenizer, no evaluation); `type_k`/`type_v` also take "f16"/"f32";
        `kv_policy` ("full", "streaming", "quest", "h2o", "clusterkv"), `kv_budget` (positions
        a query head attends to per decode step; clusterkv reads its unclustered recent tail,
        under recluster_interval positions, on top) and `kv_policy_params` (the other fields of
        struct ckv_kv_policy_params, e.g. {"n_sink": 16, "tokens_per_cluster": 80}) choose how
        decode steps read the KV cache (prefill is always dense); see kv_stats().
        `f32_activations=True` multiplies f32 activations by dequantised weights instead of
        quantising activations to 8 bits (slower; a low-noise reference for comparing KV
        policies or precisions, CPU only).
        `n_seq_max` sequences (each with its own KV cache of n_ctx positions) let
        create_completion_batch() decode several prompts together (CPU and GPU).
        `kv_offload=True` (GPU, kv_policy="clusterkv") keeps the KV cache of the compressed
        layers in pinned host memory and on the GPU only the rows recent decode steps selected
        (see kv_memory()), so the context is bounded by host RAM; prefill then copies each
        layer's earlier rows in per chunk, so a long prompt wants a large n_batch (e.g. 4096).
        `embedding=True` keeps each evaluated token's final-normed hidden state for embed() and
        create_embedding() (CPU or GPU); `pooling_type` (-1: the GGUF's, else none; or "none",
        "mean", "cls", "last") says how embed() pools a text's token vectors.
        `rope_freq_base` / `rope_freq_scale` (0 = the file's) override the RoPE base and the
        position scale of the global-attention layers, to run past the trained context (e.g.
        rope_freq_scale=0.5 with twice the n_ctx; a state saved under other values does not
        load).
        `draft_model` (e.g. LlamaPromptLookupDecoding()) guesses the next tokens so generation
        evaluates them with the sampled one in one pass and keeps those the sampler draws
        (speculative decoding: the same tokens, fewer passes; kv_policy "full" only, since a
        multi-token pass attends densely - other policies decode one token at a time).
        `n_gpu_layers=-1` (or >= the layer count) runs the whole model on the GPU in a CUDA
        build (clusterkv_local.system_info() says what the build has); no usable GPU raises
        CudaError, a CPU-only build UnsupportedError.
        Deviations: seed=0 is a real seed (llama-cpp-python turns 0 into "random");
        0 < n_gpu_layers < n_layer raises UnsupportedError (no partial offload); on the GPU
        every kv_policy but "h2o" and an f16 KV cache run (UnsupportedError otherwise).
        """
        # What pickling keeps: a pickled Llama is this constructor call again (as
        # llama-cpp-python), without the evaluated tokens.
        self._init_params = {k: v for k, v in locals().items() if k not in ("self", "kwargs")}
        self._init_params.update(kwargs)
        self.verbose = verbose
        self.model_path = os.fspath(model_path)
        self._model: Optional[_Model] = None
        self._ctx: Optional[_Context] = None
        self._sampler: Optional[_Sampler] = None
        self._grammar_state: Optional[_Grammar] = None  # native state of the last grammar used
        self.cache: Optional[BaseLlamaCache] = None
        if draft_model is not None and not callable(draft_model):
            raise TypeError("draft_model must be a LlamaDraftModel (a callable), got %r"
                            % (draft_model,))
        self.draft_model = draft_model
        self._closed = False
        self._check_kwargs(kwargs)
        n_ctx, n_batch, n_threads = _context_settings(n_ctx, n_batch, n_threads)
        kv_settings = kv_policy_settings(kv_policy, kv_budget, kv_policy_params)
        n_gpu_layers = _require_int("n_gpu_layers", n_gpu_layers, -1)
        self._on_gpu = n_gpu_layers != 0 and not (vocab_only or metadata_only)
        self._logits_all = bool(logits_all)
        self.last_n_tokens_size = _require_int("last_n_tokens_size", last_n_tokens_size, 0)
        self.set_seed(seed)
        t0 = time.perf_counter()
        try:
            self._model = _Model(self.model_path, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap,
                                 vocab_only=vocab_only, metadata_only=metadata_only,
                                 rope_freq_base=_require_float("rope_freq_base", rope_freq_base),
                                 rope_freq_scale=_require_float("rope_freq_scale",
                                                                rope_freq_scale),
                                 use_mlock=bool(use_mlock))
            self.metadata: Dict[str, str] = self._model.metadata()
            self._info: ModelInfo = self._model.info()
            self._n_vocab = self._info.n_vocab
            if vocab_only or metadata_only:
                self._n_ctx = n_ctx or self._info.n_ctx_train
                self.n_batch, self.n_threads = n_batch, n_threads
            else:
                for name, flag in (("f32_activations", f32_activations), ("kv_offload", kv_offload),
                                   ("embedding", embedding)):
                    if not isinstance(flag, bool):
                        raise TypeError("%s must be a bool, got %r" % (name, flag))
                self._pooling = _pooling_type(pooling_type, self.metadata, self._info.arch)
                self._load_context(n_ctx, n_batch, n_threads, _kv_type(type_k, type_v),
                                   kv_settings, f32_activations,
                                   _require_int("n_seq_max", n_seq_max, 1), kv_offload, embedding)
            self._chat = None if metadata_only else resolve_chat_format(chat_format,
                                                                         self.metadata)
        except BaseException:
            self.close()
            raise
        self.chat_format: Optional[str] = self._chat.name if self._chat else None
        self._chat_formatter: Optional[ChatFormatter] = None
        self.n_tokens = 0
        self.input_ids = np.zeros(self._n_ctx, dtype=np.intc)
        self._scores_buf = (np.zeros((self._n_ctx, self._n_vocab), dtype=np.single)
                            if self._logits_all and self._ctx is not None else None)
        self._n_decodes = 0
        self._last_row = (None, -1)  # (copy of the last logits row, decode count it belongs to)
        if verbose:
            self._print_summary(time.perf_counter() - t0)

    # --- construction helpers ---

    @staticmethod
    def _check_kwargs(kwargs: Dict[str, Any]) -> None:
        for name, value in kwargs.items():
            if name not in _UNIMPLEMENTED_INIT:
                raise TypeError("Llama() got an unexpected keyword argument %r" % name)
            if value != _UNIMPLEMENTED_INIT[name]:
                _warn_unimplemented(name, value)

    def _load_context(self, n_ctx: int, n_batch: int, n_threads: int, kv_type: int,
                      kv_settings: Dict[str, Any], f32_activations: bool = False,
                      n_seq_max: int = 1, kv_offload: bool = False,
                      embedding: bool = False) -> None:
        if n_ctx > 0:
            n_batch = min(n_ctx, n_batch)
        self._ctx = _Context(self._model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                             kv_type=kv_type, kv_policy=kv_settings,
                             f32_activations=f32_activations, n_seq_max=n_seq_max,
                             kv_offload=kv_offload, embeddings=embedding)
        self._embedding = embedding
        self._n_ctx = self._ctx.n_ctx()
        self.n_batch = self._ctx.n_batch()
        self.n_threads = self._ctx.n_threads()

    def _print_summary(self, seconds: float) -> None:
        info = self._info
        name = info.name or os.path.basename(self.model_path)
        print("clusterkv_local %s: loaded %s (%s, %d layers, %.1fM params, %.1f MiB) in %.2f s"
              % (__version__, name, info.arch, info.n_layer, info.n_params / 1e6,
                 info.size / 2**20, seconds), file=sys.stderr)
        if self._ctx is not None:
            print("clusterkv_local: n_ctx = %d (trained %d), n_batch = %d, n_threads = %d, "
                  "chat format = %s, runs on the %s | %s"
                  % (self._n_ctx, info.n_ctx_train, self.n_batch, self.n_threads,
                     self.chat_format, "GPU" if self._on_gpu else "CPU", system_info()),
                  file=sys.stderr)

    @classmethod
    def from_registry(cls, name: str = _models.DEFAULT_MODEL, **kwargs: Any) -> "Llama":
        """Loads a model of the registry (models/registry.json), fetching it once if needed.

        Example:
            >>> llm = Llama.from_registry("smollm2-135m-instruct", n_ctx=2048)
        """
        return cls(_models.model_path(name), **kwargs)

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: Optional[str],
                        additional_files: Optional[List[str]] = None,
                        local_dir: Optional[str] = None, cache_dir: Optional[str] = None,
                        **kwargs: Any) -> "Llama":
        """Downloads `filename` (an fnmatch glob, exactly one match) from a Hugging Face repo,
        then loads it, as llama-cpp-python. Needs `pip install huggingface-hub`.

        Example:
            >>> llm = Llama.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
            ...                             "*q4_k_m.gguf")
        """
        try:
            from huggingface_hub import HfFileSystem, hf_hub_download
        except ImportError:
            raise ImportError("Llama.from_pretrained needs huggingface-hub: "
                              "pip install 'clusterkv-local[hf]'") from None
        files = [f["name"] if isinstance(f, dict) else f
                 for f in HfFileSystem().ls(repo_id, recursive=True)]
        files = [str(Path(f).relative_to(repo_id)) for f in files]

        def one_match(pattern: str) -> str:
            matches = [f for f in files if fnmatch.fnmatch(f, pattern)]
            if len(matches) != 1:
                raise ValueError("%s files in %s match %r (need exactly one); files: %s"
                                 % ("No" if not matches else "Several", repo_id, pattern, files))
            return matches[0]

        def download(path: str) -> str:
            sub = str(Path(path).parent)
            return hf_hub_download(repo_id=repo_id, filename=Path(path).name,
                                   subfolder=None if sub == "." else sub,
                                   local_dir=local_dir, cache_dir=cache_dir)

        model_file = download(one_match(filename))
        for pattern in additional_files or []:
            download(one_match(pattern))
        return cls(model_path=model_file, **kwargs)

    # --- lifetime ---

    def close(self) -> None:
        """Frees the sampler, context and model now (idempotent); the object is unusable after."""
        for handle in (self._sampler, self._grammar_state, self._ctx, self._model):
            if handle is not None:
                handle.close()
        self._closed = True

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self._init_params)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state)

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _require_ctx(self) -> _Context:
        if self._closed:
            raise RuntimeError("this Llama has been closed")
        if self._ctx is None:
            raise RuntimeError("this Llama was loaded with vocab_only or metadata_only and "
                               "cannot evaluate tokens")
        return self._ctx

    # --- model facts ---

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self._n_vocab

    def n_embd(self) -> int:
        return self._info.n_embd

    def token_bos(self) -> int:
        return self._model.token_bos()

    def token_eos(self) -> int:
        return self._model.token_eos()

    @property
    def model_info(self) -> ModelInfo:
        """Architecture and size facts (arch, name, n_layer, n_head, n_params, ...)."""
        return self._info

    def tensors(self) -> List[TensorInfo]:
        """The GGUF tensor table: name, ggml type id and name, shape, offset, size."""
        if self._closed:
            raise RuntimeError("this Llama has been closed")
        return self._model.tensors()

    def timings(self) -> Dict[str, float]:
        """Prefill/decode token counts and milliseconds since the last reset_timings()."""
        t = self._require_ctx().timings()
        return {"prompt_ms": t.t_prefill_ms, "prompt_tokens": t.n_prefill,
                "decode_ms": t.t_decode_ms, "decode_tokens": t.n_decode}

    def reset_timings(self) -> None:
        self._require_ctx().reset_timings()

    # --- KV policy ---

    @property
    def kv_policy(self) -> Dict[str, Any]:
        """The context's KV-policy settings with the library's defaults filled in, e.g.
        {"policy": "clusterkv", "budget": 1024, "n_sink": 16, ...}."""
        settings = dict(self._require_ctx().kv_policy)
        names = {v: k for k, v in KV_POLICIES.items()}
        settings["policy"] = names.get(settings["policy"], settings["policy"])
        return settings

    def set_kv_policy(self, kv_policy: str, kv_budget: Optional[int] = None,
                      kv_policy_params: Optional[Dict[str, Any]] = None) -> None:
        """Switches the KV policy, keeping the evaluated tokens: the same arguments and checks
        as the constructor's. Prefill is dense, so the cached prompt is then as if it had been
        evaluated under the new policy, and one prefill can serve several policies. Switching
        to "h2o" with tokens evaluated raises ValueError (h2o needs the prefill's attention
        weights). kv_stats() start again from zero. On an error the old policy stays.

        Example:
            >>> llm.eval(prompt_tokens)
            >>> llm.set_kv_policy("clusterkv", 1024, {"tokens_per_cluster": 80})
            >>> llm.eval([next_token])   # a decode step through ClusterKV
        """
        settings = kv_policy_settings(kv_policy, kv_budget, kv_policy_params)
        ctx = self._require_ctx()
        if ctx.n_past() != self.n_tokens:
            ctx.truncate(self.n_tokens)  # reset()/n_tokens trims lazily: apply it first
        ctx.set_kv_policy(settings)

    def kv_stats(self) -> Dict[str, Any]:
        """What the KV policy did since the context began or reset_kv_stats().

        Keys: n_steps (decode steps that used the policy), n_attended / n_cached (positions
        attended / cached, summed over steps, compressed layers and query heads), density
        (n_attended / n_cached; None before any step), t_cluster_ms, t_select_ms, n_clusters
        (held now, summed), clusters ([n_layer][n_head_kv] clusters held now) and n_fetched
        (kv_offload: K/V rows copied from host memory to the GPU's cache of selected rows).

        Example:
            >>> llm = Llama(path, n_ctx=4096, kv_policy="clusterkv", kv_budget=1024)
            >>> llm.kv_stats()["density"]
        """
        ctx = self._require_ctx()
        stats = ctx.kv_stats()
        info = self._info
        clusters = [[ctx.kv_n_clusters(il, h) for h in range(info.n_head_kv)]
                    for il in range(info.n_layer)]
        return {"n_steps": stats.n_steps, "n_attended": stats.n_attended,
                "n_cached": stats.n_cached,
                "density": stats.n_attended / stats.n_cached if stats.n_cached else None,
                "t_cluster_ms": stats.t_cluster_ms, "t_select_ms": stats.t_select_ms,
                "n_clusters": stats.n_clusters, "clusters": clusters, "n_fetched": stats.n_fetched}

    def kv_memory(self) -> Dict[str, int]:
        """Bytes of the KV cache by place: device_kv (K/V rows in GPU memory), host_kv (in host
        memory: a CPU context's whole cache, or the offloaded layers' under kv_offload) and
        device_policy (the KV policy's other GPU state: centroids, indexes, lists).

        Example:
            >>> llm = Llama(path, n_gpu_layers=-1, n_ctx=131072, n_batch=4096,
            ...             kv_policy="clusterkv", kv_budget=2048, kv_offload=True)
            >>> llm.kv_memory()["device_kv"] / 2**20   # MiB: the budget's rows, not n_ctx's
        """
        return self._require_ctx().kv_memory()

    def reset_kv_stats(self) -> None:
        """Zeroes the step, position and time counters of kv_stats()."""
        self._require_ctx().reset_kv_stats()

    def kv_selection(self, layer: int, head: int) -> np.ndarray:
        """int32 positions that query head `head` of `layer` attended to at the last decode
        step, in the order attention read them (every causal position for dense layers, the
        full policy and prefill chunks). ValueError for an out-of-range layer or head.

        Example:
            >>> llm.eval(llm.tokenize(b"Hello")); llm.eval([42]); llm.kv_selection(5, 0)
        """
        info = self._info
        if not (0 <= layer < info.n_layer and 0 <= head < info.n_head):
            raise ValueError("kv_selection(%d, %d): layer must be in [0, %d) and head in [0, %d)"
                             % (layer, head, info.n_layer, info.n_head))
        return self._require_ctx().kv_selection(layer, head)

    # --- tokens ---

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> List[int]:
        """UTF-8 bytes -> token ids. add_bos adds BOS (and EOS) where the model asks for it;
        special parses control-token texts such as "<|im_start|>". Also accepts str."""
        if self._closed:
            raise RuntimeError("this Llama has been closed")
        if isinstance(text, str):
            text = text.encode("utf-8")
        return self._model.tokenize(bytes(text), add_bos, special)

    def tokenizer(self) -> "LlamaTokenizer":
        """The model's tokenizer as llama-cpp-python's LlamaTokenizer (encode / decode)."""
        return LlamaTokenizer(self)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        """Token ids -> bytes. With prev_tokens, returns only the bytes `tokens` add after them
        (so tokenizer rules for the first token apply to prev_tokens, not to `tokens`)."""
        if self._closed:
            raise RuntimeError("this Llama has been closed")
        tokens = token_array(tokens)
        if not prev_tokens:
            return self._model.detokenize(tokens, special)
        prev = token_array(prev_tokens)
        both = self._model.detokenize(prev + tokens, special)
        return both[len(self._model.detokenize(prev, special)):]

    # --- evaluation state ---

    @property
    def _input_ids(self) -> np.ndarray:
        return self.input_ids[:self.n_tokens]

    @property
    def scores(self) -> np.ndarray:
        """[n_ctx, n_vocab] float32 logits. With logits_all, row i holds the logits after token
        i for every evaluated token. Otherwise only row n_tokens-1 is valid (as
        llama-cpp-python): a read-only view that repeats the last row, so no memory is spent on
        rows nobody asked for."""
        if self._scores_buf is not None:
            return self._scores_buf
        return np.broadcast_to(self._last_logits(), (self._n_ctx, self._n_vocab))

    @property
    def _scores(self) -> np.ndarray:
        return self.scores[:self.n_tokens]

    @property
    def eval_tokens(self) -> deque:
        return deque(self._input_ids.tolist(), maxlen=self._n_ctx)

    @property
    def eval_logits(self) -> deque:
        if self._scores_buf is not None:
            return deque(self._scores.tolist(), maxlen=self._n_ctx)
        return deque([self._last_logits().tolist()] if self.n_tokens else [], maxlen=1)

    def _last_logits(self) -> np.ndarray:
        """A copy of the last decode's last logits row (zeros before any decode)."""
        row, version = self._last_row
        if version != self._n_decodes:
            ctx = self._require_ctx()
            row = (np.array(ctx.logits(-1)) if self._n_decodes
                   else np.zeros(self._n_vocab, dtype=np.single))
            self._last_row = (row, self._n_decodes)
        return row

    def set_seed(self, seed: int) -> None:
        """Sets the seed of the next sampler; -1 or LLAMA_DEFAULT_SEED pick a random one."""
        seed = _require_int("seed", seed)
        if seed in (-1, LLAMA_DEFAULT_SEED):
            seed = random.SystemRandom().randrange(2**32)
        self._seed = seed

    def reset(self) -> None:
        """Forgets the evaluated tokens (the KV cache is trimmed lazily on the next eval)."""
        self.n_tokens = 0

    # --- saved states and the prompt cache ---

    def save_state(self) -> LlamaState:
        """The evaluated tokens, their logits and the KV cache rows (sequence 0), to restore
        with load_state() here or in another Llama of the same model file (CPU or GPU, any
        kv_policy but h2o, any n_ctx that holds them)."""
        ctx = self._require_ctx()
        n = self.n_tokens
        if ctx.n_past() != n:
            ctx.truncate(n)   # the trim eval() would do next (reset() and generate() defer it)
        if self._scores_buf is not None:
            scores = self._scores_buf[:n].copy()
        elif n and self._n_decodes and ctx.n_outputs():
            scores = self._last_logits()[None, :].copy()
        else:
            scores = np.zeros((0, self._n_vocab), dtype=np.single)
        blob = ctx.state_save()
        return LlamaState(self.input_ids[:n].copy(), scores, n, blob, len(blob), self._seed)

    def load_state(self, state: LlamaState) -> None:
        """Restores a save_state() result: the tokens, the logits and the KV cache, whose KV
        policy then starts as after a prefill of those tokens. A state of another model raises
        InvalidArgumentError, bytes that are not a state ModelFormatError; nothing changes
        then."""
        ctx = self._require_ctx()
        if not isinstance(state, LlamaState):
            raise TypeError("load_state takes a LlamaState, got %s" % type(state).__name__)
        n = _require_int("state.n_tokens", state.n_tokens, 0)
        ids = np.asarray(state.input_ids, dtype=np.intc).reshape(-1)
        scores = np.asarray(state.scores, dtype=np.single)
        if scores.ndim == 2 and scores.shape[1] != self._n_vocab:
            raise ValueError("the state belongs to another model (vocabulary of %d tokens; this "
                             "model has %d)" % (scores.shape[1], self._n_vocab))
        if len(ids) != n or scores.ndim != 2 or scores.shape[0] > n:
            raise ValueError("malformed LlamaState: %d tokens, %d input ids, scores of shape %s"
                             % (n, len(ids), scores.shape))
        if n > self._n_ctx:
            raise ValueError("the state holds %d tokens; the context window is %d"
                             % (n, self._n_ctx))
        ctx.state_load(state.llama_state)
        if ctx.n_past() != n:
            ctx.truncate(0)
            self.n_tokens = 0
            raise ValueError("malformed LlamaState: %d tokens but %d cached positions"
                             % (n, ctx.n_past()))
        self.input_ids[:n] = ids
        self.n_tokens = n
        last = scores[-1].copy() if len(scores) else np.zeros(self._n_vocab, dtype=np.single)
        if self._scores_buf is not None:
            self._scores_buf[:n] = 0.0
            self._scores_buf[n - len(scores):n] = scores
        self._n_decodes += 1
        self._last_row = (last, self._n_decodes)
        self._seed = int(state.seed)

    def set_cache(self, cache: Optional[BaseLlamaCache]) -> None:
        """Prompt cache for create_completion and chat (None turns it off): each call starts
        from the cached state sharing the longest prefix with its prompt, when that beats the
        tokens the context already holds, and stores its final state."""
        if cache is not None and not isinstance(cache, BaseLlamaCache):
            raise TypeError("set_cache takes a LlamaRAMCache, LlamaDiskCache or None")
        self.cache = cache

    def _load_cached_prefix(self, prompt_tokens: List[int]) -> None:
        """The cache's state for this prompt, when it shares more of it than the context."""
        try:
            state = self.cache[prompt_tokens]
        except KeyError:
            return
        cached = self.longest_token_prefix(np.asarray(state.input_ids).tolist(), prompt_tokens)
        if cached <= self.longest_token_prefix(self._input_ids.tolist(), prompt_tokens):
            return
        try:
            self.load_state(state)
        except ValueError:   # InvalidArgumentError, ModelFormatError are ValueErrors too
            pass   # another model's state, or too long for this context: evaluate as usual

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluates tokens after the n_tokens already evaluated, appending to the KV cache."""
        self._eval(token_array(tokens), self._logits_all)

    def _eval(self, tokens: List[int], all_logits: bool) -> None:
        ctx = self._require_ctx()
        if not tokens:
            return
        n_past, n = self.n_tokens, len(tokens)
        if n_past + n > self._n_ctx:
            raise ValueError("Requested tokens (%d) exceed context window of %d"
                             % (n_past + n, self._n_ctx))
        if ctx.n_past() != n_past:
            ctx.truncate(n_past)
        ctx.decode(tokens, all_logits=all_logits or self._logits_all)
        self._n_decodes += 1
        self.input_ids[n_past:n_past + n] = tokens
        self.n_tokens = n_past + n
        if self._scores_buf is not None:
            self._store_logits(ctx, n_past, n)

    def _store_logits(self, ctx: _Context, n_past: int, n: int) -> None:
        first = ctx.logits_ptr(0)
        if n > 1 and ctx.logits_ptr(n - 1) - first == (n - 1) * self._n_vocab:
            rows = np.frombuffer(ffi.buffer(first, n * self._n_vocab * 4), dtype=np.float32)
            self._scores_buf[n_past:n_past + n] = rows.reshape(n, self._n_vocab)
        else:
            for i in range(n):
                self._scores_buf[n_past + i] = ctx.logits(i)

    # --- embeddings ---

    def pooling_type(self) -> int:
        """How embed() pools a text's token vectors (LLAMA_POOLING_TYPE_*)."""
        self._require_ctx()
        return self._pooling

    def embed(self, input: Union[str, List[str]], normalize: bool = False, truncate: bool = True,
              return_count: bool = False) -> Any:
        """Embeddings of a text or a list of texts (needs Llama(embedding=True)).

        Each text is tokenized (with BOS where the model adds it) and evaluated alone from
        position 0; its vectors are the final-normed hidden states of its tokens, pooled as
        pooling_type() says: none gives a list of per-token vectors, mean / cls / last one
        vector. normalize=True scales every vector to unit L2 norm. A text longer than n_ctx
        is cut to n_ctx tokens when truncate, else raises ValueError (llama-cpp-python cuts to
        n_batch, as it evaluates each text as one batch). The KV cache is left empty of the
        generation state (as reset()); return_count=True also returns the tokens evaluated.

        Example:
            >>> llm = Llama(path, embedding=True, pooling_type="mean", verbose=False)
            >>> len(llm.embed("hello world"))
            576
        """
        ctx = self._require_ctx()
        if not self._embedding:
            raise RuntimeError("Llama model must be created with embedding=True to call embed()")
        texts = [input] if isinstance(input, str) else input
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("embed() takes a str or a list of str, got %r" % type(input).__name__)
        results, total = [], 0
        try:
            for text in texts:
                tokens = self.tokenize(text.encode("utf-8"))
                if len(tokens) > self._n_ctx:
                    if not truncate:
                        raise ValueError("Requested tokens (%d) exceed context window of %d"
                                         % (len(tokens), self._n_ctx))
                    tokens = tokens[:self._n_ctx]
                total += len(tokens)
                if not tokens:
                    raise ValueError("embed() got a text with no tokens: %r" % text)
                ctx.truncate(0)
                ctx.decode(tokens)
                vectors = _pool(ctx.embeddings(), self._pooling)
                if normalize:
                    vectors = _l2_normalize(vectors)
                results.append(vectors.tolist())
        finally:
            ctx.truncate(0)
            self.reset()
        output = results[0] if isinstance(input, str) else results
        return (output, total) if return_count else output

    def create_embedding(self, input: Union[str, List[str]],
                         model: Optional[str] = None) -> Dict[str, Any]:
        """embed() in the OpenAI shape: {"object": "list", "data": [{"object": "embedding",
        "embedding": ..., "index": i}], "model": ..., "usage": {...}} (unnormalised, as
        llama-cpp-python)."""
        vectors, n_tokens = self.embed(input, return_count=True)
        if isinstance(input, str):
            vectors = [vectors]
        return {
            "object": "list",
            "data": [{"object": "embedding", "embedding": v, "index": i}
                     for i, v in enumerate(vectors)],
            "model": model if model is not None else self.model_path,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

    # --- sampling ---

    def _get_sampler(self, params: SamplerParams) -> _Sampler:
        if self._sampler is None or self._sampler.params != params:
            if self._sampler is not None:
                self._sampler.close()
            self._sampler = None
            self._sampler = _Sampler(self._model, params, self._seed)
        return self._sampler

    def _grammar_for(self, grammar: Any) -> Optional[_Grammar]:
        """The native state of `grammar` (LlamaGrammar, GBNF text or None) over this model's
        vocabulary, at the start of the text. The last one is kept: building the vocabulary
        index takes a few tens of ms on a large vocabulary."""
        grammar = as_grammar(grammar)
        if grammar is None:
            return None
        cached = self._grammar_state
        if cached is not None and cached.key == (grammar.grammar, grammar.root):
            cached.reset()
            return cached
        if cached is not None:
            cached.close()
            self._grammar_state = None
        state = grammar._state_for(self._model)
        self._grammar_state = state
        return state

    def _sample_with(self, sampler: _Sampler, processor: Optional[Callable],
                     idx: Optional[int] = None, grammar: Optional[_Grammar] = None,
                     ctx_row: int = -1) -> int:
        """Draws from position idx's logits (default: the last evaluated token's, row ctx_row
        of the last decode)."""
        ctx = self._require_ctx()
        if idx is None or idx == self.n_tokens - 1:
            if processor is None and grammar is None:
                return sampler.sample_ptr(ctx.logits_ptr(ctx_row), self._n_vocab)
            row = ctx.logits(ctx_row)
        elif self._scores_buf is not None and 0 <= idx < self.n_tokens:
            row = self._scores_buf[idx]
        else:
            raise ValueError("idx=%r: only the last position (%d) has logits unless logits_all"
                             % (idx, self.n_tokens - 1))
        if processor is not None:
            row = processor(self._input_ids, np.array(row, dtype=np.single))
        token = sampler.sample(row)
        if grammar is not None and not grammar.allows(token):
            # Checking the drawn token first spares the whole-vocabulary mask on most steps
            # (llama.cpp's common sampler does the same); the redraw is from the masked row.
            token = sampler.sample(grammar.apply(row))
        return token

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
               typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0,
               frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
               tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_eta: float = 0.1,
               mirostat_tau: float = 5.0, penalize_nl: bool = True,
               logits_processor: Any = None, grammar: Any = None,
               idx: Optional[int] = None) -> int:
        """Draws one token from the logits at position idx (default: the last evaluated token),
        with the penalties looking at the last `last_n_tokens_size` evaluated tokens."""
        if self.n_tokens == 0:
            raise RuntimeError("sample() needs evaluated tokens; call eval() first")
        _warn_sampling(tfs_z, penalize_nl)
        params = _sampler_params(temp, top_k, top_p, min_p, repeat_penalty, frequency_penalty,
                                 presence_penalty, self.last_n_tokens_size, typical_p,
                                 mirostat_mode, mirostat_tau, mirostat_eta)
        sampler = self._get_sampler(params)
        end = self.n_tokens if idx is None else idx + 1
        self._prime_sampler(sampler, self.input_ids[:end].tolist())
        return self._sample_with(sampler, _as_processor(logits_processor), idx,
                                 self._grammar_for(grammar))

    def _prime_sampler(self, sampler: _Sampler, history: List[int]) -> None:
        sampler.reset(self._seed)
        if self.last_n_tokens_size > 0:
            for token in history[-self.last_n_tokens_size:]:
                sampler.accept(token)

    @staticmethod
    def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
        return longest_token_prefix(a, b)

    @staticmethod
    def logits_to_logprobs(logits: np.ndarray, axis: int = -1) -> np.ndarray:
        return logits_to_logprobs(logits, axis)

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, typical_p: float = 1.0, temp: float = 0.80,
                 repeat_penalty: float = 1.0, reset: bool = True, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0,
                 mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, penalize_nl: bool = True,
                 logits_processor: Any = None, stopping_criteria: Any = None,
                 grammar: Any = None) -> Iterator[int]:
        """Yields sampled token ids forever (the caller stops). With reset=True the longest
        prefix of `tokens` already in the KV cache is kept and only the rest is evaluated.
        `send(extra_tokens)` appends tokens after the yielded one, as llama-cpp-python.

        Example:
            >>> for tok in llm.generate(llm.tokenize(b"Hi"), temp=0):
            ...     break
        """
        self._require_ctx()
        _warn_sampling(tfs_z, penalize_nl)
        params = _sampler_params(temp, top_k, top_p, min_p, repeat_penalty, frequency_penalty,
                                 presence_penalty, self.last_n_tokens_size, typical_p,
                                 mirostat_mode, mirostat_tau, mirostat_eta)
        tokens = token_array(tokens)
        if not tokens:
            raise ValueError("generate() needs at least one token")
        return self._generate(tokens, params, reset, _as_processor(logits_processor),
                              stopping_criteria, self._grammar_for(grammar))

    def _generate(self, tokens: List[int], params: SamplerParams, reset: bool,
                  processor: Optional[Callable], stopping_criteria: Any,
                  grammar: Optional[_Grammar] = None) -> Iterator[int]:
        if reset:
            keep = self.longest_token_prefix(self._input_ids.tolist(), tokens[:-1])
            history, pending = tokens, tokens[keep:]
            self.n_tokens = keep
        else:
            history, pending = self._input_ids.tolist() + tokens, tokens
        sampler = self._get_sampler(params)
        self._prime_sampler(sampler, history)
        ctx = self._require_ctx()
        while True:
            guesses = self._draft(pending)
            if guesses and len(pending) > 1:   # a prompt's rows need no logits: run it first
                self._eval(pending[:-1], False)
                pending = pending[-1:]
            n_real = len(pending)
            pending = pending + guesses
            start, rows = self.n_tokens, len(pending) > n_real or self._logits_all
            self._eval(pending, rows)
            # Position by position from the last real token's row: a guess is kept while the
            # sampler draws it, so the tokens are those of one-at-a-time decoding.
            for i in range(n_real - 1, len(pending)):
                self.n_tokens = start + i + 1   # the sequence row i follows; later guesses go
                row = i if rows else -1
                token = self._sample_with(sampler, processor, grammar=grammar, ctx_row=row)
                sampler.accept(token)
                if grammar is not None:
                    grammar.accept_token(token)
                if i + 1 < len(pending):   # a guess's row: _last_logits() is this one
                    self._last_row = (np.array(ctx.logits(row)), self._n_decodes)
                else:                      # the pass's last row, read when asked
                    self._last_row = (None, -1)
                if stopping_criteria is not None and stopping_criteria(self._input_ids,
                                                                       self._last_logits()):
                    return
                extra = token_array((yield token))
                if extra or i + 1 == len(pending) or pending[i + 1] != token:
                    pending = [token] + extra
                    break

    def _draft(self, pending: List[int]) -> List[int]:
        """The draft model's guesses after `pending`, as many as fit the context; none under
        a KV policy (its decode steps read a subset, a multi-token pass all)."""
        if self.draft_model is None or self.kv_policy["policy"] != "full":
            return []
        room = self._n_ctx - self.n_tokens - len(pending)
        if room <= 0:
            return []
        ids = np.concatenate([self._input_ids, np.asarray(pending, dtype=np.intc)])
        guess = token_array(np.asarray(self.draft_model(ids)).reshape(-1).tolist())
        if any(t < 0 or t >= self._n_vocab for t in guess):
            raise ValueError("draft_model returned token ids outside [0, %d)" % self._n_vocab)
        return guess[:room]

    # --- completion ---

    def create_completion(self, prompt: Union[str, List[int]], suffix: Optional[str] = None,
                          max_tokens: Optional[int] = 16, temperature: float = 0.8,
                          top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
                          logprobs: Optional[int] = None, echo: bool = False,
                          stop: Union[None, str, List[str]] = [],
                          frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                          repeat_penalty: float = 1.0, top_k: int = 40, stream: bool = False,
                          seed: Optional[int] = None, tfs_z: float = 1.0,
                          mirostat_mode: int = 0, mirostat_tau: float = 5.0,
                          mirostat_eta: float = 0.1, model: Optional[str] = None,
                          stopping_criteria: Any = None, logits_processor: Any = None,
                          grammar: Any = None, logit_bias: Optional[Dict[int, float]] = None
                          ) -> Union[Dict[str, Any], Iterator[Dict[str, Any]]]:
        """Completes `prompt` (a str, parsed with special tokens, or token ids).

        Returns `{id, object: "text_completion", created, model, choices: [{text, index,
        logprobs, finish_reason}], usage}`, or with stream=True an iterator of chunks whose
        texts concatenate to the same text (never a split UTF-8 character, never part of a stop
        string) followed by a chunk with text "" and the finish_reason. finish_reason is "stop"
        (end-of-generation token, stop string or stopping criterion) or "length".
        `suffix` is appended to the text (no fill-in-the-middle). Parameter errors raise at
        the call, also with stream=True.

        Example:
            >>> llm("Q: 2+2=? A:", max_tokens=4, stop=["\\n"], temperature=0)
        """
        _warn_sampling(tfs_z)
        if suffix is not None and not isinstance(suffix, str):
            raise TypeError("suffix must be a string or None")
        params = _sampler_params(temperature, top_k, top_p, min_p, repeat_penalty,
                                 frequency_penalty, presence_penalty, self.last_n_tokens_size,
                                 typical_p, mirostat_mode, mirostat_tau, mirostat_eta)
        prompt_tokens = self._prompt_tokens(prompt)
        budget = self._completion_budget(max_tokens, len(prompt_tokens))
        self._check_logprobs(logprobs)
        processor = self._completion_processor(logits_processor, logit_bias)
        state = _CompletionState(_stop_bytes(stop))
        self.set_seed(seed if seed is not None else random.Random(self._seed).randint(0, 2**32))
        header = {"id": "cmpl-%s" % uuid.uuid4(), "object": "text_completion",
                  "created": int(time.time()), "model": model or self.model_path}
        steps = self._completion_steps(state, prompt_tokens, budget, params, processor,
                                       stopping_criteria, self._grammar_for(grammar))
        run = (prompt, prompt_tokens, echo, suffix, logprobs)
        if stream:
            return self._stream_completion(header, state, steps, run)
        for _ in steps:
            pass
        return self._completion_response(header, state, run)

    def __call__(self, prompt: Union[str, List[int]], suffix: Optional[str] = None,
                 max_tokens: Optional[int] = 16, temperature: float = 0.8, top_p: float = 0.95,
                 min_p: float = 0.05, typical_p: float = 1.0, logprobs: Optional[int] = None,
                 echo: bool = False, stop: Union[None, str, List[str]] = [],
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 repeat_penalty: float = 1.0, top_k: int = 40, stream: bool = False,
                 seed: Optional[int] = None, tfs_z: float = 1.0, mirostat_mode: int = 0,
                 mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 model: Optional[str] = None, stopping_criteria: Any = None,
                 logits_processor: Any = None, grammar: Any = None,
                 logit_bias: Optional[Dict[int, float]] = None
                 ) -> Union[Dict[str, Any], Iterator[Dict[str, Any]]]:
        """Same as create_completion."""
        return self.create_completion(
            prompt, suffix=suffix, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            min_p=min_p, typical_p=typical_p, logprobs=logprobs, echo=echo, stop=stop,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty, top_k=top_k, stream=stream, seed=seed, tfs_z=tfs_z,
            mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
            model=model, stopping_criteria=stopping_criteria,
            logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias)

    def create_completion_batch(self, prompts: Sequence[Union[str, List[int]]],
                                max_tokens: Optional[int] = 16, temperature: float = 0.8,
                                top_p: float = 0.95, min_p: float = 0.05,
                                stop: Union[None, str, List[str]] = [],
                                frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                                repeat_penalty: float = 1.0, top_k: int = 40,
                                seed: Optional[int] = None, model: Optional[str] = None
                                ) -> Dict[str, Any]:
        """Completes several prompts together, prompt i on sequence i of the context (so at
        most n_seq_max of them): each prompt is prefilled on its sequence, then every step
        decodes the next token of all unfinished ones in one batch (the weights are read once
        per step for all of them). Each has its own sampler (seed + i) and stops on its own;
        with temperature 0 the texts are those create_completion gives one prompt at a time.

        Returns `{id, object: "text_completion", created, model, choices: [{text, index,
        logprobs: None, finish_reason}, ...], usage}` with one choice per prompt, in order.
        The Llama's evaluated tokens (sequence 0) are reset.

        Example:
            >>> llm = Llama(path, n_seq_max=4)
            >>> out = llm.create_completion_batch(["Paris is", "Rome is"], max_tokens=8)
            >>> [c["text"] for c in out["choices"]]
        """
        ctx = self._require_ctx()
        prompts = list(prompts)
        if not 1 <= len(prompts) <= ctx.n_seq_max():
            raise ValueError("create_completion_batch takes 1 to n_seq_max (%d) prompts, got %d"
                             % (ctx.n_seq_max(), len(prompts)))
        params = _sampler_params(temperature, top_k, top_p, min_p, repeat_penalty,
                                 frequency_penalty, presence_penalty, self.last_n_tokens_size)
        prompt_tokens = [self._prompt_tokens(p) for p in prompts]
        budgets = [self._completion_budget(max_tokens, len(t)) for t in prompt_tokens]
        base_seed = seed if seed is not None else random.Random(self._seed).randint(0, 2**32)
        self.reset()
        states = [_CompletionState(_stop_bytes(stop)) for _ in prompts]
        samplers: List[_Sampler] = []
        try:
            pending = {}   # sequence -> its sampled token, not yet recorded
            for i, tokens in enumerate(prompt_tokens):
                sampler = _Sampler(self._model, params, (base_seed + i) % 2**64)
                samplers.append(sampler)
                for token in tokens[-self.last_n_tokens_size:] if self.last_n_tokens_size else []:
                    sampler.accept(token)
                ctx.truncate_seq(i, 0)
                ctx.decode_seq(i, tokens)   # its last row gives the first token
                if budgets[i] > 0:
                    pending[i] = sampler.sample_ptr(ctx.logits_ptr(-1), self._n_vocab)
            while pending:
                for i in [i for i, t in pending.items()
                          if self._record_batch_token(states[i], samplers[i], t, budgets[i])]:
                    del pending[i]
                if pending:
                    seqs = sorted(pending)
                    ctx.decode_batch([pending[i] for i in seqs], seqs)
                    pending = {i: samplers[i].sample_ptr(ctx.logits_ptr(row), self._n_vocab)
                               for row, i in enumerate(seqs)}
        finally:
            for s in samplers:
                s.close()
        choices = [{"text": st.text.text(), "index": i, "logprobs": None,
                    "finish_reason": st.finish_reason} for i, st in enumerate(states)]
        n_prompt = sum(len(t) for t in prompt_tokens)
        n_gen = sum(len(st.tokens) for st in states)
        return {"id": "cmpl-%s" % uuid.uuid4(), "object": "text_completion",
                "created": int(time.time()), "model": model or self.model_path,
                "choices": choices, "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                                              "total_tokens": n_prompt + n_gen}}

    def _record_batch_token(self, state: _CompletionState, sampler: _Sampler, token: int,
                            budget: int) -> bool:
        """One sampled token of a batched completion; True when that completion ends."""
        if self._model.is_eog(token):
            state.finish_reason = "stop"
            return True
        sampler.accept(token)
        state.tokens.append(token)
        if state.text.feed(self._model.token_to_piece(token)):
            state.finish_reason = "stop"
            return True
        return len(state.tokens) >= budget

    def _prompt_tokens(self, prompt: Union[str, bytes, Sequence[int]]) -> List[int]:
        self._require_ctx()
        if isinstance(prompt, (str, bytes, bytearray)):
            text = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
            tokens = self.tokenize(text, add_bos=True, special=True) if text else []
        else:
            tokens = token_array(prompt)
            if any(t < 0 or t >= self._n_vocab for t in tokens):
                raise ValueError("prompt token ids must be in [0, %d)" % self._n_vocab)
        bos = self.token_bos()
        if not tokens:
            if bos < 0:
                raise ValueError("the prompt is empty and the model has no BOS token")
            tokens = [bos]
        if bos >= 0 and tokens[:2] == [bos, bos]:
            warnings.warn("Detected duplicate leading %r in prompt, this will likely reduce "
                          "response quality" % self._model.token_text(bos), RuntimeWarning,
                          stacklevel=3)
        if len(tokens) >= self._n_ctx:
            raise ValueError("Requested tokens (%d) exceed context window of %d"
                             % (len(tokens), self._n_ctx))
        return tokens

    def _completion_budget(self, max_tokens: Optional[int], n_prompt: int) -> int:
        """max_tokens None or <= 0 means "until the context is full"; always clipped to it."""
        room = self._n_ctx - n_prompt
        if max_tokens is None:
            return room
        max_tokens = _require_int("max_tokens", max_tokens)
        return room if max_tokens <= 0 else min(max_tokens, room)

    def _check_logprobs(self, logprobs: Optional[int]) -> None:
        if logprobs is None:
            return
        _require_int("logprobs", logprobs, 0)
        if self._scores_buf is None:
            raise ValueError("logprobs is not supported for models created with "
                             "logits_all=False")

    def _completion_processor(self, logits_processor: Any,
                              logit_bias: Optional[Dict[int, float]]) -> Optional[Callable]:
        processor = _as_processor(logits_processor)
        if not logit_bias:
            return processor
        bias = _logit_bias_processor(logit_bias, self._n_vocab)
        return bias if processor is None else LogitsProcessorList([processor, bias])

    def _completion_steps(self, state: _CompletionState, prompt_tokens: List[int], budget: int,
                          params: SamplerParams, processor: Optional[Callable],
                          stopping_criteria: Any, grammar: Optional[_Grammar] = None
                          ) -> Iterator[None]:
        """Generates into `state`, yielding after each token that adds text; with a cache,
        starts from its best state and stores the final one (not when abandoned midway)."""
        if budget <= 0:
            return
        if self.cache is not None:
            self._load_cached_prefix(prompt_tokens)
        yield from self._sample_completion(state, prompt_tokens, budget, params, processor,
                                           stopping_criteria, grammar)
        if self.cache is not None:
            self.cache[prompt_tokens + state.tokens] = self.save_state()

    def _sample_completion(self, state: _CompletionState, prompt_tokens: List[int], budget: int,
                           params: SamplerParams, processor: Optional[Callable],
                           stopping_criteria: Any, grammar: Optional[_Grammar] = None
                           ) -> Iterator[None]:
        tokens = self._generate(prompt_tokens, params, True, processor, stopping_criteria,
                                grammar)
        try:
            for token in tokens:
                if self._model.is_eog(token):
                    state.finish_reason = "stop"
                    return
                state.tokens.append(token)
                stopped = state.text.feed(self._model.token_to_piece(token))
                state.token_ends.append(len(state.text.data))
                if stopped:
                    state.finish_reason = "stop"
                    return
                yield
                if len(state.tokens) >= budget:
                    return
            state.finish_reason = "stop"  # a stopping criterion ended generate()
        finally:
            tokens.close()

    def _stream_completion(self, header: Dict[str, Any], state: _CompletionState,
                           steps: Iterator[None], run: tuple) -> Iterator[Dict[str, Any]]:
        prompt, prompt_tokens, echo, suffix, logprobs = run
        if echo:
            yield self._chunk(header, self._prompt_text(prompt, prompt_tokens), None, None)
        for _ in steps:
            text = state.text.take()
            if text:
                yield self._chunk(header, text, self._stream_logprobs(state, run, False), None)
        text = state.text.take(final=True) + (suffix or "")
        lp = self._stream_logprobs(state, run, True)
        if text or lp:
            yield self._chunk(header, text, lp, None)
        yield self._chunk(header, "", None, state.finish_reason)

    @staticmethod
    def _chunk(header: Dict[str, Any], text: str, logprobs: Optional[Dict[str, Any]],
               finish_reason: Optional[str]) -> Dict[str, Any]:
        return dict(header, choices=[{"text": text, "index": 0, "logprobs": logprobs,
                                      "finish_reason": finish_reason}])

    def _prompt_text(self, prompt: Any, prompt_tokens: List[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, (bytes, bytearray)):
            return bytes(prompt).decode("utf-8", errors="ignore")
        return self.detokenize(prompt_tokens).decode("utf-8", errors="ignore")

    def _completion_response(self, header: Dict[str, Any], state: _CompletionState,
                             run: tuple) -> Dict[str, Any]:
        prompt, prompt_tokens, echo, suffix, logprobs = run
        text = state.text.text()
        prefix = self._prompt_text(prompt, prompt_tokens) if echo else ""
        lp = None
        if logprobs is not None:
            n_kept = self._tokens_in_text(state)
            offset = 0 if echo else len(self._prompt_text(prompt, prompt_tokens))
            lp = self._logprobs(prompt_tokens, state.tokens[:n_kept], logprobs, echo, offset)
        response = self._chunk(header, prefix + text + (suffix or ""), lp, state.finish_reason)
        response["usage"] = {"prompt_tokens": len(prompt_tokens),
                             "completion_tokens": len(state.tokens),
                             "total_tokens": len(prompt_tokens) + len(state.tokens)}
        return response

    @staticmethod
    def _tokens_in_text(state: _CompletionState) -> int:
        """Completion tokens that start before the end of the (stop-truncated) text."""
        end = len(state.text.data)
        starts = [0] + state.token_ends[:-1]
        return sum(1 for start in starts[:len(state.tokens)] if start < end)

    def _stream_logprobs(self, state: _CompletionState, run: tuple,
                         final: bool) -> Optional[Dict[str, Any]]:
        prompt, prompt_tokens, echo, suffix, logprobs = run
        if logprobs is None:
            return None
        limit = self._tokens_in_text(state) if final else sum(
            1 for end in state.token_ends if end <= state.text.emitted)
        if limit <= state.reported:
            return None
        first, state.reported = state.reported, limit
        offset = len(self._prompt_text(prompt, prompt_tokens)) if echo else 0
        offset += len(state.text.data[:state.token_ends[first - 1] if first else 0]
                      .decode("utf-8", errors="ignore"))
        context = prompt_tokens + state.tokens[:first]
        return self._logprobs(context, state.tokens[first:limit], logprobs, False, offset)

    def _logprobs(self, context: List[int], tokens: List[int], n_top: int, echo: bool,
                  offset: int) -> Dict[str, Any]:
        """OpenAI completion logprobs for `tokens` evaluated right after `context` (plus the
        context itself when echo, whose first token has no logprob)."""
        seq = context + tokens
        first = 0 if echo else len(context)
        out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        for pos in range(first, len(seq)):
            piece = self._model.token_to_piece(seq[pos]).decode("utf-8", errors="ignore")
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            offset += len(piece)
            if pos == 0:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            row = logits_to_logprobs(self._scores_buf[pos - 1])
            top = np.argsort(-row)[:n_top] if n_top else []
            entry = {self._model.token_to_piece(int(t)).decode("utf-8", errors="ignore"):
                     float(row[t]) for t in top}
            entry[piece] = float(row[seq[pos]])
            out["token_logprobs"].append(float(row[seq[pos]]))
            out["top_logprobs"].append(entry)
        return out

    # --- chat ---

    def _formatter(self) -> ChatFormatter:
        if self._chat is None:
            raise RuntimeError("this Llama was loaded with metadata_only: no chat template")
        if self._chat_formatter is None:
            bos, eos = self.token_bos(), self.token_eos()
            self._chat_formatter = ChatFormatter(
                self._chat.template,
                bos_token=self._model.token_text(bos) if bos >= 0 else "",
                eos_token=self._model.token_text(eos) if eos >= 0 else "")
        return self._chat_formatter

    def render_chat(self, messages: List[Dict[str, Any]], **variables: Any) -> str:
        """The prompt text create_chat_completion would send for `messages`."""
        return self._formatter().render(messages, **variables)

    def _chat_prompt_tokens(self, prompt: str) -> List[int]:
        """Tokenizes a rendered chat prompt with special tokens; adds BOS only where the model
        wants one and the template did not already write it."""
        formatter = self._formatter()
        add_bos = not (formatter.bos_token and prompt.startswith(formatter.bos_token))
        return self.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)

    def create_chat_completion(self, messages: List[Dict[str, Any]],
                               functions: Optional[List[Dict[str, Any]]] = None,
                               function_call: Any = None,
                               tools: Optional[List[Dict[str, Any]]] = None,
                               tool_choice: Any = None, temperature: float = 0.2,
                               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                               typical_p: float = 1.0, stream: bool = False,
                               stop: Union[None, str, List[str]] = [],
                               seed: Optional[int] = None, response_format: Any = None,
                               max_tokens: Optional[int] = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, repeat_penalty: float = 1.0,
                               tfs_z: float = 1.0, mirostat_mode: int = 0,
                               mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                               model: Optional[str] = None, logits_processor: Any = None,
                               grammar: Any = None, logit_bias: Optional[Dict[int, float]] = None,
                               logprobs: Optional[bool] = None, top_logprobs: Optional[int] = None
                               ) -> Union[Dict[str, Any], Iterator[Dict[str, Any]]]:
        """Chat completion with the model's chat template (see chat.py), OpenAI-shaped.

        `tools`/`functions` are passed to the template. A forced call - `tool_choice={"type":
        "function", "function": {"name": X}}` or `"required"` (any of the tools), or the legacy
        `function_call={"name": X}` - constrains the reply by a grammar to arguments valid under
        the tool's JSON Schema and returns it as `message.tool_calls` (`function_call`), with
        finish_reason "tool_calls". With "auto" (the default when tools are given) the model
        may call a tool on its own: a reply in a common call format (Hermes / Qwen
        `<tool_call>` tags, Mistral `[TOOL_CALLS]`, Llama 3 JSON, or bare call JSON) naming one
        of the tools comes back the same way (tool_calls.py); with "none" the reply is text.
        `response_format={"type": "json_object"}` constrains the reply to one JSON object, with
        `"schema": {...}` to a JSON Schema (also OpenAI's `{"type": "json_schema",
        "json_schema": {"schema": {...}}}`); `grammar` (GBNF) constrains it to any grammar.

        Example:
            >>> llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=16)
        """
        call = forced_call(tools, tool_choice, functions, function_call)
        names = None if call else auto_tool_names(tools, tool_choice, functions, function_call)
        legacy = is_legacy(tools, tool_choice, functions, function_call)
        if sum(x is not None for x in (grammar, response_format, call)) > 1:
            raise ValueError("pass only one of grammar, response_format and a forced tool_choice "
                             "or function_call")
        if response_format is not None:
            grammar = _response_format_grammar(response_format)
        if call is not None:
            grammar = call.grammar
        prompt = self.render_chat(messages, tools=tools, functions=functions)
        stops = self._chat.stop + ([self._formatter().eos_token]
                                   if self._formatter().eos_token else []) + _stop_list(stop)
        completion = self.create_completion(
            self._chat_prompt_tokens(prompt), max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, min_p=min_p, typical_p=typical_p,
            logprobs=(top_logprobs or 0) if logprobs else None, stop=stops,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty, top_k=top_k, stream=stream, seed=seed, tfs_z=tfs_z,
            mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
            model=model, logits_processor=logits_processor, grammar=grammar,
            logit_bias=logit_bias)
        parse = call.parse if call else (lambda text: parse_tool_calls(text, names)) if names else None
        if stream:
            chunks = _chat_chunks(completion)
            return chunks_with_calls(chunks, parse, legacy, call is not None) if parse else chunks
        response = _chat_response(completion)
        return response_with_calls(response, parse, legacy) if parse else response


def _response_format_grammar(response_format: Any) -> Optional[LlamaGrammar]:
    """OpenAI's response_format as a grammar: json_object (optionally with llama-cpp-python's
    "schema"), json_schema, or text (no constraint)."""
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise ValueError("response_format must be a dict with a 'type', e.g. "
                         "{'type': 'json_object'}")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        if schema is None:
            return LlamaGrammar.from_string(JSON_GBNF)
        return LlamaGrammar.from_json_schema(schema)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError("response_format json_schema needs {'json_schema': {'schema': ...}}")
        return LlamaGrammar.from_json_schema(spec["schema"])
    raise ValueError("response_format type %r: expected 'text', 'json_object' or 'json_schema'"
                     % (kind,))


def _stop_list(stop: Union[None, str, Sequence[str]]) -> List[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _chat_logprobs(logprobs: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if logprobs is None:
        return None
    content = [{"token": token, "bytes": None, "logprob": lp,
                "top_logprobs": [{"token": t, "logprob": v, "bytes": None}
                                 for t, v in (top or {}).items()]}
               for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                         logprobs["top_logprobs"])]
    return {"content": content, "refusal": None}


def _chat_response(completion: Dict[str, Any]) -> Dict[str, Any]:
    choice = completion["choices"][0]
    return {"id": "chat" + completion["id"], "object": "chat.completion",
            "created": completion["created"], "model": completion["model"],
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": choice["text"]},
                         "logprobs": _chat_logprobs(choice["logprobs"]),
                         "finish_reason": choice["finish_reason"]}],
            "usage": completion["usage"]}


def _chat_chunks(chunks: Iterator[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    """Completion chunks -> chat chunks: {role} first, then {content} deltas, then {} with the
    finish_reason."""
    for i, chunk in enumerate(chunks):
        head = {"id": "chat" + chunk["id"], "object": "chat.completion.chunk",
                "created": chunk["created"], "model": chunk["model"]}
        if i == 0:
            yield dict(head, choices=[{"index": 0, "delta": {"role": "assistant"},
                                       "logprobs": None, "finish_reason": None}])
        choice = chunk["choices"][0]
        finished = choice["finish_reason"] is not None
        yield dict(head, choices=[{"index": 0,
                                   "delta": {} if finished else {"content": choice["text"]},
                                   "logprobs": _chat_logprobs(choice["logprobs"]),
                                   "finish_reason": choice["finish_reason"]}])


class LlamaTokenizer:
    """llama-cpp-python's tokenizer object over a Llama: str in, str out (encode / decode), or
    bytes (tokenize / detokenize, as Llama's)."""

    def __init__(self, llama: Llama):
        self._llama = llama

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> List[int]:
        return self._llama.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        return self._llama.detokenize(tokens, prev_tokens=prev_tokens, special=special)

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> List[int]:
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos=add_bos, special=special)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.detokenize(tokens).decode("utf-8", errors="ignore")
