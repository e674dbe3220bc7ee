"""Closed-form first steps and structural properties that follow from SPEC.md.

These need no reference implementation: each is a consequence of the update rule that a
transcription error would break (eps placement, warmup start, global vs per-tensor reductions,
factoring symmetry, state layout).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_zoo


@pytest.fixture(autouse=True)
def _float64():
    # Every check here is an identity that float64 makes exact to ~1e-15.
    with jax.enable_x64(True):
        yield


def _random_tree(seed: int, shapes: dict[str, tuple[int, ...]], scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(scale * rng.standard_normal(s)) for k, s in shapes.items()}


SHAPES = {"W": (5, 3), "b": (4,), "s": ()}


def run(
    tx: optax.GradientTransformation,
    params: dict,
    grad_fn: Callable[[dict, int], dict],
    num_steps: int,
) -> tuple[list[dict], list[dict]]:
    """Parameters and updates after each step; ``grad_fn(params, t)`` with t 1-based."""
    state = tx.init(params)
    trajectory, all_updates = [], []
    for t in range(1, num_steps + 1):
        updates, state = tx.update(grad_fn(params, t), state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
        all_updates.append(updates)
    return trajectory, all_updates


def quadratic_grads(noise_seed: int = 7, curvature: float = 0.8) -> Callable[[dict, int], dict]:
    """Gradients that depend on the current params plus deterministic per-step noise."""

    def grad_fn(params, t):
        noise = _random_tree(noise_seed * 1000 + t, {k: v.shape for k, v in params.items()})
        return jax.tree.map(lambda p, n: curvature * p + 0.3 * n, params, noise)

    return grad_fn


def first_step(tx: optax.GradientTransformation, params: dict, grads: dict) -> dict:
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


def _rms(x) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(x))))


# --- Adan ---------------------------------------------------------------------------------------
def _adan_first_step_grads() -> dict:
    grads = _random_tree(1, SHAPES)
    # Gradients comparable to eps show where eps enters: g/(|g| + eps) = 0.75 here, not sign(g).
    grads["b"] = grads["b"].at[0].set(3e-9).at[1].set(-1e-8)
    return grads


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_adan_first_step(weight_decay):
    params, grads = _random_tree(0, SHAPES), _adan_first_step_grads()
    lr, eps = 0.05, 1e-8
    got = first_step(optim_zoo.adan(lr, eps=eps, weight_decay=weight_decay), params, grads)
    # SPEC: p1 = p0 - lr*g/(|g| + eps), then the (proximal) decay.
    expected = jax.tree.map(
        lambda p, g: (p - lr * g / (jnp.abs(g) + eps)) / (1 + lr * weight_decay), params, grads
    )
    chex.assert_trees_all_close(got, expected, atol=1e-15, rtol=1e-13)


@pytest.mark.parametrize("no_prox", [False, True])
def test_adan_weight_decay_is_the_direction_plus_decay_scaled(no_prox):
    lr, wd, num_steps = 0.03, 0.2, 8
    tx = optim_zoo.adan(lr, weight_decay=wd, no_prox=no_prox)
    direction_tx = optim_zoo.scale_by_nesterov_moment()
    params = _random_tree(0, SHAPES)
    state, direction_state = tx.init(params), direction_tx.init(params)
    grad_fn = quadratic_grads()
    # SPEC: proximal = (direction + wd*p) scaled by -lr/(1 + lr*wd); no_prox scales it by -lr.
    scale = -lr if no_prox else -lr / (1 + lr * wd)
    for t in range(1, num_steps + 1):
        grads = grad_fn(params, t)
        updates, state = tx.update(grads, state, params)
        direction, direction_state = direction_tx.update(grads, direction_state, params)
        expected = jax.tree.map(lambda d, p: scale * (d + wd * p), direction, params)
        chex.assert_trees_all_close(updates, expected, atol=1e-15, rtol=1e-12)
        params = optax.apply_updates(params, updates)


# --- Apollo ---------------------------------------------------------------------------------------
def test_apollo_first_step_constant_rebound():
    params, grads = _random_tree(0, SHAPES), _random_tree(1, SHAPES)
    init_lr = 1e-4
    got = first_step(optim_zoo.apollo(0.01, warmup=10, init_lr=init_lr), params, grads)
    # SPEC: B1 = 0, D1 = 0.01, and step 1 uses exactly init_lr.
    expected = jax.tree.map(lambda p, g: p - init_lr * g / 0.01, params, grads)
    chex.assert_trees_all_close(got, expected, atol=1e-15, rtol=1e-13)


def test_apollo_first_step_without_warmup_uses_the_learning_rate():
    params, grads = _random_tree(0, SHAPES), _random_tree(1, SHAPES)
    got = first_step(optim_zoo.apollo(0.01, warmup=0), params, grads)
    # SPEC: warmup=0 means the constant learning rate from the very first step.
    expected = jax.tree.map(lambda p, g: p - 0.01 * g / 0.01, params, grads)
    chex.assert_trees_all_close(got, expected, atol=1e-15, rtol=1e-13)


def test_apollo_first_step_belief_rebound():
    params, grads = _random_tree(0, SHAPES), _random_tree(1, SHAPES)
    init_lr, eps = 1e-4, 1e-4
    got = first_step(
        optim_zoo.apollo(0.01, eps=eps, warmup=10, init_lr=init_lr, rebound="belief"),
        params,
        grads,
    )
    # SPEC: m0 = 0 so dg = g and sigma = max|g| per tensor; alpha = 1, so D1 = max|g| + eps.
    expected = jax.tree.map(
        lambda p, g: p - init_lr * g / (jnp.max(jnp.abs(g)) + eps), params, grads
    )
    chex.assert_trees_all_close(got, expected, atol=1e-15, rtol=1e-13)


APOLLO_CONFIGS = {
    "constant": dict(warmup=5),
    "belief_stable": dict(warmup=5, rebound="belief", weight_decay=0.1, weight_decay_type="stable"),
    "constant_L2": dict(warmup=5, weight_decay=0.1, weight_decay_type="L2"),
}


@pytest.mark.parametrize("config", list(APOLLO_CONFIGS))
def test_apollo_leaves_are_independent(config):
    # SPEC: every Apollo reduction is per tensor, so another leaf cannot affect this one.
    params = _random_tree(0, {"W": (5, 3), "b": (4,)})
    grad_fn = quadratic_grads()
    tx = optim_zoo.apollo(0.01, **APOLLO_CONFIGS[config])
    alone, _ = run(tx, {"W": params["W"]}, grad_fn, 15)
    together, _ = run(tx, params, grad_fn, 15)
    chex.assert_trees_all_close(
        [p["W"] for p in together], [p["W"] for p in alone], atol=1e-15, rtol=1e-13
    )


# --- Adai -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta0", [0.1, 0.9])
def test_adai_first_step_is_sgd(beta0):
    params, grads = _random_tree(0, SHAPES), _random_tree(1, SHAPES)
    grads["b"] = grads["b"].at[0].set(0.0)  # beta1 clipped at 1 - eps there: still exact
    got = first_step(optim_zoo.adai(0.5, beta0=beta0), params, grads)
    # SPEC: the first step is exactly p1 = p0 - lr*g (m1/(1 - prod1) = g for any beta1).
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    chex.assert_trees_all_close(got, expected, atol=1e-15, rtol=1e-13)


def test_adai_mean_is_global():
    # SPEC: v_bar is the mean over every element of every leaf, so adding a leaf with larger
    # gradients changes the inertia, hence the trajectory, of the others.
    params = _random_tree(0, {"W": (5, 3), "b": (4,)})
    params["b"] = params["b"] * 10.0
    grad_fn = quadratic_grads()
    tx = optim_zoo.adai(0.1)
    alone, _ = run(tx, {"W": params["W"]}, grad_fn, 10)
    together, _ = run(tx, params, grad_fn, 10)
    # The first step is SGD either way; the coupling shows from the second step on.
    chex.assert_trees_all_close(together[0]["W"], alone[0]["W"], atol=1e-15, rtol=1e-13)
    assert float(jnp.max(jnp.abs(together[-1]["W"] - alone[-1]["W"]))) > 1e-3


def test_adai_all_zero_gradients_leave_params_finite_and_unchanged():
    # The official code divides by v_bar = 0 here (NaN); SPEC treats the ratio as 0.
    params = _random_tree(0, SHAPES)
    zeros = jax.tree.map(jnp.zeros_like, params)
    trajectory, _ = run(optim_zoo.adai(0.1), params, lambda p, t: zeros, 3)
    chex.assert_trees_all_close(trajectory[-1], params, atol=0, rtol=0)


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_adai_l2_decay_in_the_primitive_is_add_decayed_weights_before_it(factored, dtype):
    # The primitive applies L2 decay itself (each factored statistic then computes g + wd * p
    # in its own loop): bit for bit what optax.add_decayed_weights chained before it gives,
    # masked leaves included, in every dtype.
    shapes = {"W": (6, 4), "b": (4,), "s": ()}
    params = jax.tree.map(lambda x: x.astype(dtype), _random_tree(0, shapes))
    mask = {"W": True, "b": False, "s": True}
    kwargs = {"factored": factored, "min_dim_size_to_factor": 2}
    inside = optim_zoo.scale_by_adaptive_inertia(weight_decay=0.1, weight_decay_mask=mask, **kwargs)
    before = optax.chain(
        optax.add_decayed_weights(0.1, mask), optim_zoo.scale_by_adaptive_inertia(**kwargs)
    )
    inside_state, before_state = inside.init(params), before.init(params)
    inside_update, before_update = jax.jit(inside.update), jax.jit(before.update)
    for t in range(4):
        grads = jax.tree.map(lambda x: x.astype(dtype), _random_tree(10 + t, shapes))
        updates, inside_state = inside_update(grads, inside_state, params)
        expected, before_state = before_update(grads, before_state, params)
        chex.assert_trees_all_equal(updates, expected)
        chex.assert_trees_all_equal(inside_state, before_state[1])
        params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, updates))


def test_adai_l2_decay_in_the_primitive_needs_params():
    tx = optim_zoo.scale_by_adaptive_inertia(weight_decay=0.1)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="needs params for weight decay"):
        tx.update(params, tx.init(params))
    # A literal zero decay does not.
    tx = optim_zoo.scale_by_adaptive_inertia(weight_decay=0.0)
    tx.update(params, tx.init(params))


@pytest.mark.parametrize("value", [-0.1, math.nan, "0.1", True])
def test_adai_primitive_weight_decay_is_checked(value):
    with pytest.raises(ValueError, match="weight_decay"):
        optim_zoo.scale_by_adaptive_inertia(weight_decay=value)


# --- Adafactor ----------------------------------------------------------------------------------
def _rank_one(seed: int, shape: tuple[int, ...]) -> jax.Array:
    # An outer product of vectors: its squared gradient factors exactly, so the factored
    # estimate on the first step is |g| itself and the scaled gradient is sign(g).
    rng = np.random.default_rng(seed)
    out = np.ones(())
    for n in shape:
        out = np.multiply.outer(out, rng.standard_normal(n))
    return jnp.asarray(out)


@pytest.mark.parametrize("multiply_by_parameter_scale", [True, False])
def test_adafactor_first_step(multiply_by_parameter_scale):
    shapes = {"W": (5, 3), "T": (2, 4, 3), "b": (4,), "s": ()}
    params = _random_tree(0, shapes)
    params["b"] = jnp.full((4,), 1e-5)  # rms below 1e-3: the parameter scale floor applies
    grads = {k: _rank_one(i + 1, s) for i, (k, s) in enumerate(shapes.items())}
    tx = optim_zoo.adafactor(
        min_dim_size_to_factor=0, multiply_by_parameter_scale=multiply_by_parameter_scale
    )
    got = first_step(tx, params, grads)

    # SPEC: learning_rate=None is min(1e-2, 1/sqrt(1)) = 0.01, times 0.05 without param scale;
    # decay is 0 on step 1 so x = sign(g) (rms 1: the clip at 1 is inactive).
    def expected_leaf(p, g):
        scale = max(1e-3, _rms(p)) * 0.01 if multiply_by_parameter_scale else 0.05 * 0.01
        return p - scale * jnp.sign(g)

    expected = jax.tree.map(expected_leaf, params, grads)
    chex.assert_trees_all_close(got, expected, atol=1e-15, rtol=1e-12)


@pytest.mark.parametrize("threshold", [1.0, 2.0])
def test_adafactor_clipped_update_rms_is_bounded(threshold):
    shapes = {"W": (6, 4), "b": (5,)}
    params = _random_tree(0, shapes)
    base = _random_tree(1, shapes)

    def grad_fn(params, t):
        # A sudden jump in gradient size makes the unclipped x = g/sqrt(v) large; late in the
        # run, when the decay is close to 1, it can reach about 1/sqrt(1 - decay) = 4.4.
        return jax.tree.map(lambda g: g * (1e3 if t in (40, 50) else 1.0), base)

    def update_rms(clipping_threshold):
        tx = optim_zoo.adafactor(
            1.0,
            min_dim_size_to_factor=0,
            multiply_by_parameter_scale=False,
            clipping_threshold=clipping_threshold,
        )
        _, updates = run(tx, params, grad_fn, 50)
        return np.array([[_rms(u[k]) for k in shapes] for u in updates])

    clipped, unclipped = update_rms(threshold), update_rms(None)
    # The clip must have had something to do, or the bound would be vacuous.
    assert np.max(unclipped) > 1.5 * threshold
    assert np.all(clipped <= threshold * (1 + 1e-12))
    # SPEC: x / max(1, rms(x)/threshold): steps under the threshold are untouched.
    np.testing.assert_allclose(clipped, np.minimum(unclipped, threshold), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "shape, axes", [((5, 3), (1, 0)), ((4, 4), (1, 0)), ((2, 5, 3), (0, 2, 1))]
)
def test_adafactor_factored_update_is_transpose_equivariant(shape, axes):
    rng = np.random.default_rng(0)
    w0 = jnp.asarray(rng.standard_normal(shape))
    grads = [jnp.asarray(rng.standard_normal(shape)) for _ in range(6)]
    tx = optim_zoo.adafactor(
        0.01, min_dim_size_to_factor=0, momentum=0.5, dtype_momentum=jnp.float64
    )
    _, updates = run(tx, {"w": w0}, lambda p, t: {"w": grads[t - 1]}, 6)
    _, updates_t = run(
        tx,
        {"w": jnp.transpose(w0, axes)},
        lambda p, t: {"w": jnp.transpose(grads[t - 1], axes)},
        6,
    )
    # Factoring must not depend on which of the two factored axes comes first.
    chex.assert_trees_all_close(
        [u["w"] for u in updates_t],
        [jnp.transpose(u["w"], axes) for u in updates],
        atol=1e-15,
        rtol=1e-12,
    )


def _find_state(state, state_type):
    if isinstance(state, state_type):
        return state
    if isinstance(state, tuple):
        for child in state:
            found = _find_state(child, state_type)
            if found is not None:
                return found
    return None


def test_adafactor_state_is_n_plus_m_for_factored_and_full_for_unfactored():
    shapes = {"big": (256, 130), "thin": (100, 300), "tensor": (3, 130, 200), "vec": (50,)}
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    state = optim_zoo.adafactor().init(params)  # min_dim_size_to_factor=128
    rms_state = _find_state(state, optim_zoo.ScaleByFactoredRmsState)
    assert rms_state is not None

    def sizes(stats):
        return [None if s is None else int(np.size(s)) for s in stats]

    # Leaves in jax.tree.leaves order: big, tensor, thin, vec.
    # big: 256 + 130. tensor: batch axis 3 times (130 + 200). thin: 100 < 128, unfactored.
    assert sizes(rms_state.v_row) == [130, 3 * 130, None, None]
    assert sizes(rms_state.v_col) == [256, 3 * 200, None, None]
    assert sizes(rms_state.v) == [None, None, 100 * 300, 50]
    # Nothing else in the whole optimizer state holds floats (no placeholder leaves).
    floats = [
        x for x in jax.tree.leaves(state) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    ]
    assert sum(x.size for x in floats) == (256 + 130) + 3 * (130 + 200) + 100 * 300 + 50
