"""The cffi (ABI mode) binding to libclusterkv: the only module that imports cffi.

`ffi` carries the declarations of native/include/clusterkv.h (see _cdef.py); `lib` is the
loaded shared library. The library is looked up in $CLUSTERKV_LIB, then next to this file
(where `pip install .` puts it), then in a development build folder, then in the installed
distribution (so a source checkout whose package was installed with `pip install .` works from
the checkout's root, as `python -m pytest` there imports the source tree); a failure lists every
place it looked.
"""
import os
import sys

import cffi

from ._cdef import CDEF

ffi = cffi.FFI()
ffi.cdef(CDEF)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _library_names() -> list:
    if sys.platform == "win32":
        return ["clusterkv.dll", "libclusterkv.dll"]
    if sys.platform == "darwin":
        return ["libclusterkv.dylib"]
    return ["libclusterkv.so"]


def _candidate_paths() -> list:
    paths = []
    env = os.environ.get("CLUSTERKV_LIB")
    if env:
        paths.append(env)
    repo_root = os.path.dirname(_PACKAGE_DIR)
    for folder in (_PACKAGE_DIR, os.path.join(repo_root, "build"), _installed_package_dir()):
        if folder:
            paths.extend(os.path.join(folder, name) for name in _library_names())
    return paths


def _installed_package_dir():
    """The clusterkv_local folder of the installed distribution, or None."""
    try:
        from importlib import metadata

        return str(metadata.distribution("clusterkv-local").locate_file("clusterkv_local"))
    except Exception:  # not installed, or metadata unreadable: just one place fewer to look
        return None


def api_mismatch(library, want: int) -> str:
    """Why `library` cannot be driven by declarations of API version `want` ("" if it can): its
    structs and signatures are those of the CKV_API_VERSION it reports."""
    try:
        have = library.ckv_api_version()
    except AttributeError:   # built before the version was exported
        return "an older build without ckv_api_version; this package needs API version %d" % want
    if have != want:
        return "API version %d, this package needs %d" % (have, want)
    return ""


def _load():
    errors = []
    for path in _candidate_paths():
        if not os.path.exists(path):
            errors.append("%s (not found)" % path)
            continue
        try:
            library = ffi.dlopen(path)
        except OSError as exc:
            errors.append("%s (%s)" % (path, exc))
            continue
        why = api_mismatch(library, library.CKV_API_VERSION)   # the constant comes from _cdef.py
        if not why:
            return library, path
        ffi.dlclose(library)
        errors.append("%s (%s: rebuild it from this source tree)" % (path, why))
    raise ImportError("could not load the clusterkv native library; looked in:\n  "
                      + "\n  ".join(errors)
                      + "\nInstall the package with `pip install .` or set CLUSTERKV_LIB.")


lib, library_path = _load()
