"""Every optimizer's trajectory, bit for bit, against the one recorded in tests/data.

A restructuring of the package must not change a single bit of any update. This test replays
every optimizer (the registry's ``trajectories`` family), in float32, bfloat16 and float64
parameters, factored and with bfloat16 state, for 25 jitted steps on a small tree, and compares
each trajectory with the one recorded in ``tests/data/trajectories*.json``.

XLA compiles for the host CPU: a machine with other vector units may sum in another order. On
the machine and jax version the record was made with (both are in the file), every trajectory
must hash to the recorded one; elsewhere the final parameters must agree to a few ulps of
their dtype, and the test says which comparison it made.

XLA:CPU generates code for the host's processor, and two processors with the same vector units
can still sum in different orders (an AMD EPYC and an Intel Xeon with AVX-512 do, for
Adafactor's float32 runs), so there is one record per kind of processor: each
``tests/data/trajectories*.json`` file names the machine it was made on, and a machine
matches a record when it agrees with every entry the record names.

``python -m tests.test_bit_identity --record`` writes this machine's record anew; do that only
for a change that is meant to change the numbers (then on every kind of machine that has a
record), or to add a kind of machine, and say so in its commit.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import platform
import sys
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fixtures import registry

RECORD_DIR = pathlib.Path(__file__).parent / "data"
NUM_STEPS = 25
BF16 = jnp.bfloat16
_BF16_STATE = {"dtype_momentum": BF16, "dtype_second_moment": BF16}

CONFIGS = registry.select("trajectories")
# Parameter dtype per run; bfloat16 state on float32 parameters for every configuration.
RUNS = [
    (case.name, param_dtype, state)
    for case in CONFIGS
    for param_dtype, state in (("float32", ""), ("bfloat16", ""), ("float64", ""))
    + (("float32", "bf16_state"),)
]
_SHAPES = {"conv": (2, 3, 3, 4), "w": (8, 5), "tall": (3, 9), "b": (5,), "s": ()}


def _initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12)
    return {name: rng.normal(size=shape) for name, shape in _SHAPES.items()}


def _gradient(name: str, p: np.ndarray, t: int) -> np.ndarray:
    """A fixed, curved objective's gradient, in float64 NumPy from the current parameters."""
    i = np.arange(p.size, dtype=np.float64).reshape(p.shape)
    return (1 + 0.3 * (i % 4)) * p + 0.2 * p**3 / (1 + p**2) + 0.5 * np.sin(0.7 * t + i + len(name))


def trajectory(name: str, param_dtype: str, state: str) -> tuple[str, dict[str, list[float]]]:
    """The sha256 of every step's parameters, and the final parameters (as float64)."""
    with jax.enable_x64(param_dtype == "float64"):
        dtype = jnp.dtype(param_dtype)
        tx = registry.make("trajectories", name, **(_BF16_STATE if state else {}))
        params = {n: jnp.asarray(p, dtype) for n, p in _initial_params().items()}
        opt_state = tx.init(params)

        @jax.jit
        def step(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        digest = hashlib.sha256()
        for t in range(1, NUM_STEPS + 1):
            grads = {
                n: jnp.asarray(_gradient(n, np.asarray(p, np.float64), t), dtype)
                for n, p in params.items()
            }
            params, opt_state = step(params, opt_state, grads)
            for n in sorted(params):
                digest.update(np.asarray(params[n]).tobytes())
        final = {n: np.asarray(p, np.float64).ravel().tolist() for n, p in params.items()}
    return digest.hexdigest(), final


def _run_id(name: str, param_dtype: str, state: str) -> str:
    return "/".join(part for part in (name, param_dtype, state) if part)


def machine() -> dict[str, str]:
    """What decides the bits XLA:CPU produces: the jax version and the host's processor."""
    info = {}
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            info.setdefault(key, value)
    found = set(info.get("flags", "").split())
    return {
        "jax": jax.__version__,
        "jaxlib": metadata.version("jaxlib"),
        "machine": platform.machine(),
        "vector_units": " ".join(f for f in ("avx2", "fma", "avx512f", "avx512bw") if f in found),
        "cpu_vendor": info.get("vendor_id", ""),
        "cpu_family": info.get("cpu family", ""),
        "cpu_model": info.get("model", ""),
    }


def _matches(recorded: dict[str, str], here: dict[str, str]) -> bool:
    """True when this machine agrees with every entry of a record's machine."""
    return all(here.get(key) == value for key, value in recorded.items())


def _load_records() -> list[dict]:
    records = []
    for path in sorted(RECORD_DIR.glob("trajectories*.json")):
        with open(path) as f:
            records.append(json.load(f))
    return records


def _own_record() -> dict | None:
    """The record made on this kind of machine, if there is one."""
    own = [r for r in _load_records() if _matches(r["machine"], machine())]
    assert len(own) <= 1, "two records match this machine"
    return own[0] if own else None


# A few ulps of each dtype, for a machine other than the recording one.
_RTOL = {"float32": 1e-5, "bfloat16": 3e-2, "float64": 1e-12}


@pytest.mark.parametrize(
    ("name", "param_dtype", "state"), RUNS, ids=[_run_id(*run) for run in RUNS]
)
def test_trajectory_is_the_recorded_one(name, param_dtype, state):
    run_id = _run_id(name, param_dtype, state)
    digest, final = trajectory(name, param_dtype, state)
    own = _own_record()
    if own is not None and run_id in own["runs"]:
        assert digest == own["runs"][run_id]["sha256"], "a bit of the trajectory changed"
        return
    # Another machine: the records' bits need not be this machine's; the values must agree.
    for record in _load_records():
        for leaf, values in record["runs"].get(run_id, {"final": {}})["final"].items():
            np.testing.assert_allclose(
                final[leaf], values, rtol=_RTOL[param_dtype], atol=_RTOL[param_dtype], err_msg=leaf
            )


def test_the_record_covers_every_run():
    """Some record holds every run, and none holds a run the table does not make.

    A record made before a configuration joined the table lacks it (the AMD record has no CAME:
    no such machine was at hand when CAME joined); on that machine the run's values are
    compared with the other records'.
    """
    records = _load_records()
    runs = {_run_id(*run) for run in RUNS}
    assert any(set(record["runs"]) == runs for record in records)
    for record in records:
        assert set(record["runs"]) <= runs, record["machine"]


def _record() -> None:
    runs = {}
    for run in RUNS:
        digest, final = trajectory(*run)
        runs[_run_id(*run)] = {"sha256": digest, "final": final}
        print(_run_id(*run), digest[:16], file=sys.stderr)
    # One run a line, so that a change shows in a diff as the runs it changed.
    lines = [f"  {json.dumps(run_id)}: {json.dumps(value)}" for run_id, value in runs.items()]
    header = f'{{"machine": {json.dumps(machine())}, "steps": {NUM_STEPS}, "runs": {{\n'
    here = machine()
    path = (
        RECORD_DIR
        / f"trajectories_{here['cpu_vendor']}_{here['cpu_family']}_{here['cpu_model']}.json"
    )
    for existing in RECORD_DIR.glob("trajectories*.json"):
        if _matches(json.loads(existing.read_text())["machine"], here):
            path = existing  # this kind of machine's record, made anew
    path.write_text(header + ",\n".join(lines) + "\n}}\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m tests.test_bit_identity --record")
    _record()
