"""The compiler-steering switch: on for XLA:CPU, off elsewhere, and only a matter of speed.

The devices of ``optim_zoo._fusion`` steer XLA:CPU's buffer reuse. With them on (the default on
the CPU) ``tests/test_bit_identity.py`` holds every bit; this file checks that turning them off
changes no trajectory beyond float rounding, that the default picks them for the CPU and not for
a GPU (at lowering time, through ``jax.lax.platform_dependent``), and that the override works.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_zoo
from fixtures import registry

CONFIGS = registry.select("trajectories")
_BF16_STATE = {"dtype_momentum": jnp.bfloat16, "dtype_second_moment": jnp.bfloat16}
_SHAPES = {"conv": (2, 3, 3, 4), "w": (8, 5), "tall": (3, 9), "b": (5,), "s": ()}
NUM_STEPS = 10


def _run(case, dtype, steering, **overrides):
    """Final params after NUM_STEPS jitted steps, with the steering forced on or off."""
    tx = case.make(**overrides)
    rng = np.random.default_rng(3)
    params = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in _SHAPES.items()}
    state = tx.init(params)
    with optim_zoo.compiler_steering(steering):

        @jax.jit
        def step(params, state, t):
            grads = jax.tree.map(lambda p: p * (1.5 + jnp.sin(t + p)), params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for t in range(NUM_STEPS):
            params, state = step(params, state, jnp.asarray(t, dtype))
    return params


# Float32 state: a few float32 ulps over ten steps. bfloat16 state: the same float32 values can
# round to neighbouring bfloat16 numbers (one bfloat16 ulp, 2**-8 relative) and go on from there.
_TOLERANCE = {"float32": 1e-5, "bf16_state": 2e-2}


# Every configuration in float32; with bfloat16 state, one of each primitive whose steering
# differs there (narrow reads behind barriers, Apollo's direction computed twice).
RUNS = [(case, "float32") for case in CONFIGS] + [
    (case, "bf16_state")
    for case in CONFIGS
    if case.name in ("factored_adan", "apollo_stable", "factored_adai", "adafactor")
]


@pytest.mark.parametrize(("case", "variant"), RUNS, ids=[f"{c.name}/{v}" for c, v in RUNS])
def test_steering_off_changes_no_trajectory_beyond_rounding(case, variant):
    overrides = _BF16_STATE if variant == "bf16_state" else {}
    steered = _run(case, jnp.float32, True, **overrides)
    plain = _run(case, jnp.float32, False, **overrides)
    tol = _TOLERANCE[variant]
    for key in _SHAPES:
        np.testing.assert_allclose(plain[key], steered[key], rtol=tol, atol=tol, err_msg=key)


def _step_text(tx, params, platforms=None, steering=None):
    """The lowered StableHLO of one update (for `platforms` through jax.export)."""

    def update(grads, state, params):
        return tx.update(grads, state, params)

    state = tx.init(params)
    with optim_zoo.compiler_steering(steering):
        if platforms is None:
            return jax.jit(update).lower(params, state, params).as_text()
        exported = jax.export.export(jax.jit(update), platforms=platforms)(params, state, params)
        return exported.mlir_module()


def _steered_tx():
    # bfloat16 state: its reductions read the stored bytes behind optimization barriers.
    return optim_zoo.factored_adan(1e-3, min_dim_size_to_factor=2, **_BF16_STATE)


_PARAMS = {"w": jnp.ones((8, 16)), "b": jnp.ones(16)}


def test_the_default_steers_the_cpu_and_not_a_gpu():
    tx = _steered_tx()
    assert "optimization_barrier" in _step_text(tx, _PARAMS, ["cpu"])
    assert "optimization_barrier" not in _step_text(tx, _PARAMS, ["cuda"])
    assert "optimization_barrier" not in _step_text(tx, _PARAMS, ["tpu"])


def test_the_override_wins_over_the_platform():
    tx = _steered_tx()
    assert "optimization_barrier" not in _step_text(tx, _PARAMS, ["cpu"], steering=False)
    assert "optimization_barrier" in _step_text(tx, _PARAMS, ["cuda"], steering=True)


def test_the_default_on_the_cpu_is_the_steered_program():
    tx = _steered_tx()

    def compiled(steering):
        state = tx.init(_PARAMS)
        with optim_zoo.compiler_steering(steering):
            step = jax.jit(lambda g, s, p: tx.update(g, s, p))
            return step.lower(_PARAMS, state, _PARAMS).compile().as_text()

    def ops(text):  # the instructions, without names and source locations
        return sorted(
            line.split("=", 1)[1].split(", metadata")[0].split("(")[0]
            for line in text.splitlines()
            if " = " in line and not line.lstrip().startswith("ROOT")
        )

    assert ops(compiled(None)) == ops(compiled(True))
    assert ops(compiled(None)) != ops(compiled(False))


def test_steering_takes_only_a_bool_or_none():
    with pytest.raises(TypeError, match="compiler_steering"):
        with optim_zoo.compiler_steering("off"):
            pass


def test_eager_updates_are_not_steered():
    # Outside jit nothing fuses: the plain program, whatever the platform.
    tx = _steered_tx()
    state = tx.init(_PARAMS)
    eager, _ = tx.update(_PARAMS, state, _PARAMS)
    with optim_zoo.compiler_steering(False):
        plain, _ = tx.update(_PARAMS, state, _PARAMS)
    jax.tree.map(np.testing.assert_array_equal, eager, plain)
