"""Shared by the ecosystem tests (Flax, Orbax, optax wrappers, device meshes).

`OPTIMIZERS` holds one configuration of every optim_zoo optimizer, chosen to exercise each one's
state and reductions: Adan with its proximal weight decay; Adafactor factoring 8x16 matrices
(`min_dim_size_to_factor=2`) with momentum, clipping, parameter scale and decay; Apollo with the
belief rebound and stable decay (a per-tensor max, sums and a mean); Adai with L2 decay and AdaiW
(each a global mean). The configurations are factories plus keyword arguments so that
`optax.inject_hyperparams` can wrap them.

The sharded runs add `SHARDED_ONLY` to `OPTIMIZERS`: the new combinations factored_adan and
factored_adai, whose factored statistics must be sharded like their matrices minus the reduced
axis, and Adan with bfloat16 state. The single-device ecosystem tests (`test_wrappers.py` and
the others) keep per-name tables for the five paper optimizers, so they see those five only.
To run a sharded file directly with its additions, set `OPTIM_ZOO_SHARDED_TEST_FILE` to its
name (e.g. `mesh_jax.py`) as well as `XLA_FLAGS`.

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

# Per sharded test file, the configurations it runs besides `OPTIMIZERS`. mesh_nnx.py finds a
# statistic's name as the first of ("v_row", "v_col", "v") on its path, which for factored
# Adai's `v.v_row` is the state field `v`, so factored_adai runs in mesh_jax.py only; the
# bfloat16 state, which changes no sharding, too.
_FACTORED_ADAN = (
    "factored_adan",
    optim_zoo.factored_adan,
    {"learning_rate": 1e-2, "weight_decay": 1e-2, "min_dim_size_to_factor": 2},
)
_FACTORED_ADAI = (
    "factored_adai",
    optim_zoo.factored_adai,
    {"learning_rate": 0.1, "weight_decay": 1e-3, "min_dim_size_to_factor": 2},
)
# Elementwise, so the sharded run equals the single-device one bit for bit even in bfloat16.
_ADAN_BF16_STATE = (
    "adan_bf16_state",
    optim_zoo.adan,
    {
        "learning_rate": 1e-2,
        "weight_decay": 1e-2,
        "dtype_momentum": "bfloat16",
        "dtype_second_moment": "bfloat16",
    },
)
SHARDED_ONLY = {
    "mesh_jax.py": [_FACTORED_ADAN, _FACTORED_ADAI, _ADAN_BF16_STATE],
    "mesh_nnx.py": [_FACTORED_ADAN, _FACTORED_ADAI],
}
# Set by `run_pytest_on_host_devices` to the file its subprocess runs.
_SHARDED_FILE_VARIABLE = "OPTIM_ZOO_SHARDED_TEST_FILE"
OPTIMIZERS = OPTIMIZERS + SHARDED_ONLY.get(os.environ.get(_SHARDED_FILE_VARIABLE, ""), [])

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
    env[_SHARDED_FILE_VARIABLE] = test_file
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
