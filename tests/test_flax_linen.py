"""Every optimizer inside Flax Linen's `TrainState`: `create(..., tx=...)`, `apply_gradients`.

`apply_gradients` calls `tx.update(grads, opt_state, params)` with no extra arguments; the result
must be exactly the plain optax loop's. Parameters boxed by `nn.with_partitioning` must work too,
with 8-bit state as well, and the partition specs Linen reads off the state must fit each leaf's
rank.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.training import train_state

import optim_zoo
from fixtures import registry

# The six paper optimizers: the "ecosystem" family of fixtures/registry.py.
OPTIMIZER_IDS = registry.names("ecosystem")


def make_optimizer(name, eight_bit=False):
    if not eight_bit:
        return registry.make("ecosystem", name)
    # Adafactor's momentum is what it codes of a leaf it factors.
    momentum = {"momentum": 0.9} if name == "adafactor" else {}
    return registry.make("ecosystem", name, **registry.EIGHT_BIT, **momentum)


NUM_STEPS = 4


class MLP(nn.Module):
    partitioned: bool = False
    hidden: int = 16  # 512: the first kernel, 8 x 512, is large enough for 8-bit codes

    @nn.compact
    def __call__(self, x):
        def kernel(names):
            init = nn.initializers.lecun_normal()
            return nn.with_partitioning(init, names) if self.partitioned else init

        x = nn.Dense(self.hidden, kernel_init=kernel(("a", "b")))(x)
        x = nn.LayerNorm()(jax.nn.relu(x))
        return nn.Dense(8, kernel_init=kernel(("b", "a")))(x)


def _batch(t: int):
    x = jnp.sin(jnp.arange(32.0).reshape(4, 8) * (0.3 * t + 1.0))
    return x, jnp.cos(2.0 * x)


def _loss(apply_fn, params, x, y):
    return jnp.mean((apply_fn({"params": params}, x) - y) ** 2)


@jax.jit
def _train_step(state: train_state.TrainState, x, y) -> train_state.TrainState:
    grads = jax.grad(lambda p: _loss(state.apply_fn, p, x, y))(state.params)
    return state.apply_gradients(grads=grads)


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_train_state_matches_optax_loop(name):
    tx = make_optimizer(name)
    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]

    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    for t in range(NUM_STEPS):
        state = _train_step(state, *_batch(t))

    @jax.jit
    def optax_step(params, opt_state, x, y):
        grads = jax.grad(lambda p: _loss(model.apply, p, x, y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for t in range(NUM_STEPS):
        params, opt_state = optax_step(params, opt_state, *_batch(t))

    assert int(state.step) == NUM_STEPS
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(opt_state)
    jax.tree.map(np.testing.assert_array_equal, state.params, params)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, opt_state)


def _coded(tree):
    is_coded = lambda x: isinstance(x, optim_zoo.CodedState)  # noqa: E731
    return [x for x in jax.tree.leaves(tree, is_leaf=is_coded) if is_coded(x)]


def _create_sharded(tx, model):
    """Linen's sharded-initialisation recipe: trace the state, read shardings off its boxes, then
    build it under `jax.jit` with those `out_shardings` (on a 1 x 1 mesh, set)."""
    mesh = jax.make_mesh((1, 1), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def create(key):
        params = model.init(key, jnp.ones((1, 8)))["params"]
        return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(create, jax.random.key(0))
        # A box is copied onto every state leaf mapped from its parameter, so its names must
        # fit that leaf's rank.
        boxes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        for box in boxes:
            if isinstance(box, nn.Partitioned):
                assert len(box.names) == box.value.ndim, box
        return jax.jit(create, out_shardings=nn.get_sharding(abstract, mesh))(jax.random.key(0))


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_train_state_with_partitioned_params(name):
    # optim_zoo's factored statistics are kept outside the params' tree and are never boxed.
    state = _create_sharded(make_optimizer(name), MLP(partitioned=True))
    before = nn.unbox(state.params)
    state = _train_step(state, *_batch(0))
    after = nn.unbox(state.params)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
    assert all(jax.tree.leaves(changed)), changed


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_partitioned_params_with_8bit_state_train_as_bare_ones(name):
    # A box holds one array where a coded field holds two: the codes and the scales each get a
    # box of their own. A step reads and writes that layout, keeps the boxes, and trains exactly
    # as on the bare parameters.
    tx = make_optimizer(name, eight_bit=True)
    model = MLP(partitioned=True, hidden=512)
    boxed = _create_sharded(tx, model)
    coded = _coded(boxed.opt_state)
    assert coded
    assert all(isinstance(c.codes, nn.Partitioned) for c in coded)
    assert all(isinstance(c.scales, nn.Partitioned) for c in coded)
    structure = jax.tree.structure(boxed.opt_state)
    bare = train_state.TrainState.create(apply_fn=model.apply, params=nn.unbox(boxed.params), tx=tx)
    for t in range(NUM_STEPS):
        boxed = _train_step(boxed, *_batch(t))
        bare = _train_step(bare, *_batch(t))
    assert jax.tree.structure(boxed.opt_state) == structure
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(boxed.params), bare.params)
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(boxed.opt_state), bare.opt_state)
