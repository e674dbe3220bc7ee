"""Orbax checkpoints of every optimizer's state: save mid-training, restore, continue.

The resumed run must be bitwise identical to the uninterrupted one, for plain optax state
restored into a `jax.eval_shape` target and for an NNX model and optimizer restored into an
`nnx.eval_shape` target. Restoring without a target gives plain containers (documented in
docs/ecosystem.md), which the last test pins down.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import optim_zoo
from fixtures import registry

# The six paper optimizers: the "ecosystem" family of fixtures/registry.py.
OPTIMIZER_IDS = registry.names("ecosystem")


def make_optimizer(name):
    return registry.make("ecosystem", name)


NUM_STEPS = 6
SAVE_AFTER = 3


def _initial_params() -> dict:
    rng = np.random.default_rng(0)
    shapes = {"b1": (16,), "w1": (8, 16), "w2": (16, 8)}
    return {k: jnp.asarray(0.5 * rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def _batch(t: int):
    x = jnp.sin(jnp.arange(32.0).reshape(4, 8) * (0.3 * t + 1.0))
    return x, jnp.cos(2.0 * x)


def _loss(params, x, y):
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - y) ** 2)


def _assert_bitwise_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_optax_state_resumes_bitwise(tmp_path, name):
    tx = make_optimizer(name)

    @jax.jit
    def step(params, opt_state, x, y):
        updates, opt_state = tx.update(jax.grad(_loss)(params, x, y), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = _initial_params()
    opt_state = tx.init(params)
    for t in range(NUM_STEPS):
        params, opt_state = step(params, opt_state, *_batch(t))
    uninterrupted = {"params": params, "opt_state": opt_state}

    params = _initial_params()
    opt_state = tx.init(params)
    for t in range(SAVE_AFTER):
        params, opt_state = step(params, opt_state, *_batch(t))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": opt_state})
    del params, opt_state

    # A fresh process would rebuild the target the same way: shapes only, no computation.
    target = jax.eval_shape(
        lambda: {"params": _initial_params(), "opt_state": tx.init(_initial_params())}
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "ckpt", target)
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    params, opt_state = restored["params"], restored["opt_state"]
    for t in range(SAVE_AFTER, NUM_STEPS):
        params, opt_state = step(params, opt_state, *_batch(t))
    _assert_bitwise_equal({"params": params, "opt_state": opt_state}, uninterrupted)


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_nnx_model_and_optimizer_resume_bitwise(tmp_path, name):
    _check_nnx_resume(tmp_path, make_optimizer(name), MLP)


class Wide(nnx.Module):
    """8 -> 64 -> 8 behind a 64 x 128 layer: two kernels of 8,192 elements, coded in 8 bits."""

    def __init__(self, rngs: nnx.Rngs):
        self.l0 = nnx.Linear(8, 64, rngs=rngs)
        self.l1 = nnx.Linear(64, 128, rngs=rngs)
        self.l2 = nnx.Linear(128, 8, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(jax.nn.relu(self.l0(x)))))


@pytest.mark.parametrize("name", ["adan", "came"])
def test_nnx_8bit_state_resumes_bitwise(tmp_path, name):
    make = {"adan": optim_zoo.adan, "came": optim_zoo.came}[name]
    eight_bit = {"dtype_momentum": jnp.int8, "dtype_second_moment": jnp.uint8}
    tx = make(1e-2, **eight_bit, state_rounding="stochastic")
    state = nnx.to_pure_dict(nnx.state(nnx.Optimizer(Wide(nnx.Rngs(0)), tx, wrt=nnx.Param)))
    codes = [x for x in jax.tree.leaves(state) if x.dtype in (jnp.int8, jnp.uint8)]
    assert codes, "no state was stored as 8-bit codes"
    _check_nnx_resume(tmp_path, tx, Wide)


def _check_nnx_resume(tmp_path, tx, model_type):
    """Trained NUM_STEPS steps at once, and SAVE_AFTER steps, saved, restored into an abstract
    target, then the rest: the same model and optimizer state, bit for bit."""

    def create():
        model = model_type(nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = create()
    for t in range(NUM_STEPS):
        _nnx_step(model, optimizer, *_batch(t))
    uninterrupted = nnx.to_pure_dict(nnx.state((model, optimizer)))

    model, optimizer = create()
    for t in range(SAVE_AFTER):
        _nnx_step(model, optimizer, *_batch(t))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(
            tmp_path / "ckpt", {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        )
    del model, optimizer

    abstract_model, abstract_optimizer = nnx.eval_shape(create)
    target = {"model": nnx.state(abstract_model), "optimizer": nnx.state(abstract_optimizer)}
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "ckpt", target)
    model = nnx.merge(nnx.graphdef(abstract_model), restored["model"])
    optimizer = nnx.merge(nnx.graphdef(abstract_optimizer), restored["optimizer"])
    assert int(optimizer.step[...]) == SAVE_AFTER
    for t in range(SAVE_AFTER, NUM_STEPS):
        _nnx_step(model, optimizer, *_batch(t))
    _assert_bitwise_equal(nnx.to_pure_dict(nnx.state((model, optimizer))), uninterrupted)


def test_restore_without_target_gives_plain_containers(tmp_path):
    # Without a target Orbax rebuilds what it stored: NamedTuple states become dicts keyed by
    # field (sorted, unlike the NamedTuple's order), tuples become lists, empty states None.
    # Such a tree is not an optax state; its leaves must not be unflattened into one.
    tx = make_optimizer("adafactor")
    params = _initial_params()
    opt_state = tx.init(params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", opt_state)
        restored = checkpointer.restore(tmp_path / "ckpt")
    factored = restored[0]
    assert isinstance(restored, list) and isinstance(factored, dict)
    assert sorted(factored) == ["count", "v", "v_col", "v_row"]
    assert jax.tree.structure(restored) != jax.tree.structure(opt_state)
    # Params are visited in sorted order: b1 (a vector, unfactored), w1 and w2 (factored).
    assert factored["v_row"][0] is None and factored["v"][1] is None
    for field in ("v_row", "v_col", "v"):
        for saved, loaded in zip(getattr(opt_state[0], field), factored[field], strict=True):
            assert (saved is None) == (loaded is None)
            if saved is not None:
                np.testing.assert_array_equal(loaded, saved)
    assert restored[1] is None  # The EmptyState of optax.clip_by_block_rms.


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        lambda mask: optim_zoo.apollo(1e-3, weight_decay=1e-2, weight_decay_mask=mask),
        lambda mask: optim_zoo.adai(1e-3, weight_decay=1e-2, weight_decay_mask=mask),
        lambda mask: optim_zoo.factored_adai(1e-3, weight_decay=1e-2, weight_decay_mask=mask),
    ],
    ids=["apollo", "adai", "factored_adai"],
)
def test_l2_decay_moved_into_the_primitive_keeps_the_decay_state(tmp_path, make, masked):
    # L2 decay was optax.add_decayed_weights chained first; the primitive applies it now, and
    # the chain keeps that block's state (a MaskedState when masked), so a checkpoint saved
    # before the move restores into today's state.
    params = _initial_params()
    mask = {"b1": False, "w1": True, "w2": True} if masked else None
    state = make(mask).init(params)
    decay_state = optax.add_decayed_weights(1e-2, mask).init(params)
    assert jax.tree.structure(state[0]) == jax.tree.structure(decay_state)
    assert type(state[0]) is type(decay_state)
    # Saved with the old block's state in its place, restored into today's target.
    old = (decay_state, *state[1:])
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "old", old)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "old", jax.eval_shape(lambda: state))
    chex.assert_trees_all_equal(restored, state)
