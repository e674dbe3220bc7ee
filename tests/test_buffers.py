"""What XLA allocates for a step: leaves of one shape must not share leaf-sized temporaries.

The updates spell values that a reduction reads so that the reduction computes them in its own
loop (``optim_zoo._fusion``). XLA merges identical expressions across leaves too; if two leaves of
one shape built the same scalar the same way, their reductions would share one broadcast of it,
written out as large as a leaf. A tree of two such leaves must then need no more temporary
memory than two trees of one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
import pytest

import optim_zoo

SHAPE = (256, 512)  # factored by every factored optimizer (both axes >= 128)
LEAF_BYTES = math.prod(SHAPE) * 4  # float32

CASES = {
    "factored_adan": lambda: optim_zoo.factored_adan(1e-3),
    "factored_adai_l2": lambda: optim_zoo.factored_adai(1e-3, weight_decay=1e-2),
    "apollo_stable": lambda: optim_zoo.apollo(1e-3, weight_decay=1e-2, weight_decay_type="stable"),
    "apollo_l2": lambda: optim_zoo.apollo(1e-3, weight_decay=1e-2, weight_decay_type="L2"),
}


def temp_bytes(tx: optax.GradientTransformation, num_leaves: int) -> int:
    """Temporary bytes of one compiled, donated step on `num_leaves` float32 leaves of SHAPE."""
    params = {f"w{i}": jax.ShapeDtypeStruct(SHAPE, jnp.float32) for i in range(num_leaves)}
    state = jax.eval_shape(tx.init, params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    return int(analysis.temp_size_in_bytes)


@pytest.mark.parametrize("name", sorted(CASES))
def test_leaves_of_one_shape_share_no_temporary(name):
    one, two = temp_bytes(CASES[name](), 1), temp_bytes(CASES[name](), 2)
    # Shared broadcasts would add whole leaves; a few KB of per-leaf scalars and vectors do not.
    assert two <= 2 * one + LEAF_BYTES // 8, (name, one, two)
