"""Python owners of the native handles (model, context, sampler, grammar) and the error mapping.

Data flow: llama.py -> here -> _ffi.py (cffi, ABI mode) -> libclusterkv. Each class owns one
pointer, frees it in an idempotent close() and works as a context manager. Every native status
goes through _check(), which raises ClusterKVError (or a subclass) carrying ckv_last_error().
The "(buf, cap, &n_needed): retry once" pattern of the header is written once, in _fill().
No user policy (defaults, validation of sampling knobs, prompt handling) lives here.
"""
import errno
import logging
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ._ffi import ffi, lib

# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ClusterKVError(RuntimeError):
    """A native call failed. `status` is the enum ckv_status value, `message` the native detail.

    Example:
        >>> try:
        ...     Llama("broken.gguf")
        ... except ClusterKVError as e:
        ...     print(e.status_name, e.message)
    """

    def __init__(self, status: int, message: str = ""):
        self.status = int(status)
        self.status_name = status_name(self.status)
        self.message = message
        self._text = "%s [%s]" % (message, self.status_name) if message else self.status_name
        super().__init__(self._text)

    def __str__(self) -> str:
        return self._text


class InvalidArgumentError(ClusterKVError, ValueError):
    """CKV_ERR_INVALID_ARG: a parameter was out of range."""


class ModelFormatError(ClusterKVError, ValueError):
    """CKV_ERR_FORMAT: the file is not a well-formed GGUF model (truncated, bad magic, bad offsets,
    tensor shapes that disagree with the hyper-parameters, hyper-parameters out of range), or
    bytes given as a saved state are not one (Llama.load_state)."""


class UnsupportedError(ClusterKVError):
    """CKV_ERR_UNSUPPORTED: valid input this build cannot handle (architecture, quant, GPU)."""


class OutOfMemoryError(ClusterKVError, MemoryError):
    """CKV_ERR_OOM: an allocation failed (e.g. a KV cache too large for n_ctx)."""


class ContextFullError(ClusterKVError, ValueError):
    """CKV_ERR_CTX_FULL: the tokens do not fit in the context window."""


class ModelIOError(ClusterKVError, OSError):
    """CKV_ERR_IO: the file could not be opened, mapped or read."""


class ModelNotFoundError(ModelIOError, FileNotFoundError, ValueError):
    """The model path does not exist (checked in Python before any native call).

    Also a ValueError, since llama-cpp-python raises ValueError for a missing model path.
    """

    def __init__(self, path: str):
        super().__init__(lib.CKV_ERR_IO, "Model path does not exist: %s" % path)
        self.errno = errno.ENOENT
        self.strerror = "Model path does not exist"
        self.filename = path


class CudaError(ClusterKVError):
    """CKV_ERR_CUDA: a CUDA call failed."""


class NotFoundError(ClusterKVError, LookupError):
    """CKV_ERR_NOT_FOUND: a named metadata key or tensor does not exist."""


_STATUS_ERRORS = {
    lib.CKV_ERR_INVALID_ARG: InvalidArgumentError,
    lib.CKV_ERR_FORMAT: ModelFormatError,
    lib.CKV_ERR_UNSUPPORTED: UnsupportedError,
    lib.CKV_ERR_OOM: OutOfMemoryError,
    lib.CKV_ERR_CTX_FULL: ContextFullError,
    lib.CKV_ERR_IO: ModelIOError,
    lib.CKV_ERR_CUDA: CudaError,
    lib.CKV_ERR_NOT_FOUND: NotFoundError,
}


def status_name(status: int) -> str:
    """The constant's name for a status code, e.g. status_name(-2) == "CKV_ERR_FORMAT"."""
    name = lib.ckv_status_name(status)
    return ffi.string(name).decode("utf-8", "replace") if name != ffi.NULL else str(status)


def last_error() -> str:
    """The native message of the last failed call on this thread ("" if none)."""
    msg = lib.ckv_last_error()
    return ffi.string(msg).decode("utf-8", "replace") if msg != ffi.NULL else ""


