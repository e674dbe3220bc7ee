"""factored_adan and factored_adai: Adan and Adai with Adafactor's factored second moment.

* Against the float64 NumPy transcriptions ``reference.FactoredAdan`` / ``FactoredAdai`` (written
  from the rule in the docstrings, not from the package) over whole trajectories, with every
  weight-decay variant, on a tree with factored matrices (one with an all-zero-gradient row), a
  3-D leaf with a batch axis, tied axes, a matrix too narrow to factor, a vector and a scalar.
* Where nothing is factored they are Adan and Adai, bit for bit; where the squared gradient is
  rank one, the factored estimate is exact and they follow Adan and Adai.
* The state they keep: n + m floats of second moment per n x m matrix, the sizes the docstrings
  give, and no NaN after many all-zero gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_zoo
from fixtures import reference, trajectories
from fixtures.trajectories import mask_list, reference_trajectory

NUM_STEPS = 50
SEEDS = (0, 1, 2)
TOL = 1e-10
MIN_DIM = 3

# name -> (shape, magnitude of parameters and gradient noise, depends on params). With
# min_dim_size_to_factor=3 (magnitudes close enough that Adai's inertia of each factored leaf
# stays off its 1 - eps clip, so that its factored estimate decides the trajectory):
LEAVES = {
    "a_matrix": ((6, 5), 1.0, True),  # factored; row 2 never gets a gradient (see make_problem)
    "b_batched": ((4, 2, 5), 0.3, True),  # factored over axes 0 and 2, batch axis 1
    "c_tied": ((3, 4, 4), 3.0, True),  # tied largest axes: factored over 1 and 2, batch axis 0
    "d_narrow": ((2, 9), 1e-1, True),  # second-largest axis 2 < 3: a full second moment
    "e_vector": ((7,), 1e-3, False),  # gradient independent of the parameters
    "f_scalar": ((), 10.0, True),
}
NAMES = sorted(LEAVES)  # jax.tree.leaves order of a dict
ZERO_ROW = ("a_matrix", 2)
ONLY_MATRICES_DECAY = {n: len(LEAVES[n][0]) >= 2 for n in NAMES}


def make_problem(seed: int, zero_steps: int = 0) -> dict:
    """The reference tests' problem on these leaves, with one row that never gets a gradient."""
    problem = trajectories.make_problem(seed, zero_steps, LEAVES, NUM_STEPS)
    # Its R stays 0 while mean(R) does not.
    name, row = ZERO_ROW
    problem["curv"][name][row] = 0.0
    problem["noise"][name][:, row] = 0.0
    return problem


