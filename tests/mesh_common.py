"""Shared by the ecosystem tests (Flax, Orbax, optax wrappers, device meshes).

`OPTIMIZERS` holds one configuration of every optim_zoo optimizer, chosen to exercise each one's
state and reductions: Adan with its proximal weight decay; Adafactor factoring 8x16 matrices
(`min_dim_size_to_factor=2`) with momentum, clipping, parameter scale and decay; Apollo with the
belief rebound and stable decay (a per-tensor max, sums and a mean); Adai with L2 decay and AdaiW
(each a global mean). The configurations are factories plus keyword arguments so that
`optax.inject_hyperparams` can wrap them.

`run_pytest_on_host_devices` runs a test file in a fresh interpreter with 8 host CPU devices.
`--xla_force_host_platform_device_count` is read once, when jax initialises its backends, and
the main pytest process (or another test module, or a conftest) may already have initialised
jax with one device; a subprocess is the only place where the flag is sure to take effect,
without slowing every other test down with 8 devices on a small CI machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optim_zoo

OPTIMIZERS = [
    ("adan", optim_zoo.adan, {"learning_rate": 1e-2, "weight_decay": 1e-2}),
    (
        "adafactor",
        optim_zoo.adafactor,
        {
            "learning_rate": 1e-2,
            "min_dim_size_to_factor": 2,
            "momentum": 0.9,
            "weight_decay_rate": 1e-3,
        },
    ),
    (
        "apollo",
        optim_zoo.apollo,
        {
            "learning_rate": 1e-2,
            "warmup": 5,
            "init_lr": 1e-3,
            "rebound": "belief",
            "weight_decay": 1e-2,
            "weight_decay_type": "stable",
        },
    ),
    ("adai", optim_zoo.adai, {"learning_rate": 0.1, "weight_decay": 1e-3}),
    ("adaiw", optim_zoo.adaiw, {"learning_rate": 0.1, "weight_decay": 1e-3}),
]

OPTIMIZER_IDS = [name for name, _, _ in OPTIMIZERS]

NUM_HOST_DEVICES = 8


def make_optimizer(name: str):
    """The optimizer called `name` in `OPTIMIZERS`, built."""
    for candidate, factory, kwargs in OPTIMIZERS:
        if candidate == name:
            return factory(**kwargs)
    raise KeyError(name)


def run_pytest_on_host_devices(test_file: str, timeout: float = 600.0) -> str:
    """Runs `tests/<test_file>` with 8 host CPU devices in a subprocess; returns its output.

    Fails (with the subprocess's output) unless every collected test passed and none was
    skipped, so that a subprocess that silently saw one device cannot pass.
    """
    tests_dir = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    flag = f"--xla_force_host_platform_device_count={NUM_HOST_DEVICES}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(tests_dir / test_file),
    ]
    result = subprocess.run(
        command,
        cwd=tests_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{test_file} failed on {NUM_HOST_DEVICES} devices:\n{output}"
    summary = output.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, output
    return output
