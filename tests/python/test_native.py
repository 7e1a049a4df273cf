"""Builds the native C tests with CMake (a separate build tree) and runs each one.

The C tests (tests/native/test-*.c) check the GGUF reader against hostile files, the quant
kernels against their scalar reference, and that the public header compiles alone as strict
C11. Skipped when cmake or a C compiler is missing.
"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NATIVE_TESTS = sorted(name[:-2] for name in os.listdir(os.path.join(ROOT, "tests", "native"))
                      if name.startswith("test-") and name.endswith(".c") and name != "test-header.c")


@pytest.fixture(scope="module")
def native_build(tmp_path_factory):
    if not shutil.which("cmake") or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("cmake or a C compiler is not available")
    build = tmp_path_factory.mktemp("native-build")
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DCKV_CUDA=OFF", "-DCKV_BUILD_TESTS=ON"], check=True, capture_output=True)
    result = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
                            capture_output=True, text=True)
    assert result.returncode == 0, "native build failed:\n" + result.stdout[-4000:] + result.stderr[-4000:]
    return build


def test_header_compiles_alone(native_build):
    # The ckv_test_header object library is compiled with -std=c11 -pedantic -Werror.
    objects = [f for _, _, files in os.walk(native_build) for f in files if f.startswith("test-header.c.o")]
    assert objects, "test-header.c was not compiled"


@pytest.mark.parametrize("name", NATIVE_TESTS)
def test_native(native_build, name):
    exe = os.path.join(native_build, name)
    result = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, "%s failed:\n%s%s" % (name, result.stdout[-6000:], result.stderr[-3000:])
