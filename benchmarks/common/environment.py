"""What a benchmark ran on: versions, machine, load, and the commit of the code.

- `environment`: the record in `compare.json`, `study.json` and `beyond.json`.
- `machine_info`: the fuller record of `step_time.json`, whose timings depend on the machine.
- `load_average`, `git_state`, `display_path`.
- `COMPILER_OPTIONS`: what the quick modes compile with.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import optax

import optim_zoo

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where every program writes its results by default, and reads the committed ones.
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# A quick mode (the study's, the beyond study's, `step_time.py --quick`) compiles dozens of small
# programs and runs each for a few steps: XLA's backend optimisations would take most of its
# time and buy nothing there. They are not free for values: at level 0, two of the 64 recorded
# trajectories of tests/test_bit_identity.py (bfloat16 state) come out different, so nothing that
# checks a value against a record may compile with these options.
COMPILER_OPTIONS = {"quick": {"xla_backend_optimization_level": 0}, "full": None}


def environment() -> dict[str, Any]:
    """Package versions, Python, and the machine and device the run used."""
    return {
        # The package's own attribute: also right when it runs from a checkout, uninstalled.
        "optim_zoo": optim_zoo.__version__,
        **{package: metadata.version(package) for package in ("jax", "jaxlib", "optax")},
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": str(jax.devices()[0].device_kind),
        # XLA:CPU compiles for the processor's vector units, and a reduction's float32 sum can
        # end in another bit with another width (docs/evidence.md): say which the run had.
        "cpu": _cpu_name(),
        "cpu_vector_isa": _vector_isa(),
    }


def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo (None where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(field)), None)


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor()


def _vector_isa() -> str | None:
    """The widest x86 vector instruction set the processor reports (None where unknown)."""
    flags = (_cpuinfo("flags") or "").split()
    for isa, flag in (
        ("AVX-512", "avx512f"),
        ("AVX2", "avx2"),
        ("AVX", "avx"),
        ("SSE4.2", "sse4_2"),
    ):
        if flag in flags:
            return isa
    return None


def _gpu_description() -> str:
    if jax.default_backend() != "gpu":
        return "No GPU was available for these measurements (CPU only)"
    kinds = sorted({d.device_kind for d in jax.devices()})
    return f"GPU: {len(jax.devices())} x {', '.join(kinds)}; JAX and PyTorch rows run on it"


def machine_info() -> dict[str, Any]:
    """The processor, memory, devices and the versions of every library that was timed."""
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "optim_zoo": optim_zoo.__version__,
        "gpu": _gpu_description(),
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for module in ("torch", "pytorch_optimizer"):
        try:
            info[module] = importlib.import_module(module).__version__
        except Exception:
            pass
    try:
        info["timm"] = metadata.version("timm")
    except Exception:
        pass
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_state() -> dict[str, Any]:
    """The commit the package ran at, and whether optim_zoo/ differed from it (None: no git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "optim_zoo_modified": bool(git("status", "--porcelain", "--", "optim_zoo")),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "optim_zoo_modified": None}


def display_path(path: Path) -> str:
    """`path` relative to the repository when it lies inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
