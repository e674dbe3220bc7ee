"""Every optimizer inside Flax NNX: `nnx.Optimizer(model, tx, wrt=nnx.Param)` and `update`.

On one device the NNX training loop must give exactly what the same optax loop over the
model's parameter pytree gives. Sharded models (`nnx.with_partitioning` under `jax.set_mesh`,
auto and explicit axes) run in `mesh_nnx.py` on 8 host devices, in a subprocess.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fixtures import registry
from fixtures.mesh import run_pytest_on_host_devices

# The six paper optimizers: the "ecosystem" family of fixtures/registry.py.
OPTIMIZER_IDS = registry.names("ecosystem")


def make_optimizer(name):
    return registry.make("ecosystem", name)


NUM_STEPS = 4


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.l2 = nnx.Linear(16, 8, rngs=rngs)
        # Not a parameter: the optimizer (wrt=nnx.Param) must leave it alone.
        self.temperature = nnx.Variable(jnp.full((8,), 2.0))

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.norm(self.l1(x)))) / self.temperature[...]


def _batch(t: int):
    x = jnp.sin(jnp.arange(32.0).reshape(4, 8) * (0.3 * t + 1.0))
    return x, jnp.cos(2.0 * x)


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def _nnx_train_step(model, optimizer, x, y):
    grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.Param))(model, x, y)
    optimizer.update(model, grads)


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_nnx_optimizer_matches_optax_on_the_param_pytree(name):
    tx = make_optimizer(name)
    model = MLP(nnx.Rngs(0))
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(param_state)

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for t in range(NUM_STEPS):
        _nnx_train_step(model, optimizer, *_batch(t))

    @jax.jit
    def optax_train_step(params, state, x, y):
        def loss(params):
            return _loss(nnx.merge(graphdef, params, rest), x, y)

        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for t in range(NUM_STEPS):
        params, state = optax_train_step(params, state, *_batch(t))

    nnx_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, nnx_params, params)
    # NNX keeps the optax state's structure, with `nnx.State` where optax has dicts.
    values = jax.tree.map(
        lambda v: v[...], optimizer.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    nnx_state = jax.tree.leaves_with_path(values)
    optax_state = jax.tree.leaves_with_path(state)
    assert [jax.tree_util.keystr(p) for p, _ in nnx_state] == [
        jax.tree_util.keystr(p) for p, _ in optax_state
    ]
    for (_, a), (_, b) in zip(nnx_state, optax_state, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(optimizer.step[...]) == NUM_STEPS
    np.testing.assert_array_equal(model.temperature[...], jnp.full((8,), 2.0))


class PartitionedMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        kernel = nnx.initializers.lecun_normal()
        self.l1 = nnx.Linear(
            8, 16, kernel_init=nnx.with_partitioning(kernel, ("a", "b")), rngs=rngs
        )
        self.l2 = nnx.Linear(
            16, 8, kernel_init=nnx.with_partitioning(kernel, ("b", "a")), rngs=rngs
        )

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_nnx_sharding_metadata_fits_every_state_leaf(name):
    # NNX rebuilds each state leaf mapped from a parameter as a Variable with that parameter's
    # metadata. optim_zoo keeps Adafactor's statistics in per-leaf tuples, outside the params'
    # tree, so a matrix's 2-D sharding never lands on a 1-D statistic: every sharding annotation
    # in the optimizer state names exactly one mesh axis (or None) per array axis. (A one-device
    # mesh cannot show a wrong layout; `mesh_nnx.py` checks the actual shardings on 8 devices.)
    # `optax.adafactor` (0.2.8) already fails to build here, its (1,) placeholders included.
    mesh = jax.make_mesh((1, 1), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        model = PartitionedMLP(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, make_optimizer(name), wrt=nnx.Param)
        before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        _nnx_train_step(model, optimizer, *_batch(0))
        after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)))
    annotated = 0
    for path, variable in jax.tree.leaves_with_path(
        optimizer.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    ):
        metadata = variable.get_metadata()
        # Flax 0.12.0 names the annotation `sharding_names`, later releases `out_sharding`.
        sharding = metadata.get("out_sharding", metadata.get("sharding_names"))
        if sharding is not None:
            annotated += 1
            assert len(sharding) == variable[...].ndim, (jax.tree_util.keystr(path), sharding)
    # The kernels' full-size state leaves (Adan, Apollo, Adai, CAME) keep their annotation.
    assert annotated > 0 or name == "adafactor"


def test_sharded_nnx_models_on_a_2x4_mesh():
    run_pytest_on_host_devices("mesh_nnx.py")
