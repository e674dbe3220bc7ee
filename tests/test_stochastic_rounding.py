"""``state_rounding="stochastic"``: unbiased rounding of narrow state, repeatable and resumable.

Every optimizer takes ``state_rounding`` ("nearest", the default, or "stochastic") and
``state_rounding_seed``. Stochastic rounding stores a value as one of its two neighbours in the
storage dtype, the upper one with the probability of the discarded fraction; the bits are a
function of the seed and the step count (kept in the state), so a resumed run is the same run.
State as wide as the arithmetic is stored as is: float32 state gives the same program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optim_zoo
from optim_zoo import _dtypes

BF16, F16, F32, F64 = (jnp.dtype(d) for d in ("bfloat16", "float16", "float32", "float64"))

# Every optimizer, with every state array it can have (Adafactor's momentum, factored matrices,
# Apollo's decay stored in its direction).
OPTIMIZERS = {
    "adan": (optim_zoo.adan, {"learning_rate": 1e-2, "weight_decay": 1e-2}),
    "adafactor": (
        optim_zoo.adafactor,
        {"learning_rate": 1e-2, "min_dim_size_to_factor": 2, "momentum": 0.9},
    ),
    "apollo": (
        optim_zoo.apollo,
        {"learning_rate": 1e-2, "warmup": 5, "weight_decay": 1e-2, "weight_decay_type": "stable"},
    ),
    "adai": (optim_zoo.adai, {"learning_rate": 0.1, "weight_decay": 1e-2}),
    "adaiw": (optim_zoo.adaiw, {"learning_rate": 0.1, "weight_decay": 1e-2}),
    "came": (optim_zoo.came, {"learning_rate": 1e-2, "weight_decay": 1e-2}),
    "factored_adan": (
        optim_zoo.factored_adan,
        {"learning_rate": 1e-2, "weight_decay": 1e-2, "min_dim_size_to_factor": 2},
    ),
    "factored_adai": (
        optim_zoo.factored_adai,
        {"learning_rate": 0.1, "weight_decay": 1e-2, "min_dim_size_to_factor": 2},
    ),
}
NAMES = list(OPTIMIZERS)
BF16_STATE = {"dtype_momentum": BF16, "dtype_second_moment": BF16}


def _make(name, **overrides):
    factory, kwargs = OPTIMIZERS[name]
    return factory(**{**kwargs, **overrides})


def _params():
    rng = np.random.default_rng(3)
    shapes = {"b": (6,), "k": (2, 3, 4), "w": (5, 7)}
    return {k: jnp.asarray(rng.standard_normal(s), F32) for k, s in shapes.items()}


def _grads(params, t):
    # Values with full mantissas, so that rounding to 16 bits shows.
    return jax.tree.map(lambda p: 0.9 * p + jnp.sin(3.7 * p + 1.3 * t + 0.1), params)


def _stepper(tx):
    @jax.jit
    def step(params, state, t):
        updates, state = tx.update(_grads(params, t), state, params)
        return optax.apply_updates(params, updates), state

    return step


def _run(tx, steps, params=None, state=None, start=0):
    params = _params() if params is None else params
    state = tx.init(params) if state is None else state
    step = _stepper(tx)
    for t in range(start, start + steps):
        params, state = step(params, state, t)
    return params, state


def _assert_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


def _store(x, dtype, count=1, seed=0, leaf="['w']", field=0):
    rounding = _dtypes.StateRounding("stochastic", seed, jnp.int32(count), salt=1)
    return rounding.for_leaf(leaf).store(x, dtype, field)


# --- The rounding itself --------------------------------------------------------------------------

# (compute dtype, storage dtype): the bit-pattern path (float32 to bfloat16) and the general one.
_PAIRS = [(F32, BF16), (F32, F16), (F64, F32), (F64, BF16)]


def _neighbours(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The two values of `dtype` around each `x` (equal where `x` is one of them), as float64."""
    near = np.asarray(jnp.asarray(x).astype(dtype).astype(F64))
    x = np.asarray(x, np.float64)
    step_dir = np.where(near < x, np.inf, -np.inf)
    other = np.asarray(
        jnp.nextafter(jnp.asarray(near).astype(dtype), jnp.asarray(step_dir).astype(dtype)).astype(
            F64
        )
    )
    other = np.where(near == x, near, other)
    return np.minimum(near, other), np.maximum(near, other)