def _check(status: int) -> None:
    """Raises the ClusterKVError subclass for a failed status; returns for CKV_OK."""
    if status == lib.CKV_OK:
        return
    raise _STATUS_ERRORS.get(status, ClusterKVError)(status, last_error())


def _cstr(ptr) -> str:
    return ffi.string(ptr).decode("utf-8", "replace") if ptr != ffi.NULL else ""


def _fill(fill: Callable, item_type: str, count_type: str, cap: int) -> Tuple[object, int]:
    """Runs a (buf, cap, &n_needed) call, retrying once with the size the library asked for.

    `fill(buf, cap, n_needed_ptr)` returns a status. Returns (buf, n) with n = items in the
    full result as reported by the library.
    """
    n_needed = ffi.new(count_type + " *")
    cap = max(int(cap), 1)
    for _ in range(2):
        buf = ffi.new(item_type + "[]", cap)
        status = fill(buf, cap, n_needed)
        if status != lib.CKV_ERR_BUFFER_TOO_SMALL:
            _check(status)
            return buf, int(n_needed[0])
        cap = int(n_needed[0]) + 1  # +1: room for a terminating NUL where the call writes one
    _check(status)
    raise AssertionError("unreachable")


def _fill_text(fill: Callable, count_type: str, cap: int = 256) -> bytes:
    buf, n = _fill(fill, "char", count_type, cap)
    data = ffi.unpack(buf, n)
    return data[:-1] if data.endswith(b"\0") else data


# Native log lines go to the "clusterkv_local.native" logger (warnings reach stderr through
# Python's last-resort handler unless logging is configured). The callback object must stay
# referenced for as long as the library may call it.
_LOGGER = logging.getLogger("clusterkv_local.native")
_LOG_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}


@ffi.callback("void(int32_t, const char *, void *)")
def _log_line(level, text, user_data):
    try:
        _LOGGER.log(_LOG_LEVELS.get(level, logging.ERROR), "%s",
                    ffi.string(text).decode("utf-8", "replace").rstrip())
    except Exception:  # a logging failure must never unwind into C
        pass


lib.ckv_log_set(_log_line, ffi.NULL)


def system_info() -> str:
    """What this build and machine can do, e.g. "CPU: AVX2=1 ... | CUDA: not built".

    The CUDA part is "not built", "no device" or device 0, e.g. "NVIDIA H200, 139.8 GiB, sm_90".
    """
    return _cstr(lib.ckv_system_info())


def native_version() -> str:
    """The native library's version string."""
    return _cstr(lib.ckv_version())


