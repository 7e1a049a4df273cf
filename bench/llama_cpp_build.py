"""Builds the llama.cpp reference (libllama, llama-bench, llama-tokenize) from a pinned sdist.

The reference for fidelity fixtures (tests/fixtures/record_reference.py) and for the benches
(bench/cpu.py, and the GPU benches of issue 5) is the llama.cpp vendored in one pinned
llama-cpp-python sdist, so every number names one exact llama.cpp commit. From scratch this
script runs

    pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36

unpacks the sdist and builds the three targets with CMake (Release, shared libraries,
GGML_NATIVE=ON, no tests/examples/server, no curl; GGML_CUDA=ON with --cuda; AMX kernels
off where the OS does not allow AMX tiles). An existing
source or build folder is reused, so a second run only checks that the build is up to date.

The last line of stdout is a JSON object with the paths, for other scripts:

    python bench/llama_cpp_build.py --json
    {"llama_bench": ".../bin/llama-bench", "lib_dir": ".../bin", "include_dirs": [...], ...}

Example:
    python bench/llama_cpp_build.py --work-dir /tmp/llama-ref             # CPU build
    python bench/llama_cpp_build.py --work-dir /tmp/llama-ref --cuda      # GPU build (issue 5)
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# The llama.cpp commit vendored in that sdist (its CHANGELOG: "update llama.cpp to
# ggml-org/llama.cpp@0c1e57098"); the sdist carries no .git, so it is pinned here.
LLAMA_CPP_COMMIT = "0c1e57098"
TARGETS = ["llama", "llama-bench", "llama-tokenize"]
SDIST_DIR_NAME = "llama_cpp_python-%s" % LLAMA_CPP_PYTHON_VERSION


def _default_work_dir() -> str:
    env = os.environ.get("CLUSTERKV_LLAMA_CPP_DIR")
    if env:
        return env
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(cache, "clusterkv_local", "llama.cpp-" + LLAMA_CPP_PYTHON_VERSION)


def _run(cmd: list, **kwargs) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def fetch_sources(work_dir: str, src_dir: str = None) -> str:
    """Returns the unpacked sdist folder (holding vendor/llama.cpp), downloading it if needed."""
    if src_dir:
        if not os.path.isfile(os.path.join(src_dir, "vendor", "llama.cpp", "CMakeLists.txt")):
            raise SystemExit("--src %s has no vendor/llama.cpp/CMakeLists.txt" % src_dir)
        return src_dir
    src_dir = os.path.join(work_dir, SDIST_DIR_NAME)
    if os.path.isfile(os.path.join(src_dir, "vendor", "llama.cpp", "CMakeLists.txt")):
        return src_dir
    sdist = os.path.join(work_dir, SDIST_DIR_NAME + ".tar.gz")
    if not os.path.isfile(sdist):
        os.makedirs(work_dir, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--no-build-isolation", "-d", work_dir,
              "llama-cpp-python==" + LLAMA_CPP_PYTHON_VERSION])
    with tarfile.open(sdist) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(work_dir, filter="data")
        else:
            tar.extractall(work_dir)
    return src_dir


def build(src_dir: str, build_dir: str, cuda: bool = False, jobs: int = 2) -> bool:
    """Configures and builds TARGETS (an up-to-date build folder costs only a check).
    Returns whether ggml's AMX kernels are compiled in (see amx_usable)."""
    llama_dir = os.path.join(src_dir, "vendor", "llama.cpp")
    amx = amx_usable()
    # GGML_NATIVE compiles for -march=native; on a CPU that reports AMX where the OS does not
    # grant it (some VMs and sandboxes), ggml's AMX matmul dies with SIGILL, so turn it off.
    # Explicit -mno-* flags win over -march=native in GCC and Clang whatever their order.
    no_amx = "" if amx else "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    _run(["cmake", "-S", llama_dir, "-B", build_dir,
          "-DCMAKE_BUILD_TYPE=Release",
          "-DBUILD_SHARED_LIBS=ON",
          "-DGGML_NATIVE=ON",
          "-DGGML_CUDA=" + ("ON" if cuda else "OFF"),
          "-DCMAKE_C_FLAGS=" + no_amx,
          "-DCMAKE_CXX_FLAGS=" + no_amx,
          "-DLLAMA_CURL=OFF",          # older llama.cpp; harmless where the option is gone
          "-DLLAMA_OPENSSL=OFF",
          "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_SERVER=OFF",
          "-DLLAMA_BUILD_TOOLS=ON"],   # llama-bench and llama-tokenize live in tools/
         stdout=subprocess.DEVNULL)
    _run(["cmake", "--build", build_dir, "--config", "Release", "-j", str(jobs),
          "--target"] + TARGETS)
    return amx


_AMX_PROBE = r"""
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
    unsigned char cfg[64];
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1; cfg[16] = 64; cfg[48] = 16;  /* palette 1; tile 0 is 16 rows of 64 bytes */
    _tile_loadconfig(cfg);
    _tile_zero(0);
    _tile_release();
    return 0;
}
"""


def amx_usable() -> bool:
    """True when the CPU reports AMX and a tile instruction actually runs here."""
    try:
        with open("/proc/cpuinfo") as f:
            if " amx_tile" not in f.read():
                return False
    except OSError:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "probe.c"), os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(_AMX_PROBE)
        cc = os.environ.get("CC", "cc")
        if subprocess.run([cc, "-O1", "-mamx-tile", "-o", exe, src]).returncode != 0:
            return False
        return subprocess.run([exe]).returncode == 0


def describe(src_dir: str, build_dir: str, cuda: bool, amx: bool) -> dict:
    """Paths and version of a finished build (what --json prints)."""
    llama_dir = os.path.join(src_dir, "vendor", "llama.cpp")
    bin_dir = os.path.join(build_dir, "bin")
    libs = glob.glob(os.path.join(bin_dir, "libllama.*")) + glob.glob(
        os.path.join(build_dir, "src", "libllama.*"))
    return {
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "cuda": cuda,
        "amx": amx,
        "src_dir": os.path.abspath(llama_dir),
        "build_dir": os.path.abspath(build_dir),
        "bin_dir": os.path.abspath(bin_dir),
        "lib_dir": os.path.abspath(os.path.dirname(libs[0])) if libs else os.path.abspath(bin_dir),
        "llama_bench": os.path.abspath(os.path.join(bin_dir, "llama-bench")),
        "llama_tokenize": os.path.abspath(os.path.join(bin_dir, "llama-tokenize")),
        "include_dirs": [os.path.join(llama_dir, "include"), os.path.join(llama_dir, "ggml", "include")],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default=_default_work_dir(),
                    help="where the sdist and the build go (default: $CLUSTERKV_LLAMA_CPP_DIR or "
                         "~/.cache/clusterkv_local/llama.cpp-%s)" % LLAMA_CPP_PYTHON_VERSION)
    ap.add_argument("--src", help="an already unpacked llama_cpp_python sdist folder to use")
    ap.add_argument("--build-dir", help="build folder (default: WORK_DIR/build-cpu or build-cuda)")
    ap.add_argument("--cuda", action="store_true", help="build with -DGGML_CUDA=ON")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the paths as JSON on the last line")
    args = ap.parse_args(argv)

    src_dir = fetch_sources(args.work_dir, args.src)
    build_dir = args.build_dir or os.path.join(args.work_dir, "build-cuda" if args.cuda else "build-cpu")
    amx = build(src_dir, build_dir, cuda=args.cuda, jobs=args.jobs)
    info = describe(src_dir, build_dir, args.cuda, amx)
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print("%-18s %s" % (key, value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
