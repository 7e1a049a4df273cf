"""Saved evaluation states and prompt caches, as llama-cpp-python has them.

`Llama.save_state()` returns a `LlamaState`: the evaluated tokens, their logits, and the native
cache rows (ckv_context_state_save: the K/V rows of every layer plus a fingerprint of the model).
`Llama.load_state(state)` puts them back, so a long prompt is evaluated once and reused, also in
another Llama of the same model (CPU or GPU, another KV policy, a larger n_ctx).

`Llama.set_cache(cache)` makes create_completion (and so chat) look up the state whose tokens
share the longest prefix with each prompt and start from it when that beats what the context
already holds; each completion then stores its final state. Two caches: `LlamaRAMCache` (in
memory) and `LlamaDiskCache` (a folder of .npz files, one per state, no pickle), both bounded by
`capacity_bytes` and dropping the least recently used state first.

    >>> llm.set_cache(LlamaRAMCache(capacity_bytes=1 << 30))
    >>> state = llm.save_state(); ...; llm.load_state(state)
"""
import hashlib
import os
from collections import OrderedDict
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

_DISK_FORMAT = 1


class LlamaState:
    """One Llama's evaluation state (Llama.save_state / load_state).

    input_ids: the n_tokens evaluated tokens (np.intc); scores: their logits rows (np.single,
    [rows, n_vocab]: every token's with logits_all, else only the last token's, or none when
    it is not known); llama_state: the native bytes (ckv_context_state_save) of
    llama_state_size bytes; seed: the Llama's seed when saved."""

    def __init__(self, input_ids: np.ndarray, scores: np.ndarray, n_tokens: int,
                 llama_state: bytes, llama_state_size: int, seed: int):
        self.input_ids = input_ids
        self.scores = scores
        self.n_tokens = n_tokens
        self.llama_state = llama_state
        self.llama_state_size = llama_state_size
        self.seed = seed

    def nbytes(self) -> int:
        """Memory the state holds."""
        return int(self.llama_state_size) + int(self.scores.nbytes) + int(self.input_ids.nbytes)


def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class BaseLlamaCache:
    """States keyed by token sequences; a lookup returns the state whose key shares the longest
    prefix with the tokens asked for (KeyError when no key shares any)."""

    def __init__(self, capacity_bytes: int = 2 << 30):
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError("capacity_bytes must be an int >= 0, got %r" % (capacity_bytes,))
        self.capacity_bytes = capacity_bytes

    @property
    def cache_size(self) -> int:
        raise NotImplementedError

    def _keys(self) -> Iterator[Tuple[int, ...]]:
        raise NotImplementedError

    def _find_prefix_key(self, key: Sequence[int]) -> Optional[Tuple[int, ...]]:
        best, best_len = None, 0
        for k in self._keys():
            n = longest_token_prefix(k, key)
            if n > best_len:
                best, best_len = k, n
        return best

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_prefix_key(tuple(key)) is not None

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        raise NotImplementedError

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        raise NotImplementedError


class LlamaRAMCache(BaseLlamaCache):
    """States in memory, at most capacity_bytes of them (LlamaState.nbytes)."""

    def __init__(self, capacity_bytes: int = 2 << 30):
        super().__init__(capacity_bytes)
        self.cache_state: "OrderedDict[Tuple[int, ...], LlamaState]" = OrderedDict()

    @property
    def cache_size(self) -> int:
        return sum(state.nbytes() for state in self.cache_state.values())

    def _keys(self) -> Iterator[Tuple[int, ...]]:
        return iter(list(self.cache_state))

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        found = self._find_prefix_key(tuple(key))
        if found is None:
            raise KeyError("no cached state shares a prefix with these tokens")
        self.cache_state.move_to_end(found)
        return self.cache_state[found]

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        key = tuple(int(t) for t in key)
        self.cache_state.pop(key, None)
        self.cache_state[key] = value
        size = self.cache_size
        while self.cache_state and size > self.capacity_bytes:
            _, dropped = self.cache_state.popitem(last=False)
            size -= dropped.nbytes()


# LlamaCache is llama-cpp-python's older name for the RAM cache.
LlamaCache = LlamaRAMCache


class LlamaDiskCache(BaseLlamaCache):
    """States as .npz files in cache_dir (created if missing), at most capacity_bytes of files;
    a file's modification time marks its last use. Files are read without pickle, so a cache
    folder holds data only. States of other models in the folder are skipped by Llama (their
    fingerprint differs)."""

    def __init__(self, cache_dir: str = ".cache/llama_cache", capacity_bytes: int = 2 << 30):
        super().__init__(capacity_bytes)
        self.cache_dir = os.fspath(cache_dir)
        os.makedirs(self.cache_dir, exist_ok=True)

    def _files(self) -> Iterator[str]:
        for name in sorted(os.listdir(self.cache_dir)):
            if name.endswith(".npz"):
                yield os.path.join(self.cache_dir, name)

    @property
    def cache_size(self) -> int:
        return sum(os.path.getsize(path) for path in self._files())

    @staticmethod
    def _read_key(path: str) -> Optional[Tuple[int, ...]]:
        try:
            with np.load(path, allow_pickle=False) as data:
                return tuple(data["key"].tolist())
        except (OSError, ValueError, KeyError):
            return None   # not one of ours, or half written by another process

    def _keys(self) -> Iterator[Tuple[int, ...]]:
        for path in self._files():
            key = self._read_key(path)
            if key is not None:
                yield key

    def _path(self, key: Tuple[int, ...]) -> str:
        digest = hashlib.sha256(np.asarray(key, dtype=np.int64).tobytes()).hexdigest()[:32]
        return os.path.join(self.cache_dir, digest + ".npz")

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        found = self._find_prefix_key(tuple(key))
        if found is None:
            raise KeyError("no cached state shares a prefix with these tokens")
        path = self._path(found)
        with np.load(path, allow_pickle=False) as data:
            meta = data["meta"].tolist()
            if meta[0] != _DISK_FORMAT:
                raise KeyError("cached state %s has format %d, not %d" % (path, meta[0], _DISK_FORMAT))
            blob = data["llama_state"].tobytes()
            state = LlamaState(data["input_ids"].astype(np.intc), data["scores"].astype(np.single),
                               int(meta[1]), blob, len(blob), int(meta[2]))
        os.utime(path)
        return state

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        key = tuple(int(t) for t in key)
        path = self._path(key)
        tmp = path + ".tmp-%d" % os.getpid()
        with open(tmp, "wb") as f:   # written aside, then renamed: readers never see half a file
            np.savez(f, key=np.asarray(key, dtype=np.int64),
                     input_ids=np.asarray(value.input_ids, dtype=np.intc),
                     scores=np.asarray(value.scores, dtype=np.single),
                     llama_state=np.frombuffer(value.llama_state, dtype=np.uint8),
                     meta=np.asarray([_DISK_FORMAT, value.n_tokens, value.seed], dtype=np.int64))
        os.replace(tmp, path)
        self._evict()

    def _evict(self) -> None:
        files = sorted(self._files(), key=os.path.getmtime)
        sizes = [os.path.getsize(path) for path in files]
        size = sum(sizes)
        for path, bytes_ in zip(files, sizes):
            if size <= self.capacity_bytes:
                break
            size -= bytes_
            os.remove(path)
