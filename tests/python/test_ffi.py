"""The cffi binding (_ffi.py, _cdef.py) and the error layer of _internals.py.

The committed cdef must be what tools/gen_cdef.py makes from clusterkv.h, every function the
header declares must be exported by the loaded library, and every status code must map to the
right exception class.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import require_native

_ffi = require_native()
ffi, lib = _ffi.ffi, _ffi.lib

from clusterkv_local import _cdef, _internals  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = os.path.join(ROOT, "native", "include", "clusterkv.h")


def header_functions() -> set:
    """Names of the functions declared with CKV_API in the public header."""
    with open(HEADER, encoding="utf-8") as f:
        text = f.read()
    return set(re.findall(r"CKV_API\s+[^;(]*?\b(ckv_\w+)\s*\(", text))


def cdef_functions() -> set:
    names = set()
    for line in _cdef.CDEF.splitlines():
        if line.startswith("typedef"):
            continue
        names.update(re.findall(r"^[\w\s\*]*?\b(ckv_\w+)\s*\(", line))
    return names


def test_committed_cdef_is_up_to_date():
    if not any(shutil.which(cc) for cc in (os.environ.get("CC") or "cc", "gcc", "clang")):
        pytest.skip("no C compiler to preprocess the header")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_cdef.py"),
                             "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cdef_declares_every_header_function():
    declared = header_functions()
    assert len(declared) >= 45
    assert declared == cdef_functions()


def test_library_exports_every_header_function():
    missing = []
    for name in sorted(header_functions()):
        try:
            getattr(lib, name)
        except AttributeError:
            missing.append(name)
    assert not missing, "%s lacks %s" % (_ffi.library_path, missing)


def test_library_identity():
    import clusterkv_local

    assert os.path.isfile(_ffi.library_path)
    assert _internals.native_version() == clusterkv_local.__version__
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        assert 'version = "%s"' % clusterkv_local.__version__ in f.read()
    assert lib.CKV_API_VERSION == 5 and lib.ckv_api_version() == lib.CKV_API_VERSION
    assert "CPU" in _internals.system_info()


def test_a_library_of_another_api_version_is_refused():
    """The binding's structs must be the library's: a build of another API version (or one from
    before the version was exported) is named, not driven."""
    class Built:   # a library reporting its version
        def __init__(self, version):
            self.ckv_api_version = lambda: version

    assert _ffi.api_mismatch(lib, lib.CKV_API_VERSION) == ""
    assert _ffi.api_mismatch(Built(2), 2) == ""
    assert _ffi.api_mismatch(Built(1), 2) == "API version 1, this package needs 2"
    assert "older build without ckv_api_version" in _ffi.api_mismatch(object(), 2)


@pytest.mark.parametrize("status, cls, builtin", [
    (lib.CKV_ERR_INVALID_ARG, _internals.InvalidArgumentError, ValueError),
    (lib.CKV_ERR_FORMAT, _internals.ModelFormatError, ValueError),
    (lib.CKV_ERR_UNSUPPORTED, _internals.UnsupportedError, RuntimeError),
    (lib.CKV_ERR_OOM, _internals.OutOfMemoryError, MemoryError),
    (lib.CKV_ERR_CTX_FULL, _internals.ContextFullError, ValueError),
    (lib.CKV_ERR_IO, _internals.ModelIOError, OSError),
    (lib.CKV_ERR_CUDA, _internals.CudaError, RuntimeError),
    (lib.CKV_ERR_NOT_FOUND, _internals.NotFoundError, LookupError),
    (lib.CKV_ERR_BUFFER_TOO_SMALL, _internals.ClusterKVError, RuntimeError),
])
def test_status_maps_to_exception(status, cls, builtin):
    with pytest.raises(cls) as info:
        _internals._check(status)
    err = info.value
    assert type(err) is cls and isinstance(err, builtin)
    assert isinstance(err, _internals.ClusterKVError) and err.status == status
    assert err.status_name == ffi.string(lib.ckv_status_name(status)).decode()
    assert err.status_name.startswith("CKV_ERR_") and err.status_name in str(err)


def test_ok_does_not_raise():
    assert _internals._check(lib.CKV_OK) is None
    assert _internals.status_name(0) == "CKV_OK"


def test_fill_retries_once_with_the_needed_size():
    calls = []

    def fill(buf, cap, n_needed):
        calls.append(cap)
        n_needed[0] = 10
        if cap < 10:
            return lib.CKV_ERR_BUFFER_TOO_SMALL
        ffi.memmove(buf, b"0123456789", 10)
        return lib.CKV_OK

    buf, n = _internals._fill(fill, "char", "int32_t", 4)
    assert calls == [4, 11] and n == 10 and ffi.unpack(buf, n) == b"0123456789"


def test_fill_gives_up_after_one_retry():
    def always_small(buf, cap, n_needed):
        n_needed[0] = cap + 1
        return lib.CKV_ERR_BUFFER_TOO_SMALL

    with pytest.raises(_internals.ClusterKVError) as info:
        _internals._fill(always_small, "char", "size_t", 4)
    assert info.value.status == lib.CKV_ERR_BUFFER_TOO_SMALL


def test_model_path_is_checked_before_native_code(tmp_path):
    with pytest.raises(_internals.ModelNotFoundError):
        _internals._Model(str(tmp_path / "missing.gguf"))
    with pytest.raises(_internals.ModelIOError, match="directory"):
        _internals._Model(str(tmp_path))


def test_native_log_lines_reach_python_logging(caplog):
    with caplog.at_level("DEBUG", logger="clusterkv_local.native"):
        _internals._log_line(lib.CKV_LOG_WARN, ffi.new("char[]", b"mmap failed\n"), ffi.NULL)
        _internals._log_line(lib.CKV_LOG_DEBUG, ffi.new("char[]", b"detail"), ffi.NULL)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "mmap failed"), ("DEBUG", "detail")]
