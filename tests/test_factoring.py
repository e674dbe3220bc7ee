"""The factoring rule of the second-moment estimator: its three choices, and tensor2tensor's."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_zoo
from fixtures import reference


def _last_two(path, shape):
    return len(shape) - 2, len(shape) - 1


@pytest.mark.parametrize(
    ("shape", "kwargs", "expected"),
    [
        ((3, 3, 1, 8), {"min_dim_size_to_factor": 0}, (1, 3)),  # the two largest: 3 and 8
        ((3, 3, 1, 8), {"factoring": "last_two"}, (2, 3)),  # tensor2tensor: the last two
        ((3, 3, 16, 32), {"min_dim_size_to_factor": 0}, (2, 3)),
        ((300, 200), {}, (1, 0)),  # (a, b): R averages over b, the larger
        ((300, 200), {"factoring": "last_two"}, (0, 1)),
        ((300, 100), {"min_dim_size_to_factor": 128}, None),  # the smaller is below 128
        ((300, 100), {"factoring": "last_two", "min_dim_size_to_factor": 128}, (0, 1)),
        ((12, 8, 4), {"min_dim_size_to_factor": 0}, (1, 0)),  # averages across the 12 layers
        ((12, 8, 4), {"factoring": _last_two}, (1, 2)),
        ((12, 8, 4), {"factoring": lambda path, shape: (-1, -2)}, (2, 1)),
        ((5,), {"factoring": "last_two"}, None),  # rank 1: never factored
        ((0, 5), {"factoring": "last_two"}, None),  # a zero-size axis: never factored
        ((4, 4), {"factored": False, "factoring": "last_two"}, None),
        ((4, 4), {"factoring": lambda path, shape: None}, None),
    ],
)
def test_factored_dims(shape, kwargs, expected):
    assert optim_zoo.factored_dims(shape, **kwargs) == expected


@pytest.mark.parametrize("answer", [(0, 0), (0, 5), (1,), "rows", (0.5, 1)])
def test_a_callable_rule_must_give_two_distinct_axes(answer):
    tx = optim_zoo.scale_by_factored_rms(factoring=lambda path, shape: answer)
    with pytest.raises(ValueError, match="factoring"):
        tx.init({"w": jnp.ones((3, 4))})


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="factoring"):
        optim_zoo.adafactor(factoring="last_three")


def test_the_rule_sees_each_leaf_path():
    seen = []

    def rule(path, shape):
        seen.append((jax.tree_util.keystr(path), shape))
        return (1, 2) if path[-1].key == "stack" else None

    tx = optim_zoo.factored_adan(0.01, factoring=rule)
    params = {"stack": jnp.ones((6, 4, 3)), "w": jnp.ones((5, 7))}
    state = tx.init(params)
    moment = state[0].n
    assert [None if r is None else r.shape for r in moment.v_row] == [(6, 4), None]
    assert [None if c is None else c.shape for c in moment.v_col] == [(6, 3), None]
    assert ("['stack']", (6, 4, 3)) in seen and ("['w']", (5, 7)) in seen
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_a_scanned_stack_is_not_averaged_across_layers():
    # 12 stacked (4, 3) layers; layer l's gradient is large in its row l only. Within a layer
    # the squares are rank one, so factored per layer the update is exactly sign(g). The
    # default rule factors the two largest axes, (layers, rows), where they are not rank one.
    layer, row = np.meshgrid(np.arange(12), np.arange(4), indexing="ij")
    grads = jnp.asarray(np.repeat((1 + 99.0 * (layer == row))[..., None], 3, axis=-1))
    assert optim_zoo.factored_dims(grads.shape, min_dim_size_to_factor=0) == (1, 0)
    per_layer = optim_zoo.scale_by_factored_rms(factoring=_last_two)
    updates, _ = per_layer.update(grads, per_layer.init(grads))
    np.testing.assert_allclose(updates, jnp.ones_like(grads), rtol=1e-5)
    across = optim_zoo.scale_by_factored_rms(min_dim_size_to_factor=0)
    updates, _ = across.update(grads, across.init(grads))
    assert not np.allclose(updates, jnp.ones_like(grads), rtol=1e-2)


def test_an_impure_rule_is_caught_at_update():
    calls = iter([(0, 1), None])
    tx = optim_zoo.scale_by_factored_rms(factoring=lambda path, shape: next(calls))
    params = jnp.ones((3, 4))
    state = tx.init(params)
    with pytest.raises(ValueError, match="factored at init"):
        tx.update(params, state)


def test_a_callable_rule_under_inject_hyperparams_is_static():
    # inject_hyperparams takes every callable for a schedule: the rule goes in static_args.
    tx = optax.inject_hyperparams(optim_zoo.adafactor, static_args=("factoring",))(
        learning_rate=0.01, factoring=_last_two
    )
    plain = optim_zoo.adafactor(learning_rate=0.01, factoring=_last_two)
    params = {"w": jnp.linspace(-1.0, 1.0, 24).reshape(2, 3, 4)}
    grads = jax.tree.map(lambda p: p + 0.3, params)
    injected, _ = tx.update(grads, tx.init(params), params)
    expected, _ = plain.update(grads, plain.init(params), params)
    np.testing.assert_array_equal(injected["w"], expected["w"])


# --- tensor2tensor's rule on a real CNN --------------------------------------------------------


class _CNN(nn.Module):
    """Two 3x3 convolutions and a classifier on 8x8 one-channel images."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))  # kernel (3, 3, 1, 8): its two largest axes are 1, 3
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))  # kernel (3, 3, 8, 16)
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def _cnn_problem():
    """The CNN's float64 parameters, and the gradient of its loss on a generated batch per step."""
    model = _CNN()
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.normal(size=(16, 8, 8, 1)))
    labels = jnp.asarray(rng.integers(0, 4, size=16))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1), jnp.float64))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    leaves, treedef = jax.tree.flatten(params)

    @jax.jit
    def grad_leaves(leaves, batch):
        def loss(leaves):
            logits = model.apply(treedef.unflatten(leaves), images[batch])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels[batch]).mean()

        return jax.grad(loss)(leaves)

    def grad_fn(leaves, t):
        batch = np.arange(8) + 8 * (t % 2)  # two alternating minibatches
        return [np.asarray(g) for g in grad_leaves([jnp.asarray(x) for x in leaves], batch)]

    return [np.asarray(x) for x in leaves], grad_fn