class _Handle:
    """Shared lifetime logic: `ptr` is None once closed; close() is idempotent."""

    ptr = None
    _kind = "handle"

    def _live(self):
        if self.ptr is None:
            raise RuntimeError("this %s has been closed" % self._kind)
        return self.ptr

    def close(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            self._free(ptr)

    def _free(self, ptr) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class TensorInfo(NamedTuple):
    """One row of the GGUF tensor table. shape is (ne[0], ..., ne[n_dims-1]), ne[0] the row."""

    name: str
    type: int
    type_name: str
    shape: Tuple[int, ...]
    offset: int
    size: int


class ModelInfo(NamedTuple):
    arch: str
    name: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_params: int
    size: int


def _check_model_path(path: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelNotFoundError(path)
    if os.path.isdir(path):
        raise ModelIOError(lib.CKV_ERR_IO, "Model path is a directory, not a GGUF file: %s" % path)
    return path


class _Model(_Handle):
    """Owns a ckv_model. The tokenizer calls live here since they only need the model."""

    _kind = "model"

    def __init__(self, path: str, *, n_gpu_layers: int = 0, use_mmap: bool = True,
                 vocab_only: bool = False, metadata_only: bool = False,
                 rope_freq_base: float = 0.0, rope_freq_scale: float = 0.0,
                 use_mlock: bool = False):
        self.path = _check_model_path(path)
        params = ffi.new("struct ckv_model_params *")
        lib.ckv_model_default_params(params)
        params.n_gpu_layers = n_gpu_layers
        params.use_mmap = use_mmap
        params.use_mlock = use_mlock
        params.vocab_only = vocab_only
        params.metadata_only = metadata_only
        params.rope_freq_base = rope_freq_base
        params.rope_freq_scale = rope_freq_scale
        out = ffi.new("ckv_model **")
        _check(lib.ckv_model_load(os.fsencode(self.path), params, out))
        self.ptr = out[0]
        self.vocab_only = vocab_only
        self.metadata_only = metadata_only
        self._pieces = {}  # (token, special) -> bytes; pieces never change for a loaded model

    def _free(self, ptr) -> None:
        lib.ckv_model_free(ptr)

    def info(self) -> ModelInfo:
        out = ffi.new("struct ckv_model_info *")
        lib.ckv_model_get_info(self._live(), out)
        return ModelInfo(_cstr(out.arch), _cstr(out.name), out.n_vocab, out.n_ctx_train,
                         out.n_embd, out.n_layer, out.n_head, out.n_head_kv, out.head_dim,
                         out.n_ff, int(out.n_params), int(out.size))

    # --- metadata and tensors ---

    def metadata(self) -> dict:
        ptr = self._live()
        result = {}
        for i in range(lib.ckv_model_meta_count(ptr)):
            key = _fill_text(lambda b, c, n: lib.ckv_model_meta_key(ptr, i, b, c, n), "size_t", 128)
            key_c = ffi.new("char[]", key)
            value = _fill_text(lambda b, c, n: lib.ckv_model_meta_value(ptr, key_c, b, c, n),
                               "size_t", 256)
            result[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        return result

    def tensors(self) -> List[TensorInfo]:
        ptr = self._live()
        out = ffi.new("struct ckv_tensor_info *")
        rows = []
        for i in range(lib.ckv_model_n_tensors(ptr)):
            _check(lib.ckv_model_tensor_info(ptr, i, out))
            shape = tuple(int(out.ne[d]) for d in range(out.n_dims))
            rows.append(TensorInfo(_cstr(out.name), out.type, _cstr(out.type_name), shape,
                                   int(out.offset), int(out.size)))
        return rows

    def dequantize(self, name: str, n_elements: int) -> np.ndarray:
        out = np.empty(n_elements, dtype=np.float32)
        _check(lib.ckv_model_tensor_dequantize(self._live(), name.encode("utf-8"),
                                               ffi.from_buffer("float[]", out), n_elements))
        return out

    # --- vocabulary ---

    def n_vocab(self) -> int:
        return lib.ckv_vocab_n_tokens(self._live())

    def token_bos(self) -> int:
        return lib.ckv_token_bos(self._live())

    def token_eos(self) -> int:
        return lib.ckv_token_eos(self._live())

    def add_bos(self) -> bool:
        return bool(lib.ckv_vocab_add_bos(self._live()))

    def is_eog(self, token: int) -> bool:
        return bool(lib.ckv_token_is_eog(self._live(), token))

    def token_attr(self, token: int) -> int:
        return lib.ckv_token_attr(self._live(), token)

    def token_text(self, token: int) -> str:
        """The raw vocabulary string ("Ġthe", "<|im_end|>"); "" if out of range."""
        return _cstr(lib.ckv_token_text(self._live(), token))

    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> List[int]:
        ptr = self._live()
        buf, n = _fill(lambda b, c, k: lib.ckv_tokenize(ptr, text, len(text), b, c, add_special,
                                                        parse_special, k),
                       "ckv_token", "int32_t", len(text) + 4)
        return ffi.unpack(buf, n)

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        key = (token, special)
        piece = self._pieces.get(key)
        if piece is None:
            ptr = self._live()
            buf, n = _fill(lambda b, c, k: lib.ckv_token_to_piece(ptr, token, b, c, special, k),
                           "char", "int32_t", 32)
            piece = self._pieces[key] = ffi.unpack(buf, n)
        return piece

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        ptr = self._live()
        ids = ffi.new("ckv_token[]", [int(t) for t in tokens])
        buf, n = _fill(lambda b, c, k: lib.ckv_detokenize(ptr, ids, len(ids), b, c, special, k),
                       "char", "int32_t", 8 * len(ids) + 16)
        return ffi.unpack(buf, n)


# ---------------------------------------------------------------------------------------------
# Context
# ---------------------------------------------------------------------------------------------

KV_TYPES = {"f32": 0, "f16": 1}  # enum ckv_kv_type (ggml type ids)

# enum ckv_kv_policy, by the names the Python API uses.
KV_POLICIES = {"full": lib.CKV_KV_POLICY_FULL, "streaming": lib.CKV_KV_POLICY_STREAMING,
               "quest": lib.CKV_KV_POLICY_QUEST, "h2o": lib.CKV_KV_POLICY_H2O,
               "clusterkv": lib.CKV_KV_POLICY_CLUSTERKV}

# Field name -> C type of struct ckv_kv_policy_params, read from the cdef so it cannot drift.
KV_POLICY_FIELDS = {name: field.type.cname
                    for name, field in ffi.typeof("struct ckv_kv_policy_params").fields}

# Symbols a library with KV policies exports; an older build lacks them.
_KV_POLICY_SYMBOLS = ("ckv_context_get_kv_stats", "ckv_context_reset_kv_stats",
                      "ckv_context_kv_n_clusters", "ckv_context_kv_selection",
                      "ckv_context_set_kv_policy")


def kv_policies_available() -> bool:
    """True when the loaded library implements the KV-policy calls of clusterkv.h."""
    for symbol in _KV_POLICY_SYMBOLS:
        try:
            getattr(lib, symbol)
        except AttributeError:  # cffi ABI mode: a missing symbol fails at first access
            return False
    return True


def _require_kv_policies() -> None:
    if not kv_policies_available():
        raise UnsupportedError(lib.CKV_ERR_UNSUPPORTED,
                               "this libclusterkv build has no KV policies (%s is missing): "
                               "rebuild the native library" % _KV_POLICY_SYMBOLS[0])


def kv_policy_defaults() -> dict:
    """The library's default struct ckv_kv_policy_params as {field: value}."""
    params = ffi.new("struct ckv_context_params *")
    lib.ckv_context_default_params(params)
    return {name: getattr(params.kv_policy, name) for name in KV_POLICY_FIELDS}


class KVStats(NamedTuple):
    """struct ckv_kv_stats: what the KV policy did since the context began or was reset."""

    n_steps: int
    n_attended: int
    n_cached: int
    t_cluster_ms: float
    t_select_ms: float
    n_clusters: int
    n_fetched: int


class Timings(NamedTuple):
    t_prefill_ms: float
    t_decode_ms: float
    n_prefill: int
    n_decode: int


class _Context(_Handle):
    """Owns a ckv_context: the KV caches of n_seq_max sequences and the logits of the last
    decode. The methods without a seq argument work on sequence 0."""

    _kind = "context"

    def __init__(self, model: _Model, *, n_ctx: int = 512, n_batch: int = 512,
                 n_threads: int = 0, kv_type: int = 1, kv_policy: Optional[dict] = None,
                 f32_activations: bool = False, n_seq_max: int = 1, kv_offload: bool = False,
                 embeddings: bool = False):
        """kv_policy: {field of struct ckv_kv_policy_params: value}, applied over the
        library's defaults (None: the defaults, i.e. the full policy)."""
        params = ffi.new("struct ckv_context_params *")
        lib.ckv_context_default_params(params)
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_threads = n_threads
        params.kv_type = kv_type
        params.f32_activations = 1 if f32_activations else 0
        params.n_seq_max = n_seq_max
        params.kv_offload = 1 if kv_offload else 0
        params.embeddings = 1 if embeddings else 0
        if kv_policy and kv_policy.get("policy", lib.CKV_KV_POLICY_FULL) != lib.CKV_KV_POLICY_FULL:
            _require_kv_policies()
        for name, value in (kv_policy or {}).items():
            setattr(params.kv_policy, name, value)
        self.kv_policy = {name: getattr(params.kv_policy, name) for name in KV_POLICY_FIELDS}
        out = ffi.new("ckv_context **")
        _check(lib.ckv_context_init(model._live(), params, out))
        self.ptr = out[0]
        self.model = model  # a context must not outlive its model
        self.n_vocab = model.n_vocab()
        self.n_embd = model.info().n_embd

    def _free(self, ptr) -> None:
        lib.ckv_context_free(ptr)

    def n_ctx(self) -> int:
        return lib.ckv_context_n_ctx(self._live())

    def n_batch(self) -> int:
        return lib.ckv_context_n_batch(self._live())

    def n_threads(self) -> int:
        return lib.ckv_context_n_threads(self._live())

    def set_n_threads(self, n_threads: int) -> None:
        _check(lib.ckv_context_set_n_threads(self._live(), n_threads))

    def n_past(self) -> int:
        return lib.ckv_context_n_past(self._live())

    def truncate(self, n_keep: int) -> None:
        _check(lib.ckv_context_truncate(self._live(), n_keep))

    def n_seq_max(self) -> int:
        return lib.ckv_context_n_seq_max(self._live())

    def n_past_seq(self, seq: int) -> int:
        n = lib.ckv_context_n_past_seq(self._live(), seq)
        if n < 0:
            _check(lib.CKV_ERR_INVALID_ARG)
        return n

    def truncate_seq(self, seq: int, n_keep: int) -> None:
        _check(lib.ckv_context_truncate_seq(self._live(), seq, n_keep))

    def decode_seq(self, seq: int, tokens: Sequence[int], all_logits: bool = False) -> None:
        ids = ffi.new("ckv_token[]", [int(t) for t in tokens])
        _check(lib.ckv_decode_seq(self._live(), seq, ids, len(ids), all_logits))

    def decode_batch(self, tokens: Sequence[int], seqs: Sequence[int]) -> None:
        """One decode step of each sequence seqs[i] with tokens[i]; logits row i is its."""
        ids = ffi.new("ckv_token[]", [int(t) for t in tokens])
        sq = ffi.new("int32_t[]", [int(s) for s in seqs])
        if len(ids) != len(sq):
            raise ValueError("decode_batch: %d tokens for %d sequences" % (len(ids), len(sq)))
        _check(lib.ckv_decode_batch(self._live(), ids, sq, len(ids)))

    def set_kv_policy(self, kv_policy: dict) -> None:
        """Switches to kv_policy ({field: value} over the library's defaults), keeping the
        cached positions; on an error the old policy stays (ckv_context_set_kv_policy)."""
        _require_kv_policies()
        params = ffi.new("struct ckv_context_params *")
        lib.ckv_context_default_params(params)
        for name, value in kv_policy.items():
            setattr(params.kv_policy, name, value)
        _check(lib.ckv_context_set_kv_policy(self._live(), ffi.addressof(params, "kv_policy")))
        self.kv_policy = {name: getattr(params.kv_policy, name) for name in KV_POLICY_FIELDS}

    def decode(self, tokens: Sequence[int], all_logits: bool = False) -> None:
        ids = ffi.new("ckv_token[]", [int(t) for t in tokens])
        _check(lib.ckv_decode(self._live(), ids, len(ids), all_logits))

    def state_save(self, seq: int = 0) -> bytes:
        """Sequence seq's cached rows (and last logits row) as bytes (ckv_context_state_save)."""
        ptr = self._live()
        size = ffi.new("uint64_t *")
        _check(lib.ckv_context_state_size(ptr, seq, size))
        buf = ffi.new("char[]", max(int(size[0]), 1))
        _check(lib.ckv_context_state_save(ptr, seq, buf, len(buf), size))
        return ffi.buffer(buf, int(size[0]))[:]

    def state_load(self, data: bytes, seq: int = 0) -> None:
        """Replaces sequence seq's cache by a saved state (ckv_context_state_load)."""
        data = bytes(data)
        _check(lib.ckv_context_state_load(self._live(), seq, ffi.from_buffer(data), len(data)))

    def n_outputs(self) -> int:
        return lib.ckv_get_n_outputs(self._live())

    def logits_ptr(self, i: int = -1):
        """Row i of the last decode's logits as a native float* (valid until the next decode)."""
        ptr = lib.ckv_get_logits(self._live(), i)
        if ptr == ffi.NULL:
            raise IndexError("no logits row %d (the last decode kept %d)" % (i, self.n_outputs()))
        return ptr

    def logits(self, i: int = -1) -> np.ndarray:
        """Zero-copy, read-only [n_vocab] float32 view of row i; copy it to keep it past the
        next decode."""
        view = np.frombuffer(ffi.buffer(self.logits_ptr(i), self.n_vocab * 4), dtype=np.float32)
        view.flags.writeable = False
        return view

    def embeddings(self) -> np.ndarray:
        """[rows, n_embd] float32 copy of the last decode's final-normed hidden states, one
        row per evaluated token (a context made with embeddings=True; 0 rows otherwise)."""
        ptr = self._live()
        rows = lib.ckv_get_n_embeddings(ptr)
        if rows == 0:
            return np.zeros((0, self.n_embd), dtype=np.float32)
        data = np.frombuffer(ffi.buffer(lib.ckv_get_embeddings(ptr, 0), rows * self.n_embd * 4),
                             dtype=np.float32)
        return data.reshape(rows, self.n_embd).copy()

    def timings(self) -> Timings:
        out = ffi.new("struct ckv_timings *")
        lib.ckv_context_get_timings(self._live(), out)
        return Timings(out.t_prefill_ms, out.t_decode_ms, int(out.n_prefill), int(out.n_decode))

    def reset_timings(self) -> None:
        lib.ckv_context_reset_timings(self._live())

    # --- KV policy ---

    def kv_stats(self) -> KVStats:
        _require_kv_policies()
        out = ffi.new("struct ckv_kv_stats *")
        lib.ckv_context_get_kv_stats(self._live(), out)
        return KVStats(int(out.n_steps), int(out.n_attended), int(out.n_cached),
                       float(out.t_cluster_ms), float(out.t_select_ms), int(out.n_clusters),
                       int(out.n_fetched))

    def kv_memory(self) -> Dict[str, int]:
        out = ffi.new("struct ckv_kv_memory *")
        _check(lib.ckv_context_kv_memory(self._live(), out))
        return {"device_kv": int(out.device_kv), "host_kv": int(out.host_kv),
                "device_policy": int(out.device_policy)}

    def reset_kv_stats(self) -> None:
        _require_kv_policies()
        lib.ckv_context_reset_kv_stats(self._live())

    def kv_n_clusters(self, il: int, kv_head: int) -> int:
        """Clusters held by (layer il, KV head kv_head); 0 for dense layers and other policies."""
        _require_kv_policies()
        out = ffi.new("int32_t *")
        _check(lib.ckv_context_kv_n_clusters(self._live(), il, kv_head, out))
        return int(out[0])

    def kv_selection(self, il: int, head: int) -> np.ndarray:
        """int32 positions query head `head` of layer il attended to at the last decode step."""
        _require_kv_policies()
        ptr = self._live()
        buf, n = _fill(lambda b, c, k: lib.ckv_context_kv_selection(ptr, il, head, b, c, k),
                       "int32_t", "int32_t", max(self.n_past(), 1))
        return np.frombuffer(ffi.buffer(buf, 4 * n), dtype=np.int32).copy()


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


class SamplerParams(NamedTuple):
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    typical_p: float = 1.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1


class _Sampler(_Handle):
    """Owns a ckv_sampler: penalties -> top_k -> typical -> top_p -> min_p -> temperature ->
    draw, or penalties -> temperature -> Mirostat -> draw."""

    _kind = "sampler"

    def __init__(self, model: _Model, params: SamplerParams, seed: int):
        p = ffi.new("struct ckv_sampler_params *")
        lib.ckv_sampler_default_params(p)
        for field, value in params._asdict().items():
            setattr(p, field, value)
        p.seed = seed & 0xFFFFFFFFFFFFFFFF
        out = ffi.new("ckv_sampler **")
        _check(lib.ckv_sampler_init(model._live(), p, out))
        self.ptr = out[0]
        self.params = params
        self.model = model

    def _free(self, ptr) -> None:
        lib.ckv_sampler_free(ptr)

    def sample_ptr(self, logits_ptr, n_vocab: int) -> int:
        """Samples from a native float* row (no copy)."""
        out = ffi.new("ckv_token *")
        _check(lib.ckv_sampler_sample(self._live(), logits_ptr, n_vocab, out))
        return int(out[0])

    def sample(self, logits: np.ndarray) -> int:
        row = np.ascontiguousarray(logits, dtype=np.float32)
        return self.sample_ptr(ffi.from_buffer("float[]", row), row.shape[0])

    def accept(self, token: int) -> None:
        lib.ckv_sampler_accept(self._live(), token)

    def reset(self, seed: int) -> None:
        lib.ckv_sampler_reset(self._live(), seed & 0xFFFFFFFFFFFFFFFF)



class _Grammar(_Handle):
    """Owns a ckv_grammar: a compiled GBNF grammar and where the generated text stands in it.
    Without a model it works on text only (accept_text, is_complete)."""

    _kind = "grammar"

    def __init__(self, model: Optional["_Model"], text: str, root: str = "root"):
        out = ffi.new("ckv_grammar **")
        _check(lib.ckv_grammar_init(model._live() if model is not None else ffi.NULL,
                                    text.encode("utf-8"), root.encode("utf-8"), out))
        self.ptr = out[0]
        self.model = model
        self.key = (text, root)

    def _free(self, ptr) -> None:
        lib.ckv_grammar_free(ptr)

    def reset(self) -> None:
        _check(lib.ckv_grammar_reset(self._live()))

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Returns a float32 copy of the row with every forbidden logit at -inf."""
        row = np.array(logits, dtype=np.float32)
        _check(lib.ckv_grammar_apply(self._live(), ffi.from_buffer("float[]", row), row.shape[0],
                                     ffi.NULL))
        return row

    def allows(self, token: int) -> bool:
        out = ffi.new("bool *")
        _check(lib.ckv_grammar_allows(self._live(), int(token), out))
        return bool(out[0])

    def accept_token(self, token: int) -> None:
        _check(lib.ckv_grammar_accept_token(self._live(), int(token)))

    def accept_text(self, data: bytes) -> bool:
        out = ffi.new("bool *")
        _check(lib.ckv_grammar_accept_text(self._live(), data, len(data), out))
        return bool(out[0])

    def is_complete(self) -> bool:
        return bool(lib.ckv_grammar_is_complete(self._live()))

def logits_to_logprobs(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """log-softmax in float32, stable for large logits."""
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def token_array(tokens: Optional[Sequence[int]]) -> List[int]:
    """A plain list of Python ints from a list, tuple or numpy array of token ids."""
    if tokens is None:
        return []
    if isinstance(tokens, np.ndarray):
        return tokens.astype(np.int64, copy=False).tolist()
    return [int(t) for t in tokens]