@pytest.mark.parametrize(("wide", "narrow"), _PAIRS, ids=[f"{w}-{n}" for w, n in _PAIRS])
def test_mean_of_many_roundings_is_the_value(wide, narrow):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        # Values across binades and signs, in float16's normal range for float16 (XLA:CPU
        # flushes float32 subnormals to zero: none here).
        decades = (-3, 4) if narrow == F16 else (-6, 6)
        values = rng.standard_normal(24) * 10.0 ** rng.integers(*decades, 24)
        x = jnp.asarray(values, wide)
        copies = 1 << 15
        samples = np.stack(
            [
                np.asarray(_store(jnp.broadcast_to(x, (copies, 24)), narrow, count=c).astype(F64))
                for c in range(4)
            ]
        ).reshape(-1, 24)
        low, high = _neighbours(np.asarray(x), narrow)
        # Every sample is one of the two neighbours...
        assert np.all((samples == low) | (samples == high))
        # ...and their mean is the value, within five standard errors of it.
        exact = np.asarray(x, np.float64)
        share = np.where(high > low, (exact - low) / np.where(high > low, high - low, 1), 0)
        stderr = (high - low) * np.sqrt(share * (1 - share) / samples.shape[0])
        error = np.abs(samples.mean(axis=0) - exact)
        assert np.all(error <= 5 * stderr + 1e-300), (error, stderr)
        assert np.all(share[np.abs(share - 0.5) < 0.45] > 0)  # the values do not sit on the grid


def test_each_element_over_steps_is_unbiased():
    # One value, one element, many steps: the bits change with the count.
    x = jnp.full((4,), 1.0 + 2**-9, F32)  # a quarter of a bfloat16 ulp above 1
    steps = jax.vmap(lambda c: _store(x, BF16, count=c))(jnp.arange(4000, dtype=jnp.int32))
    fractions = (np.asarray(steps.astype(F32)) - 1) / 2**-7
    stderr = np.sqrt(0.25 * 0.75 / 4000)
    np.testing.assert_allclose(fractions.mean(axis=0), 0.25, atol=5 * stderr)


def test_exact_values_and_non_finite_values_are_kept():
    x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.0, -0.0, 1.5, -2.0, 0.375], F32)
    for narrow in (BF16, F16):
        stored = _store(jnp.broadcast_to(x, (512, 8)), narrow)
        np.testing.assert_array_equal(stored, jnp.broadcast_to(x.astype(narrow), (512, 8))[:, :])
    # NaNs whose payload lies in the bits bfloat16 drops stay NaN (not infinity, not -0).
    patterns = jnp.array([0x7F800001, 0x7FFFFFFF, 0xFF800001, 0x7FC00000], jnp.uint32)
    nans = jax.lax.bitcast_convert_type(patterns, F32)
    assert jnp.all(jnp.isnan(_store(jnp.broadcast_to(nans, (512, 4)), BF16)))
    # Beyond bfloat16's largest finite value, rounding up reaches infinity; below it, never.
    big = _store(jnp.full((4096,), 3.3e38, F32), BF16)
    assert jnp.all(jnp.isfinite(big))


def test_state_as_wide_as_the_arithmetic_is_stored_as_is():
    x = jnp.linspace(-3.0, 3.0, 101, dtype=F32) / 7
    np.testing.assert_array_equal(_store(x, F32), x)
    with jax.enable_x64(True):
        x64 = jnp.linspace(-3.0, 3.0, 101, dtype=F64) / 7
        np.testing.assert_array_equal(_store(x64, F64), x64)


def test_fields_leaves_steps_and_seeds_draw_different_bits():
    x = jnp.full((4096,), 1.0 + 2**-8, F32)
    base = np.asarray(_store(x, BF16))
    for change in ({"count": 2}, {"seed": 1}, {"leaf": "['b']"}, {"field": 1}):
        other = np.asarray(_store(x, BF16, **change))
        assert 0.3 < np.mean(other != base) < 0.7, change
    np.testing.assert_array_equal(_store(x, BF16), base)  # and the same arguments the same bits


# --- On every optimizer -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_nearest_is_the_default(name):
    params = _params()
    default, _ = _run(_make(name, **BF16_STATE), 4, params)
    nearest, _ = _run(_make(name, **BF16_STATE, state_rounding="nearest"), 4, params)
    _assert_bitwise_equal(default, nearest)


@pytest.mark.parametrize("name", NAMES)
def test_float32_state_is_unaffected(name):
    # No random bit is drawn for state as wide as the arithmetic: the same program, bit for bit.
    params = _params()
    nearest = _make(name)
    stochastic = _make(name, state_rounding="stochastic", state_rounding_seed=5)
    args = (params, nearest.init(params), 0)
    assert str(jax.make_jaxpr(_stepper(stochastic))(*args)) == str(
        jax.make_jaxpr(_stepper(nearest))(*args)
    )
    _assert_bitwise_equal(_run(stochastic, 4, params), _run(nearest, 4, params))


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_rounding_is_deterministic_given_the_seed(name):
    def run(seed):
        tx = _make(name, **BF16_STATE, state_rounding="stochastic", state_rounding_seed=seed)
        return _run(tx, 4)

    first, again, other = run(7), run(7), run(8)
    _assert_bitwise_equal(first, again)
    nearest = _run(_make(name, **BF16_STATE), 4)
    for different in (other, nearest):
        states = jax.tree.leaves(first[1]), jax.tree.leaves(different[1])
        assert any(
            not np.array_equal(a, b) for a, b in zip(*states, strict=True) if a.dtype == BF16
        )