def _package_run(tx, leaves, grad_fn, num_steps):
    params = [jnp.asarray(x) for x in leaves]
    state = tx.init(params)
    for t in range(1, num_steps + 1):
        grads = [jnp.asarray(g) for g in grad_fn([np.asarray(p) for p in params], t)]
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return [np.asarray(p) for p in params]


def test_last_two_is_tensor2tensor_on_a_cnn():
    num_steps = 30
    with jax.enable_x64(True):
        leaves, grad_fn = _cnn_problem()
        t2t = reference.run(
            reference.Adafactor(min_dim_size_to_factor=0, last_two=True), leaves, grad_fn, num_steps
        )
        last_two = optim_zoo.adafactor(min_dim_size_to_factor=0, factoring="last_two")
        largest = optim_zoo.adafactor(min_dim_size_to_factor=0)
        ours = _package_run(last_two, leaves, grad_fn, num_steps)
        first_step = _package_run(largest, leaves, grad_fn, 1)
        ours_largest = _package_run(largest, leaves, grad_fn, num_steps)
    # tensor2tensor's rule: float64 round-off.
    for got, expected in zip(ours, t2t[-1], strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    # The default rule factors the first kernel (3, 3, 1, 8) over axes 1 and 3, not 2 and 3.
    # After one step it alone differs (the other leaves factor alike, or are vectors); from
    # then on its different values change every gradient.
    first_kernel = [x.shape for x in leaves].index((3, 3, 1, 8))
    for i, (got, expected) in enumerate(zip(first_step, t2t[0], strict=True)):
        assert np.allclose(got, expected, rtol=1e-10, atol=1e-12) == (i != first_kernel)
    assert not np.allclose(ours_largest[first_kernel], t2t[-1][first_kernel], rtol=1e-3)


# --- PyTorch's layout on Flax's kernels ---------------------------------------------------------
# PyTorch stores a linear layer's weight as (out, in) and a convolution's as (out, in, *spatial);
# Flax stores the same kernels as (in, out) and (*spatial, in, out). Axis i of the Flax kernel is
# axis _torch_axes(rank)[i] of the PyTorch one, and the transposition _torch_axes(rank) takes the
# PyTorch array to the Flax one.
def _torch_axes(rank):
    return (*range(2, rank), 1, 0)


def _flax_layers():
    from flax import nnx

    rngs = nnx.Rngs(0)
    return {
        "dense": nnx.Linear(6, 5, rngs=rngs),
        "conv1d": nnx.Conv(6, 5, kernel_size=(3,), rngs=rngs),
        "conv2d": nnx.Conv(6, 5, kernel_size=(3, 4), rngs=rngs),
        "conv3d": nnx.Conv(6, 5, kernel_size=(2, 3, 4), rngs=rngs),
    }


@pytest.mark.parametrize("layer", ["dense", "conv1d", "conv2d", "conv3d"])
def test_pytorch_last_two_names_pytorchs_last_two_axes_on_flax_kernels(layer):
    shape = _flax_layers()[layer].kernel.shape
    rank = len(shape)
    a, b = optim_zoo.factored_dims(shape, factoring=optim_zoo.pytorch_last_two)
    # The same axes, in the same roles, as PyTorch's last two: a its second to last, b its last.
    assert (_torch_axes(rank)[a], _torch_axes(rank)[b]) == (rank - 2, rank - 1)
    if layer != "dense":  # "last_two" factors (in, out) there instead.
        assert optim_zoo.factored_dims(shape, factoring="last_two") == (rank - 2, rank - 1)
        assert {a, b} != {rank - 2, rank - 1}
    assert optim_zoo.pytorch_last_two((), (5,)) is None


def _pytorch_and_flax_problem():
    """Kernels and biases in PyTorch's layout and the same arrays in Flax's, with a gradient
    (an elementwise quadratic) that is the same function of either layout."""
    rng = np.random.default_rng(0)
    torch_shapes = [(5, 6), (5,), (5, 6, 3), (5, 6, 3, 4), (5, 6, 2, 3, 4)]
    torch_leaves = [rng.standard_normal(s) for s in torch_shapes]
    curvature = [rng.uniform(0.1, 3.0, s) for s in torch_shapes]
    target = [rng.standard_normal(s) for s in torch_shapes]

    def to_flax(x):
        return np.transpose(x, _torch_axes(x.ndim)) if x.ndim >= 2 else x

    def grad_fn(leaves, t, layout=lambda x: x):
        pairs = zip(leaves, curvature, target, strict=True)
        return [2 * layout(c) * (p - layout(y)) for p, c, y in pairs]

    return torch_leaves, to_flax, grad_fn


@pytest.mark.parametrize("optimizer", ["came", "adafactor"])
def test_pytorch_last_two_on_flax_layouts_is_the_pytorch_code_on_its_own(optimizer):
    """The official CAME, and the last-two rule Hugging Face's Adafactor shares with the
    transcription of tensor2tensor, run on PyTorch-layout tensors; optim_zoo runs on the same
    tensors in Flax's layout with `pytorch_last_two`: the same trajectory, transposed."""
    num_steps = 5
    with jax.enable_x64(True):
        torch_leaves, to_flax, grad_fn = _pytorch_and_flax_problem()
        if optimizer == "came":
            official = reference.Came(0.01)
            ours, flax_default = (
                optim_zoo.came(0.01, factoring=optim_zoo.pytorch_last_two),
                optim_zoo.came(0.01),
            )
        else:
            official = reference.Adafactor(min_dim_size_to_factor=0, last_two=True)
            ours, flax_default = (
                optim_zoo.adafactor(factoring=optim_zoo.pytorch_last_two),
                optim_zoo.adafactor(factoring="last_two"),
            )
        expected = reference.run(official, torch_leaves, grad_fn, num_steps)[-1]
        flax_leaves = [to_flax(x) for x in torch_leaves]

        def flax_grad_fn(leaves, t):
            return grad_fn(leaves, t, layout=to_flax)

        got = _package_run(ours, flax_leaves, flax_grad_fn, num_steps)
        got_last_two = _package_run(flax_default, flax_leaves, flax_grad_fn, num_steps)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, to_flax(e), rtol=1e-10, atol=1e-12)
    # "last_two" on Flax's layout: the matrix and the bias alike, every convolution otherwise.
    for i, (g, e) in enumerate(zip(got_last_two, expected, strict=True)):
        assert np.allclose(g, to_flax(e), rtol=1e-10, atol=1e-12) == (i < 2), i
