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
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fixtures import registry
from fixtures.mesh import NUM_HOST_DEVICES

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
# Parameter sharding by (layer, name); `v_row` drops the larger axis, `v_col` the smaller.
SPECS = {
    ("l1", "bias"): P("model"),
    ("l1", "kernel"): P("data", "model"),
    ("l2", "bias"): P("data"),
    ("l2", "kernel"): P("model", "data"),
}
FACTORED_AXES = {("l1", "kernel"): (0, 1), ("l2", "kernel"): (1, 0)}  # (small, large)
# CAME factors every kernel over its last two axes, both its second moment and its instability:
# `v_row` drops the last axis, `v_col` the first, also for the (16, 8) kernel of `l2`.
LAST_TWO_AXES = {("l1", "kernel"): (0, 1), ("l2", "kernel"): (0, 1)}
# CAME's factored statistics, as (field names on the path, parameter): its second moment's and
# its instability's row and column of every kernel, each of which must be found and checked.
CAME_STATISTICS = {
    (fields, key)
    for fields in (("v_row",), ("v_col",), ("instability", "v_row"), ("instability", "v_col"))
    for key in LAST_TWO_AXES
}
NUM_STEPS = 3


class Dense(nnx.Module):
    """`x @ kernel + bias`, with the matmul's output sharding given (explicit axes need it)."""

    def __init__(self, din: int, dout: int, layer: str, sharded: bool, rngs: nnx.Rngs):
        def init(initializer, name):
            if not sharded:
                return initializer
            spec = SPECS[layer, name]

            def placed(key, shape, dtype=jnp.float32):
                # Flax 0.12.0 only asserts (explicit axes) that a new value has its annotated
                # sharding, later releases put it there: place it, for both.
                return jax.device_put(initializer(key, shape, dtype), spec)

            return nnx.with_partitioning(placed, tuple(spec))

        kernel_init = init(nnx.initializers.lecun_normal(), "kernel")
        bias_init = init(nnx.initializers.normal(0.1), "bias")
        self.kernel = nnx.Param(kernel_init(rngs.params(), (din, dout)))
        self.bias = nnx.Param(bias_init(rngs.params(), (dout,)))

    def __call__(self, x, out_sharding=None):
        return jnp.dot(x, self.kernel[...], out_sharding=out_sharding) + self.bias[...]


class MLP(nnx.Module):
    """8 -> 16 -> 8; with `sharded`, every parameter carries the partitioning in `SPECS`."""

    def __init__(self, rngs: nnx.Rngs, sharded: bool = True, explicit: bool = False):
        self.l1 = Dense(8, 16, "l1", sharded, rngs)
        self.l2 = Dense(16, 8, "l2", sharded, rngs)
        # With explicit axes, the second matmul contracts an axis both operands shard over:
        # JAX asks for the output's sharding.
        self.out_sharding = P(None, "data") if explicit else None

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)), out_sharding=self.out_sharding)


def _batch(t: int):
    x = jnp.sin(jnp.arange(32.0).reshape(4, 8) * (0.3 * t + 1.0))
    return x, jnp.cos(2.0 * x)


@nnx.jit
def _train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


def _padded(spec, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _expected_spec(path, leaf, param_keys, factored_axes) -> tuple:
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    if keys[-2:] in SPECS:  # A full-size leaf mapped from a parameter.
        return _padded(SPECS[keys[-2:]], leaf.ndim)
    attrs = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    # The last name on the path: factored Adai's statistics sit at `v.v_row`, under `v`.
    statistic = next((a for a in reversed(attrs) if a in ("v_row", "v_col", "v")), None)
    if statistic is not None:  # Per-leaf tuples of factored statistics.
        index = next(k.idx for k in reversed(path) if isinstance(k, jax.tree_util.SequenceKey))
        key = param_keys[index]
        spec = list(_padded(SPECS[key], 2 if key[1] == "kernel" else 1))
        if statistic != "v":
            small_axis, large_axis = factored_axes[key]
            del spec[large_axis if statistic == "v_row" else small_axis]
        return tuple(spec)
    assert leaf.ndim == 0, f"unexpected state leaf {jax.tree_util.keystr(path)} {leaf.shape}"
    return ()


def _factored_statistics(opt_state, param_keys) -> set[tuple[tuple[str, ...], tuple]]:
    """(field names on the path, parameter key) of every factored statistic in `opt_state`."""
    found = set()
    for path, _ in jax.tree.leaves_with_path(opt_state):
        attrs = tuple(k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey))
        fields = tuple(a for a in attrs if a in ("instability", "v_row", "v_col", "v"))
        if fields and fields[-1] in ("v_row", "v_col"):
            index = next(k.idx for k in reversed(path) if isinstance(k, jax.tree_util.SequenceKey))
            found.add((fields, param_keys[index]))
    return found


def _assert_sharded_like_params(name, model, optimizer) -> None:
    factored_axes = LAST_TWO_AXES if name == "came" else FACTORED_AXES
    params = nnx.state(model, nnx.Param)
    param_keys = [
        tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for path, _ in jax.tree.leaves_with_path(params)
    ]
    for path, leaf in jax.tree.leaves_with_path(params):
        key = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        assert _padded(leaf.sharding.spec, leaf.ndim) == _padded(SPECS[key], leaf.ndim), key
    for path, leaf in jax.tree.leaves_with_path(optimizer.opt_state):
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf.sharding, NamedSharding), (where, leaf.sharding)
        actual = _padded(leaf.sharding.spec, leaf.ndim)
        assert actual == _expected_spec(path, leaf, param_keys, factored_axes), (where, actual)
    if name == "came":
        # Both factored statistics of every kernel were among the leaves checked above.
        found = _factored_statistics(optimizer.opt_state, param_keys)
        assert found == CAME_STATISTICS, found


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
        _assert_sharded_like_params(name, model, optimizer)
        for t in range(NUM_STEPS):
            _train_step(model, optimizer, *_batch(t))
        _assert_sharded_like_params(name, model, optimizer)
        sharded = _params_as_numpy(model)

    reference = MLP(nnx.Rngs(1), sharded=False)
    reference_state = nnx.state(reference)
    nnx.replace_by_pure_dict(reference_state, initial)
    nnx.update(reference, reference_state)
    reference_optimizer = nnx.Optimizer(reference, tx, wrt=nnx.Param)
    for t in range(NUM_STEPS):
        _train_step(reference, reference_optimizer, *_batch(t))
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
        _assert_sharded_like_params(name, model, optimizer)
        _train_step(model, optimizer, *_batch(0))
        _assert_sharded_like_params(name, model, optimizer)