zoo = optim_zoo
# config -> (package factory, reference factory, steps with all-zero gradients at the start)
CONFIGS: dict[str, tuple[Callable, Callable, int]] = {
    "adan_default": (
        lambda: zoo.factored_adan(0.01, min_dim_size_to_factor=MIN_DIM),
        lambda: reference.FactoredAdan(0.01, min_dim_size_to_factor=MIN_DIM),
        0,
    ),
    "adan_betas_eps_root": (
        lambda: zoo.factored_adan(
            0.01, b1=0.9, b2=0.8, b3=0.95, eps=1e-6, eps_root=1e-9, min_dim_size_to_factor=MIN_DIM
        ),
        lambda: reference.FactoredAdan(
            0.01, b1=0.9, b2=0.8, b3=0.95, eps=1e-6, eps_root=1e-9, min_dim_size_to_factor=MIN_DIM
        ),
        0,
    ),
    "adan_prox": (
        lambda: zoo.factored_adan(0.02, weight_decay=0.05, min_dim_size_to_factor=MIN_DIM),
        lambda: reference.FactoredAdan(0.02, weight_decay=0.05, min_dim_size_to_factor=MIN_DIM),
        0,
    ),
    "adan_no_prox": (
        lambda: zoo.factored_adan(
            0.02, weight_decay=0.05, no_prox=True, min_dim_size_to_factor=MIN_DIM
        ),
        lambda: reference.FactoredAdan(
            0.02, weight_decay=0.05, no_prox=True, min_dim_size_to_factor=MIN_DIM
        ),
        0,
    ),
    # The global norm stays above 5: every step is clipped.
    "adan_clip_prox_mask": (
        lambda: zoo.factored_adan(
            0.01,
            weight_decay=0.1,
            weight_decay_mask=ONLY_MATRICES_DECAY,
            max_grad_norm=1.0,
            min_dim_size_to_factor=MIN_DIM,
        ),
        lambda: reference.FactoredAdan(
            0.01,
            weight_decay=0.1,
            weight_decay_mask=mask_list(ONLY_MATRICES_DECAY),
            max_grad_norm=1.0,
            min_dim_size_to_factor=MIN_DIM,
        ),
        0,
    ),
    # min_dim_size_to_factor=0 factors d_narrow too.
    "adan_factor_all_zero_first_grads": (
        lambda: zoo.factored_adan(0.01, weight_decay=0.05, min_dim_size_to_factor=0),
        lambda: reference.FactoredAdan(0.01, weight_decay=0.05, min_dim_size_to_factor=0),
        2,
    ),
    "adai_default": (
        lambda: zoo.factored_adai(0.1, min_dim_size_to_factor=MIN_DIM),
        lambda: reference.FactoredAdai(0.1, min_dim_size_to_factor=MIN_DIM),
        0,
    ),
    "adai_betas_eps": (
        lambda: zoo.factored_adai(
            0.3, beta0=0.5, beta2=0.9, eps=1e-2, min_dim_size_to_factor=MIN_DIM
        ),
        lambda: reference.FactoredAdai(
            0.3, beta0=0.5, beta2=0.9, eps=1e-2, min_dim_size_to_factor=MIN_DIM
        ),
        0,
    ),
    "adai_L2_mask": (
        lambda: zoo.factored_adai(
            0.1,
            weight_decay=0.05,
            weight_decay_mask=ONLY_MATRICES_DECAY,
            min_dim_size_to_factor=MIN_DIM,
        ),
        lambda: reference.FactoredAdai(
            0.1,
            weight_decay=0.05,
            weight_decay_mask=mask_list(ONLY_MATRICES_DECAY),
            min_dim_size_to_factor=MIN_DIM,
        ),
        0,
    ),
    "adaiw_decoupled": (
        lambda: zoo.factored_adai(
            0.1, weight_decay=0.05, decoupled=True, min_dim_size_to_factor=MIN_DIM
        ),
        lambda: reference.FactoredAdai(
            0.1, weight_decay=0.05, decoupled=True, min_dim_size_to_factor=MIN_DIM
        ),
        0,
    ),
    "adai_dampening": (
        lambda: zoo.factored_adai(0.1, dampening=0.5, min_dim_size_to_factor=MIN_DIM),
        lambda: reference.FactoredAdai(0.1, dampening=0.5, min_dim_size_to_factor=MIN_DIM),
        0,
    ),
    # v_bar = 0 on the first two steps (the ratio is then 0, not NaN); everything factored.
    "adaiw_dampening_factor_all_zero_first_grads": (
        lambda: zoo.factored_adai(
            0.1, weight_decay=0.05, decoupled=True, dampening=0.7, min_dim_size_to_factor=0
        ),
        lambda: reference.FactoredAdai(
            0.1, weight_decay=0.05, decoupled=True, dampening=0.7, min_dim_size_to_factor=0
        ),
        2,
    ),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_package_matches_reference(config):
    make_tx, make_reference, zero_steps = CONFIGS[config]
    problems = [make_problem(seed, zero_steps) for seed in SEEDS]
    trajectories.assert_package_matches_reference(make_tx, make_reference, problems, LEAVES, TOL)


def test_reference_factoring_changes_the_trajectory():
    # Guard for the comparison above: on this problem the factored references are not the
    # plain Adan and Adai, so a package that ignored the factoring would fail it.
    problem = make_problem(0)
    pairs = [
        (reference.FactoredAdan(0.01, min_dim_size_to_factor=MIN_DIM), reference.Adan(0.01)),
        (reference.FactoredAdai(0.1, min_dim_size_to_factor=MIN_DIM), reference.Adai(0.1)),
    ]
    for factored, plain in pairs:
        got = reference_trajectory(factored, problem)
        unfactored = reference_trajectory(plain, problem)
        for name in ("a_matrix", "b_batched", "c_tied"):
            assert np.max(np.abs(got[name] - unfactored[name])) > 1e3 * TOL * LEAVES[name][1]


# --- Nothing factored: exactly Adan and Adai -----------------------------------------------------


def _mixed_params(dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(3)
    shapes = {"b": (5,), "k": (2, 3, 4), "s": (), "w": (6, 4)}
    return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}


def _mixed_grads(params, t):
    return jax.tree.map(lambda p: 0.7 * p + jnp.sin(1.3 * t + 3.0 * p), params)


def _jitted_run(tx, params, num_steps):
    @jax.jit
    def run(params):
        def body(carry, t):
            params, state = carry
            updates, state = tx.update(_mixed_grads(params, t), state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(body, (params, tx.init(params)), jnp.arange(num_steps))[0]

    return run(params)


_UNFACTORED_PAIRS = [
    ("adan", optim_zoo.factored_adan, optim_zoo.adan, {"learning_rate": 0.01}),
    (
        "adan_prox_clip",
        optim_zoo.factored_adan,
        optim_zoo.adan,
        {"learning_rate": 0.01, "weight_decay": 0.1, "max_grad_norm": 1.0},
    ),
    (
        "adai_l2",
        optim_zoo.factored_adai,
        optim_zoo.adai,
        {"learning_rate": 0.1, "weight_decay": 0.01},
    ),
    (
        "adaiw_dampening",
        optim_zoo.factored_adai,
        optim_zoo.adai,
        {"learning_rate": 0.1, "weight_decay": 0.01, "decoupled": True, "dampening": 0.6},
    ),
]


def _primitive_state(state):
    """The Nesterov-moment or adaptive-inertia state inside an optimizer's chain state."""
    types = (optim_zoo.ScaleByNesterovMomentState, optim_zoo.ScaleByAdaptiveInertiaState)
    (found,) = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, types))
        if isinstance(s, types)
    ]
    return found


