"""Flax NNX models with sharded parameters (`nnx.with_partitioning`) on 8 host CPU devices.

Run by `tests/test_flax_nnx.py` in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (see `fixtures/mesh.py` for why). Under
`jax.set_mesh` with a (2, 4) mesh, for auto and explicit axes and every optimizer,
`nnx.Optimizer(model, tx, wrt=nnx.Param)` builds, `optimizer.update(model, grads)` trains under
`nnx.jit` to the same values as the unsharded model, every full-size state leaf keeps its
parameter's sharding and factored statistics (Adafactor's; CAME's second moment and
instability, over the last two axes) get it minus the reduced axis. This is the setting where
NNX copies a matrix's sharding metadata onto every state leaf mapped from it, which
`optax.adafactor`'s factored state (0.2.8) cannot take.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from fixtures import registry
from fixtures.mesh import NUM_HOST_DEVICES
from fixtures.sharded_nnx import MLP, assert_sharded_like_params, batch

# The six paper optimizers and the sharded runs' additions: the "mesh_nnx" family of
# fixtures/registry.py.
OPTIMIZER_IDS = registry.names("mesh_nnx")


def make_optimizer(name):
    return registry.make("mesh_nnx", name)


if jax.device_count() != NUM_HOST_DEVICES:
    pytest.skip(
        f"needs {NUM_HOST_DEVICES} devices: run through tests/test_flax_nnx.py, or set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={NUM_HOST_DEVICES}",
        allow_module_level=True,
    )

AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
NUM_STEPS = 3


@nnx.jit
def _train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


def _params_as_numpy(model) -> dict:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree.leaves_with_path(nnx.state(model, nnx.Param))
    }


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
@pytest.mark.parametrize("axis_type", sorted(AXIS_TYPES))
def test_sharded_nnx_model_trains_like_unsharded(axis_type, name):
    tx = make_optimizer(name)
    explicit = axis_type == "explicit"
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AXIS_TYPES[axis_type],) * 2)
    with jax.set_mesh(mesh):
        model = MLP(nnx.Rngs(0), explicit=explicit)
        initial = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        assert_sharded_like_params(name, model, optimizer)
        for t in range(NUM_STEPS):
            _train_step(model, optimizer, *batch(t))
        assert_sharded_like_params(name, model, optimizer)
        sharded = _params_as_numpy(model)

    reference = MLP(nnx.Rngs(1), sharded=False)
    reference_state = nnx.state(reference)
    nnx.replace_by_pure_dict(reference_state, initial)
    nnx.update(reference, reference_state)
    reference_optimizer = nnx.Optimizer(reference, tx, wrt=nnx.Param)
    for t in range(NUM_STEPS):
        _train_step(reference, reference_optimizer, *batch(t))
    # Sharded matmuls and reductions add in another order: equal up to float32 rounding.
    chex.assert_trees_all_close(sharded, _params_as_numpy(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_optimizer_built_under_nnx_jit_with_explicit_axes(name):
    # With explicit axes every state leaf's sharding is part of its type, so building the
    # optimizer inside `nnx.jit` shards it as the eager build does.
    tx = make_optimizer(name)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        model = MLP(nnx.Rngs(0), explicit=True)
        optimizer = nnx.jit(lambda model: nnx.Optimizer(model, tx, wrt=nnx.Param))(model)
        assert_sharded_like_params(name, model, optimizer)
        _train_step(model, optimizer, *batch(0))
        assert_sharded_like_params(name, model, optimizer)
