"""clusterkv_local: a local GGUF LLM runtime with a clustered KV cache, llama-cpp-python style.

    >>> from clusterkv_local import Llama
    >>> llm = Llama.from_registry()            # the default model, fetched once
    >>> llm("Once upon a time", max_tokens=16)["choices"][0]["text"]

Layers: _ffi.py (cffi binding) -> _internals.py (handles, errors) -> llama.py (Llama) ->
chat.py (templates), grammar.py + json_schema.py (constrained output), cache.py (saved states,
prompt caches); models.py (registry, fetching) and cli.py sit beside them.

The names below are imported on first use, so `clusterkv_local.models` and the CLI's `models` and
`fetch` commands work before the native library is built.
"""
import importlib
from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

_LAZY = {
    "Llama": "llama",
    "LLAMA_DEFAULT_SEED": "llama",
    "LLAMA_POOLING_TYPE_UNSPECIFIED": "llama",
    "LLAMA_POOLING_TYPE_NONE": "llama",
    "LLAMA_POOLING_TYPE_MEAN": "llama",
    "LLAMA_POOLING_TYPE_CLS": "llama",
    "LLAMA_POOLING_TYPE_LAST": "llama",
    "LogitsProcessorList": "llama",
    "LlamaTokenizer": "llama",
    "StoppingCriteriaList": "llama",
    "LlamaState": "cache",
    "LlamaRAMCache": "cache",
    "LlamaDiskCache": "cache",
    "LlamaCache": "cache",
    "BaseLlamaCache": "cache",
    "LlamaDraftModel": "speculative",
    "LlamaPromptLookupDecoding": "speculative",
    "LlamaGrammar": "grammar",
    "LLAMA_GRAMMAR_DEFAULT_ROOT": "grammar",
    "JSON_GBNF": "json_schema",
    "json_schema_to_gbnf": "json_schema",
    "ClusterKVError": "_internals",
    "InvalidArgumentError": "_internals",
    "ModelFormatError": "_internals",
    "UnsupportedError": "_internals",
    "OutOfMemoryError": "_internals",
    "ContextFullError": "_internals",
    "ModelIOError": "_internals",
    "ModelNotFoundError": "_internals",
    "CudaError": "_internals",
    "NotFoundError": "_internals",
    "system_info": "_internals",
    "DEFAULT_MODEL": "models",
    "ModelFetchError": "models",
    "ChecksumError": "models",
}

__all__ = ["__version__"] + list(_LAZY)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._internals import (ClusterKVError, ContextFullError, CudaError, InvalidArgumentError,
                             ModelFormatError, ModelIOError, ModelNotFoundError, NotFoundError,
                             OutOfMemoryError, UnsupportedError, system_info)
    from .llama import (LLAMA_DEFAULT_SEED, LLAMA_POOLING_TYPE_CLS, LLAMA_POOLING_TYPE_LAST,
                        LLAMA_POOLING_TYPE_MEAN, LLAMA_POOLING_TYPE_NONE,
                        LLAMA_POOLING_TYPE_UNSPECIFIED, Llama, LlamaTokenizer,
                        LogitsProcessorList, StoppingCriteriaList)
    from .cache import BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache, LlamaState
    from .grammar import LLAMA_GRAMMAR_DEFAULT_ROOT, LlamaGrammar
    from .speculative import LlamaDraftModel, LlamaPromptLookupDecoding
    from .json_schema import JSON_GBNF, json_schema_to_gbnf
    from .models import DEFAULT_MODEL, ChecksumError, ModelFetchError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError("module 'clusterkv_local' has no attribute %r" % name)
    value = getattr(importlib.import_module("." + module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))