@pytest.mark.parametrize(
    ("name", "factored", "plain", "kwargs"),
    _UNFACTORED_PAIRS,
    ids=[c[0] for c in _UNFACTORED_PAIRS],
)
def test_nothing_factored_is_bitwise_the_plain_optimizer(name, factored, plain, kwargs):
    params = _mixed_params()
    tx = factored(**kwargs, min_dim_size_to_factor=7)  # above every axis of _mixed_params
    factored_params, factored_state = _jitted_run(tx, params, 8)
    plain_params, plain_state = _jitted_run(plain(**kwargs), params, 8)
    chex.assert_trees_all_equal(factored_params, plain_params)

    factored_inner, plain_inner = _primitive_state(factored_state), _primitive_state(plain_state)
    second = "n" if factored is optim_zoo.factored_adan else "v"
    stats = getattr(factored_inner, second)
    assert isinstance(stats, optim_zoo.FactoredSecondMoment)
    assert all(x is None for x in stats.v_row + stats.v_col)
    chex.assert_trees_all_equal(list(stats.v), jax.tree.leaves(getattr(plain_inner, second)))
    for field in factored_inner._fields:
        if field != second:
            chex.assert_trees_all_equal(getattr(factored_inner, field), getattr(plain_inner, field))


# --- Rank-one squared gradients: the factored estimate is exact ---------------------------------


@pytest.mark.parametrize(
    ("factored", "plain", "kwargs"),
    [
        (optim_zoo.factored_adan, optim_zoo.adan, {"learning_rate": 0.01, "weight_decay": 0.1}),
        # No decay: Adai's L2 decay would put the parameters into its statistics.
        (optim_zoo.factored_adai, optim_zoo.adai, {"learning_rate": 0.1, "dampening": 0.8}),
    ],
    ids=["adan", "adai"],
)
def test_rank_one_square_gradients_follow_the_unfactored_optimizer(factored, plain, kwargs):
    # g_t = c_t * outer(a, b) makes every EMA of g**2 (and Adan's of (g_t + b2 * diff_t)**2, a
    # multiple of outer(a, b)**2 too) rank one, and then (R / mean(R)) * C is the full second
    # moment.
    rng = np.random.default_rng(7)
    a, b = rng.uniform(0.5, 2.0, 4), rng.uniform(-2.0, 2.0, 6)
    outer = np.outer(a, b)
    scales = [1.0, -0.5, 2.0, 0.3, 1.5, -1.0]
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(rng.standard_normal((4, 6))), "b": jnp.ones(3)}
        grads = {
            "w": jnp.asarray([c * outer for c in scales]),
            "b": jnp.asarray([c * np.arange(1.0, 4.0) for c in scales]),
        }
        runs = []
        for tx in (factored(**kwargs, min_dim_size_to_factor=2), plain(**kwargs)):

            def body(carry, grads, tx=tx):
                p, state = carry
                updates, state = tx.update(grads, state, p)
                return (optax.apply_updates(p, updates), state), None

            run = jax.jit(lambda p, g, tx=tx, body=body: jax.lax.scan(body, (p, tx.init(p)), g))
            runs.append(run(params, grads)[0][0])
        chex.assert_trees_all_close(runs[0], runs[1], rtol=1e-12, atol=1e-12)
        moved = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), runs[0], params)
        assert min(jax.tree.leaves(moved)) > 1e-3


# --- State sizes ---------------------------------------------------------------------------------


def _second_moment(state, factory):
    for s in jax.tree.leaves(
        state,
        is_leaf=lambda x: isinstance(
            x, optim_zoo.ScaleByNesterovMomentState | optim_zoo.ScaleByAdaptiveInertiaState
        ),
    ):
        if isinstance(s, optim_zoo.ScaleByNesterovMomentState):
            return s.n
        if isinstance(s, optim_zoo.ScaleByAdaptiveInertiaState):
            return s.v
    raise AssertionError(f"no second moment in the state of {factory.__name__}")


