"""Set-up shared by every test file: a compilation cache for the test session.

The suite compiles thousands of small programs, and many of them more than once: a resumed run
compiles the step its uninterrupted twin did, and a test that builds a fresh optimizer and jits
a fresh function recompiles a program an earlier test already compiled. JAX's persistent
compilation cache, kept in a temporary folder of each test process and removed when it ends,
hands back the executable XLA built the first time, so no value changes (only the time to
compile it). Subprocesses (the mesh, multi-process and notebook tests) do not inherit it.

The cache is switched on before anything is collected: JAX decides whether to use it at the
first compile of a process and keeps that decision.
"""

from __future__ import annotations

import shutil
import tempfile

import jax
import pytest

_CACHE_DIR_KEY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    cache_dir = tempfile.mkdtemp(prefix="optim_zoo_jax_cache_")
    config.stash[_CACHE_DIR_KEY] = cache_dir
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Every program, however quick to compile or small (the defaults skip those under 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config: pytest.Config) -> None:
    cache_dir = config.stash.get(_CACHE_DIR_KEY, None)
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
