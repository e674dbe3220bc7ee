"""Set-up shared by every test file: a compilation cache for the test session.

The suite compiles thousands of small programs, and many of them more than once: a resumed run
compiles the step its uninterrupted twin did, and a test that builds a fresh optimizer and jits
a fresh function recompiles a program an earlier test already compiled, often in another
file, which ``-n 2`` may give to the other worker. JAX's persistent compilation cache, kept in
one temporary folder for the whole session (pytest-xdist's workers share the controller's) and
removed when it ends, hands back the executable XLA built the first time, so no value changes
(only the time to compile it). Subprocesses (the mesh, multi-process and notebook tests) do
not inherit it.

The cache is switched on before anything is collected: JAX decides whether to use it at the
first compile of a process and keeps that decision.
"""

from __future__ import annotations

import shutil
import tempfile

import jax
import pytest

_CACHE_DIR_KEY = pytest.StashKey[str]()
# The controller's folder, handed to each pytest-xdist worker (pytest_configure_node).
_WORKER_KEY = "optim_zoo_jax_cache_dir"


def pytest_configure(config: pytest.Config) -> None:
    shared = getattr(config, "workerinput", {}).get(_WORKER_KEY)  # an xdist worker's
    cache_dir = shared or tempfile.mkdtemp(prefix="optim_zoo_jax_cache_")
    if shared is None:  # this process made it, and removes it
        config.stash[_CACHE_DIR_KEY] = cache_dir
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Every program, however quick to compile or small (the defaults skip those under 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config: pytest.Config) -> None:
    cache_dir = config.stash.get(_CACHE_DIR_KEY, None)
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """pytest-xdist, in the controller: each worker gets the controller's cache folder."""
    node.workerinput[_WORKER_KEY] = node.config.stash[_CACHE_DIR_KEY]