@pytest.mark.parametrize("factory", [optim_zoo.factored_adan, optim_zoo.factored_adai])
def test_factored_statistics_shapes(factory):
    params = {
        "a_wide": jnp.zeros((4, 6)),
        "b_tall": jnp.zeros((6, 4)),
        "c_batched": jnp.zeros((3, 8, 16)),
        "d_narrow": jnp.zeros((2, 9)),
        "e_vector": jnp.zeros((5,)),
        "f_scalar": jnp.zeros(()),
    }
    stats = _second_moment(
        jax.eval_shape(factory(0.1, min_dim_size_to_factor=MIN_DIM).init, params), factory
    )
    assert isinstance(stats, optim_zoo.FactoredSecondMoment)
    shapes = [
        tuple(None if x is None else x.shape for x in leaf)
        for leaf in zip(stats.v_row, stats.v_col, stats.v, strict=True)
    ]
    # (v_row, v_col, v): v_row drops the larger axis, v_col the other factored one.
    assert shapes == [
        ((4,), (6,), None),
        ((4,), (6,), None),
        ((3, 8), (3, 16), None),
        (None, None, (2, 9)),
        (None, None, (5,)),
        (None, None, ()),
    ]
    # An n x m matrix holds n + m floats of second moment, the batched leaf 3 * (8 + 16).
    sizes = [sum(0 if x is None else x.size for x in leaf) for leaf in zip(*stats, strict=True)]
    assert sizes == [10, 10, 72, 18, 5, 1]


def _state_bytes(tx, params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, params)))


@pytest.mark.parametrize(
    ("factored", "plain", "full_states", "scalars"),
    [
        # Adan: m, v, n, the previous gradient; two int32 step counts (moment, proximal step).
        (optim_zoo.factored_adan, optim_zoo.adan, 4, 8),
        # Adai: m, v, the product of past inertias; one int32 step count.
        (optim_zoo.factored_adai, optim_zoo.adai, 3, 4),
    ],
    ids=["adan", "adai"],
)
def test_state_bytes_drop_as_documented(factored, plain, full_states, scalars):
    # Factored, every matrix keeps one full state fewer and n + m floats instead.
    matrices = {"w1": (256, 512), "w2": (512, 128), "w3": (4, 128, 256)}
    vectors = {"b1": (512,), "b2": (128,)}
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in {**matrices, **vectors}.items()}
    full = sum(int(np.prod(s)) for s in matrices.values())
    vector = sum(int(np.prod(s)) for s in vectors.values())
    factored_floats = 256 + 512 + 512 + 128 + 4 * (128 + 256)
    assert _state_bytes(plain(0.1), params) == 4 * full_states * (full + vector) + scalars
    assert _state_bytes(factored(0.1, min_dim_size_to_factor=128), params) == (
        4 * (full_states - 1) * (full + vector) + 4 * (vector + factored_floats) + scalars
    )


# --- All-zero gradients and the first step --------------------------------------------------------


@pytest.mark.parametrize("factory", [optim_zoo.factored_adan, optim_zoo.factored_adai])
def test_many_zero_gradient_steps_stay_finite(factory):
    tx = factory(0.1, min_dim_size_to_factor=2)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.array([0.5, -0.5, 2.0])}
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(40):
        updates, state = update(zeros, state, params)
        chex.assert_trees_all_equal(updates, zeros)
        chex.assert_tree_all_finite(state)
    # A real gradient afterwards moves every parameter, finitely.
    grads = jax.tree.map(lambda p: p - 3.0, params)
    for _ in range(3):
        updates, state = update(grads, state, params)
        chex.assert_tree_all_finite((updates, state))
        assert all(bool(jnp.all(u != 0)) for u in jax.tree.leaves(updates))
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("decoupled", [False, True], ids=["adai", "adaiw"])
def test_first_step_of_factored_adai_is_sgd(decoupled):
    with jax.enable_x64(True):
        params = {k: jnp.asarray(p, jnp.float64) for k, p in _mixed_params().items()}
        grads = _mixed_grads(params, 0)
        lr, wd = 0.3, 0.05
        tx = optim_zoo.factored_adai(
            lr, weight_decay=wd, decoupled=decoupled, min_dim_size_to_factor=2
        )
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        # p1 = p0 - lr * (g + wd * p0) with L2 decay, p0 (1 - lr wd) - lr g with AdaiW.
        expected = jax.tree.map(lambda g, p: -lr * (g + wd * p), grads, params)
        chex.assert_trees_all_close(updates, expected, rtol=1e-13, atol=1e-15)