@pytest.mark.parametrize("name", NAMES)
def test_resumed_from_an_orbax_checkpoint_bit_for_bit(tmp_path, name):
    tx = _make(name, **BF16_STATE, state_rounding="stochastic", state_rounding_seed=11)
    uninterrupted = _run(tx, 6)

    params, state = _run(tx, 3)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    target = jax.eval_shape(lambda: {"params": _params(), "opt_state": tx.init(_params())})
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "ckpt", target)
    # A fresh optimizer, as a new process would build it.
    tx = _make(name, **BF16_STATE, state_rounding="stochastic", state_rounding_seed=11)
    resumed = _run(tx, 3, restored["params"], restored["opt_state"], start=3)
    _assert_bitwise_equal(resumed, uninterrupted)


def test_an_ema_with_a_slow_decay_follows_its_float32_value():
    # The EMA of a constant square with decay 0.999: its increments fall below half a bfloat16
    # ulp long before it reaches the square, so rounding to nearest stalls; stochastic rounding
    # keeps it within a few ulps of the float32 EMA.
    params = jnp.zeros((256,), F32)
    grads = jnp.full((256,), 1.0, F32)

    def final_v(**options):
        tx = optim_zoo.scale_by_factored_rms(factored=False, decay=0.999, **options)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(3000):
            _, state = update(grads, state)
        return np.asarray(state.v[0].astype(F32))

    exact = 1 - 0.999**3000  # 0.950
    stalled = final_v(dtype_second_moment=BF16)
    followed = final_v(dtype_second_moment=BF16, state_rounding="stochastic", state_rounding_seed=0)
    np.testing.assert_allclose(final_v(), exact, rtol=1e-4)
    assert np.all(np.abs(stalled - exact) > 0.3)
    assert abs(followed.mean() - exact) < 4 * 2**-8 and np.all(np.abs(followed - exact) < 0.05)


def test_resolution_is_per_transform():
    # CAME chains two transforms with narrow state; each keeps its own count...
    tx = optim_zoo.came(1e-2, **BF16_STATE, state_rounding="stochastic")
    _, state = _run(tx, 2)
    second_moment, confidence = state[0], state[2]
    assert int(second_moment.count) == int(confidence.count) == 2

    # ...and draws its own bits: with one seed, at one step, on one leaf, the two must not
    # round alike where they store the same number, as they would from one shared stream. On a
    # (n, 1) leaf the first array each stores holds the same numbers: the second moment's row
    # statistic of g (decay 0.5, no eps) is g**2 / 2, and so is the confidence's momentum
    # (b1 = 0.5) of the update g**2.
    rng = np.random.default_rng(4)
    grads = {"x": jnp.asarray(rng.standard_normal((4096, 1)), F32)}
    squares = jax.tree.map(jnp.square, grads)

    def first_states(dtype, rounding):
        options = {"factoring": "last_two", "state_rounding": rounding, "state_rounding_seed": 9}
        rms = optim_zoo.scale_by_factored_rms(
            decay=0.5, eps=0.0, min_dim_size_to_factor=0, dtype_second_moment=dtype, **options
        )
        confidence = optim_zoo.scale_by_confidence(b1=0.5, dtype_momentum=dtype, **options)
        _, rms_state = jax.jit(rms.update)(grads, rms.init(grads))
        _, confidence_state = jax.jit(confidence.update)(squares, confidence.init(grads))
        (row,) = jax.tree.leaves(rms_state.v_row)
        (momentum,) = jax.tree.leaves(confidence_state.m)
        return np.asarray(row.astype(F32)), np.asarray(momentum.astype(F32)).ravel()

    row, momentum = first_states(F32, "nearest")
    np.testing.assert_array_equal(row, momentum)  # the same numbers to store
    on_grid = row == row.astype(BF16).astype(F32)
    assert np.mean(on_grid) < 0.01
    row, momentum = first_states(BF16, "stochastic")
    # Independent bits round a value apart with probability 2p(1 - p), p its place between its
    # two neighbours: a third of the values on average. One stream would round none apart.
    apart = float(np.mean(row[~on_grid] != momentum[~on_grid]))
    assert 0.25 < apart < 0.42, f"{apart:.1%} of the values rounded apart"


def test_a_leaf_draws_the_same_bits_whatever_other_leaves_there_are():
    # The bits follow each leaf's path, not its position: a zero-size leaf changes nothing.
    tx = optim_zoo.adan(1e-2, **BF16_STATE, state_rounding="stochastic")
    x = {"x": jnp.array([0.5, -1.0, 2.0])}
    with_empty = {"a_empty": jnp.zeros((0,)), **x}
    alone, _ = _run(tx, 3, params=x)
    beside, _ = _run(tx, 3, params=with_empty)
    np.testing.assert_array_equal(alone["x"], beside["x"])
