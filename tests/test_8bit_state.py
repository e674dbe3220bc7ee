"""8-bit optimizer state (``dtype_momentum=jnp.int8``, ``dtype_second_moment=jnp.uint8``).

The codec (`optim_zoo._codes`): round-trip bounds per block, unbiased stochastic rounding,
non-finite values, a huge element, small leaves. The optimizers: every one with 8-bit state
under jit, vmap, scan, donation and ``inject_hyperparams``, complex leaves, deterministic
stochastic rounding, ``optax.tree_map_params``, a bit-for-bit resume through Orbax, and the
arguments refused.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optim_zoo
from optim_zoo import _codes, _dtypes, _fusion

EIGHT_BIT = {"dtype_momentum": jnp.int8, "dtype_second_moment": jnp.uint8}
OPTIMIZERS = {
    "adan": lambda **kw: optim_zoo.adan(1e-2, weight_decay=0.01, **kw),
    "adafactor": lambda **kw: optim_zoo.adafactor(1e-2, momentum=0.9, **kw),
    "apollo": lambda **kw: optim_zoo.apollo(1e-3, warmup=5, **kw),
    "adai": lambda **kw: optim_zoo.adai(0.1, **kw),
    "came": lambda **kw: optim_zoo.came(1e-2, **kw),
}


def _blocks_of(x):
    return np.asarray(_codes._in_blocks(jnp.asarray(x)))


def _random(shape, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(scale * rng.standard_normal(shape) * np.exp(rng.uniform(-6, 0, shape)))


@pytest.mark.parametrize(
    "dtype,magnitude",
    [(jnp.float32, 1.0), (jnp.float32, 1e-36), (jnp.float64, 1.0), (jnp.float64, 1e-305)],
    ids=["f32", "f32-tiny", "f64", "f64-tiny"],
)
@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_within_the_bound_of_each_block(signed, dtype, magnitude):
    # Tiny blocks: Q**2 / scale overflows for scales below about 1e-34 (float32) or 1e-304
    # (float64); their elements must still keep their values within the bound.
    with jax.enable_x64(dtype == jnp.float64):
        _check_round_trip(signed, dtype, magnitude)


def _check_round_trip(signed, dtype, magnitude):
    x = _random((3, 100)).astype(dtype)  # 100 = a block of 64 and one of 36
    x = jnp.sign(x) * jnp.maximum(jnp.abs(x), 0.05) * magnitude  # kept off subnormals
    x = x if signed else jnp.abs(x)
    x = x.at[1, :64].set(0.0)  # an all-zero block
    state = _codes.encode(x, signed, dtype)
    assert state.codes.shape == x.shape and state.scales.shape == (3, 2)
    assert state.codes.dtype == (jnp.int8 if signed else jnp.uint8)
    decoded = np.asarray(_codes.decode(state))
    # The bound, computed wider than `dtype`: for tiny blocks it is below the normal numbers.
    wide = np.asarray(x).astype(np.longdouble)
    scales = np.repeat(np.asarray(state.scales).astype(np.longdouble), 64, axis=-1)[:, :100]
    top = 127 if signed else 254
    y = np.abs(wide) / np.where(scales == 0, 1, scales)
    bound = scales * (np.sqrt(y) / top + 1 / (4 * top**2))
    if magnitude == 1.0:
        np.testing.assert_allclose(_codes.error_bound(x, signed), bound, rtol=1e-6)
    else:
        assert np.all(np.asarray(state.scales) < top**2 / np.finfo(dtype).max)
    assert np.all(np.abs(decoded - wide) <= bound * (1 + 1e-6))
    # Each block's largest magnitude is exact, its scale; zeros stay zeros.
    blocks, decoded_blocks = _blocks_of(x), _blocks_of(decoded)
    largest = np.argmax(np.abs(blocks), axis=-1)[..., None]
    np.testing.assert_array_equal(
        np.take_along_axis(decoded_blocks, largest, -1), np.take_along_axis(blocks, largest, -1)
    )
    np.testing.assert_array_equal(decoded[1, :64], 0.0)
    # The bound is not loose: some element is off by more than a quarter of it.
    assert np.max(np.abs(decoded - np.asarray(x)) / np.where(bound > 0, bound, 1)) > 0.25


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_rounding_of_codes_is_unbiased(signed):
    x = _random((1, 64), seed=1)
    x = x if signed else jnp.abs(x)
    draws = 1000
    streams = jnp.arange(draws, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
    decoded = jax.vmap(
        lambda s: _codes.decode(
            _codes.encode(x, signed, jnp.float32, _dtypes._element_bits(s, x.shape))
        )
    )(streams)
    decoded = np.asarray(decoded, np.float64)
    x64 = np.asarray(x, np.float64)
    # Every draw is one of the two grid neighbours of x: with z = sqrt(|y|) Q the gap between
    # them is at most s (2 z + 1) / Q**2, within 4 times the bound of rounding to nearest.
    bound = 4 * np.asarray(_codes.error_bound(x, signed), np.float64)
    assert np.all(np.abs(decoded - x64) <= bound + 1e-12)
    # The mean of independent draws, each of deviation at most half the gap, is x within 5 sigma.
    gap = bound
    if not signed:  # below the first grid point a second moment rounds up: excluded
        scale = np.max(np.abs(_blocks_of(x64)), -1, keepdims=True)
        first = np.repeat(scale / 254**2, _codes.BLOCK_SIZE, -1).reshape(x.shape)
        keep = x64 >= first
    else:
        keep = np.ones(x.shape, bool)
    error = np.abs(decoded.mean(0) - x64)[keep]
    assert np.all(error <= 5 * gap[keep] / 2 / np.sqrt(draws) + 1e-12)
    # And rounding to nearest is biased on the same elements: the test can tell.
    nearest = np.asarray(_codes.decode(_codes.encode(x, signed, jnp.float32)), np.float64)
    assert np.mean(np.abs(nearest - x64)[keep]) > 3 * np.mean(error)


def test_nonfinite_values_decode_to_nan_and_keep_their_neighbours():
    x = _random((2, 64), seed=2)
    x = x.at[0, 3].set(jnp.nan).at[0, 40].set(jnp.inf).at[1, 5].set(-jnp.inf)
    for signed, values in ((True, x), (False, jnp.abs(x))):
        decoded = np.asarray(_codes.decode(_codes.encode(values, signed, jnp.float32)))
        bad = ~np.isfinite(np.asarray(values))
        assert np.all(np.isnan(decoded[bad]))
        finite = np.asarray(values)[~bad]
        bound = np.asarray(_codes.error_bound(jnp.where(bad, 0, values), signed))[~bad]
        assert np.all(np.abs(decoded[~bad] - finite) <= bound * (1 + 1e-6))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("signed", [True, False])
def test_steered_encoding_is_the_plain_one_bit_for_bit(signed, dtype):
    # Under jit on the CPU the scales come from _fusion.finite_block_max's own reducer; the
    # codes and scales must be those of the plain spelling, non-finite values and a last axis
    # that is no multiple of the block included.
    with jax.enable_x64(dtype == jnp.float64):
        _check_steered_encoding(signed, dtype)


def _check_steered_encoding(signed, dtype):
    x = _random((5, 200), seed=4).astype(dtype)
    x = x.at[0, 3].set(jnp.nan).at[0, 70].set(jnp.inf).at[1, 5].set(-jnp.inf)
    x = x.at[2, :64].set(jnp.nan).at[3, 64:128].set(0.0).at[4, 130].set(-0.0)
    x = x.at[4, 10].set(jnp.finfo(dtype).smallest_subnormal)
    x = x if signed else jnp.abs(x)
    bits = jax.random.bits(jax.random.key(0), x.shape, jnp.uint32)
    results = {}
    for steering in (True, False):
        with optim_zoo.compiler_steering(steering):
            encode = jax.jit(
                lambda x, b, count: _fusion.steered(
                    lambda: _codes.encode(x, signed, x.dtype, b), count, x
                )
            )
            results[steering] = [encode(x, b, jnp.zeros([], jnp.int32)) for b in (None, bits)]
    for on, off in zip(results[True], results[False], strict=True):
        np.testing.assert_array_equal(on.codes, off.codes)
        np.testing.assert_array_equal(on.scales, off.scales)
    scales = np.asarray(results[True][0].scales)
    assert scales[2, 0] == 0 and scales[3, 1] == 0  # all NaN; all zeros
    finite = np.where(np.isfinite(np.asarray(x)), np.abs(np.asarray(x)), 0)
    np.testing.assert_array_equal(scales[:, 0], finite[:, :64].max(-1))


def test_steered_sum_of_codes_is_the_sum_and_keeps_non_finite_values():
    # Under jit on the CPU a sum that reads codes takes _fusion.coded_sum's own reducer: the
    # same sum up to float32 rounding (another order of additions), and NaN or an infinity
    # anywhere in the leaf still decides it.
    state = _codes.encode(_random((64, 512), seed=5), True, jnp.float32)
    squares = float(np.sum(np.asarray(_codes.decode(state), np.float64) ** 2))
    cases = {"finite": state, "nan": state._replace(codes=state.codes.at[63, 511].set(-128))}
    for name, coded in cases.items():
        for steering in (True, False):
            with optim_zoo.compiler_steering(steering):
                total = jax.jit(
                    lambda c, count: _fusion.steered(
                        lambda: _fusion.coded_sum(_codes.decode(c) ** 2), count, c.codes
                    )
                )(coded, jnp.zeros([], jnp.int32))
            if name == "nan":
                assert np.isnan(total), (steering, total)
            else:
                np.testing.assert_allclose(float(total), squares, rtol=1e-5, err_msg=steering)
    for values, expected in (([jnp.inf, 1.0], np.inf), ([jnp.inf, -jnp.inf], np.nan)):
        x = jnp.zeros((8, 512)).at[0, 0].set(values[0]).at[7, 511].set(values[1])
        with optim_zoo.compiler_steering(True):
            total = jax.jit(
                lambda x, count: _fusion.steered(lambda: _fusion.coded_sum(x), count, x)
            )(x, jnp.zeros([], jnp.int32))
        np.testing.assert_equal(float(total), expected)


@pytest.mark.parametrize("shape", [(2, 40, 512), (3, 72, 130), (130, 256)])
def test_steered_means_of_codes_are_the_means_and_keep_non_finite_values(shape):
    # CAME's two means of its instability, under jit on the CPU, take _fusion.coded_mean_squares'
    # own reducer where an axis is a multiple of 8 (plain means elsewhere): the same means up to
    # float32 rounding, and a NaN decides its own row's and column's means and no others.
    state = _codes.encode(_random(shape, seed=6), True, jnp.float32)
    axes = (len(shape) - 2, len(shape) - 1)
    nan = state._replace(codes=state.codes.at[(0,) * (len(shape) - 2) + (5, 7)].set(-128))

    def means(coded, count):
        def run():
            x, y = _fusion.widened_for_reductions(coded, jnp.float32, 2, codes_apart=True)
            return _fusion.coded_mean_squares(x - 1, axes, y - 1)

        return _fusion.steered(run, count, coded.codes)

    count = jnp.zeros([], jnp.int32)
    with optim_zoo.compiler_steering(True):
        got = jax.jit(means)(state, count)
        got_nan = jax.jit(means)(nan, count)
    shifted = (np.asarray(_codes.decode(state), np.float64) - 1) ** 2
    expected = shifted.mean(axis=axes[1]), shifted.mean(axis=axes[0])
    for name, a, b in zip(("row", "column"), got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, err_msg=name)
    row, col = (np.asarray(a) for a in got_nan)
    lead = (0,) * (len(shape) - 2)
    assert np.isnan(row[(*lead, 5)]) and np.isnan(col[(*lead, 7)])
    assert np.isnan(row).sum() == 1 and np.isnan(col).sum() == 1


def test_one_huge_element_keeps_the_rest_of_its_block():
    rest = 1.0 + jnp.arange(31.0) / 31  # in [1, 2)
    for huge in (1e4, 1e12):
        x = jnp.concatenate([jnp.asarray([huge]), rest])[None]
        momentum = np.asarray(_codes.decode(_codes.encode(x, True, jnp.float32)))[0]
        second = np.asarray(_codes.decode(_codes.encode(x, False, jnp.float32)))[0]
        assert momentum[0] == huge and second[0] == huge
        if huge == 1e4:  # within the code's range: each keeps its value to its bound
            bound = np.asarray(_codes.error_bound(x, True))[0, 1:]
            assert np.all(np.abs(momentum[1:] - np.asarray(rest)) <= bound)
            assert np.all(second[1:] > 0)
        else:  # beyond it: momenta round to zero, second moments to the first grid point
            np.testing.assert_array_equal(momentum[1:], 0.0)
            np.testing.assert_allclose(second[1:], huge / 254**2, rtol=1e-6)


@pytest.mark.parametrize("shape", [(0,), (), (4095,), (4096, 31), (0, 4096)], ids=lambda s: str(s))
def test_small_leaves_keep_their_dtype(shape):
    tx = optim_zoo.adan(1e-2, **EIGHT_BIT)
    params = jnp.ones(shape)
    state = tx.init(params)
    inner = state[0]
    assert not any(isinstance(x, optim_zoo.CodedState) for x in inner[1:])
    assert inner.m.dtype == jnp.float32 and inner.n.dtype == jnp.float32
    updates, _ = jax.jit(tx.update)(params, state, params)
    assert updates.shape == shape


def _problem():
    a = _random((128, 128), seed=3, scale=0.3)
    params = {"w": _random((64, 128), seed=4), "b": jnp.zeros(128), "s": jnp.ones(())}

    def loss(p):
        return jnp.mean((jnp.tanh(p["w"] @ a) + p["b"] - 0.5) ** 2) + p["s"] ** 2

    return params, loss


def _run(tx, steps=12):
    params, loss = _problem()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state, loss


def _coded(state):
    return [x for x in jax.tree.leaves(state, is_leaf=_is_coded) if _is_coded(x)]


def _is_coded(x):
    return isinstance(x, optim_zoo.CodedState)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_with_8bit_state(name, rounding):
    ref_params, _, loss = _run(OPTIMIZERS[name]())
    params, state, _ = _run(OPTIMIZERS[name](**EIGHT_BIT, state_rounding=rounding))
    coded = _coded(state)
    assert coded, "no state field was stored as codes"
    for x in coded:
        assert x.codes.shape == (64, 128) and x.scales.shape == (64, 2)
        assert x.scales.dtype == jnp.float32
    initial = float(loss(_problem()[0]))
    # Level with float32 state on this problem: the same progress within 2% of it.
    assert float(loss(params)) < initial
    assert abs(float(loss(params)) - float(loss(ref_params))) < 0.02 * initial


def test_which_fields_are_codes():
    params = {"w": jnp.ones((64, 128))}

    def kinds(tx):
        state = tx.init(params)
        return {
            jax.tree_util.keystr(path): x.codes.dtype.name
            for path, x in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_coded)[0]
            if _is_coded(x)
        }

    assert set(kinds(optim_zoo.adan(1e-2, **EIGHT_BIT)).values()) == {"int8", "uint8"}
    adan = kinds(optim_zoo.adan(1e-2, **EIGHT_BIT))
    assert [k.split(".")[1].split("[")[0] for k in adan] == ["m", "v", "n", "prev_grad"]
    assert adan["[0].n['w']"] == "uint8"
    apollo = kinds(optim_zoo.apollo(1e-2, **EIGHT_BIT))
    assert apollo["[1].hessian_diag['w']"] == "int8"  # B takes both signs
    adai = kinds(optim_zoo.adai(0.1, **EIGHT_BIT))
    assert "beta1_prod" not in str(adai)  # the product of inertias keeps float32
    assert optim_zoo.adai(0.1, **EIGHT_BIT).init(params)[1].beta1_prod["w"].dtype == jnp.float32
    # A factored statistic is small: never codes (CAME's instability, Adafactor's v).
    assert "instability" not in str(kinds(optim_zoo.came(1e-2, **EIGHT_BIT)))
    assert kinds(optim_zoo.adafactor(1e-2, min_dim_size_to_factor=0, **EIGHT_BIT)) == {}
    # Adafactor's momentum is codes, and so is its full v where a leaf is not factored.
    adafactor = kinds(optim_zoo.adafactor(1e-2, momentum=0.9, **EIGHT_BIT))
    assert sorted(adafactor.values()) == ["int8", "uint8"]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_adafactor_steps_by_its_momentum_as_stored(rounding):
    # As every primitive's step reads its state as stored (not optax.ema's value before the
    # cast): read before the cast, XLA:CPU copied the old codes out before overwriting them.
    tx = optim_zoo.adafactor(1e-2, momentum=0.9, **EIGHT_BIT, state_rounding=rounding)
    params, loss = _problem()
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, state = update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
        (momentum,) = [x for x in state if isinstance(x, optax.EmaState)]
        coded = momentum.ema["w"]
        assert _is_coded(coded)
        np.testing.assert_array_equal(updates["w"], -coded.astype(jnp.float32))


@pytest.mark.parametrize("name", [name for name in OPTIMIZERS if name != "came"])
def test_steps_in_turns_change_no_bit(name, monkeypatch):
    # One leaf a turn (``_fusion.InTurns``), against no turns: the same updates and state.
    # (CAME takes no turns.)
    params = {k: _random((64, 128), seed=i) for i, k in enumerate("abc")}
    grads = jax.tree.map(lambda p: 0.1 * p**3, params)
    runs = []
    monkeypatch.setattr(_fusion, "TURN_MIN_LEAF", 64 * 128)
    for turn in (2**62, 64 * 128):
        monkeypatch.setattr(_fusion, "TURN_ELEMENTS", turn)
        tx = OPTIMIZERS[name](**EIGHT_BIT, state_rounding="stochastic")
        update = jax.jit(tx.update)  # traced anew: the turns are read when a step is traced
        state = tx.init(params)
        for _ in range(3):
            updates, state = update(grads, state, params)
        runs.append((updates, state))
    chex.assert_trees_all_equal(*runs)


def test_stochastic_rounding_is_deterministic_and_depends_on_the_seed():
    make = OPTIMIZERS["adan"]
    runs = [
        _run(make(**EIGHT_BIT, state_rounding="stochastic", state_rounding_seed=s), 5)[0]
        for s in (7, 7, 8)
    ]
    chex.assert_trees_all_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0]["w"], runs[2]["w"])


def test_vmap_scan_donation_and_inject_hyperparams():
    params, loss = _problem()
    # No static_args: jnp.int8 and jnp.uint8 arrive as arrays of their dtypes, the seed traced.
    tx = optax.inject_hyperparams(optim_zoo.adan)(
        learning_rate=1e-2, **EIGHT_BIT, state_rounding="stochastic", state_rounding_seed=3
    )
    plain = optim_zoo.adan(1e-2, **EIGHT_BIT, state_rounding="stochastic", state_rounding_seed=3)

    def scan_steps(tx, params):
        def body(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(body, (params, tx.init(params)), length=4)[0][0]

    expected = jax.jit(scan_steps, static_argnums=0)(plain, params)
    injected = jax.jit(scan_steps, static_argnums=0)(tx, params)
    # Traced hyperparameters round the arithmetic otherwise: a code may differ by a step.
    chex.assert_trees_all_close(injected, expected, atol=1e-3)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), params)
    batched = jax.jit(jax.vmap(lambda p: scan_steps(plain, p)))(stacked)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], batched), expected, rtol=1e-6)

    state = plain.init(params)
    step = jax.jit(lambda g, s, p: plain.update(g, s, p), donate_argnums=1)
    updates, new_state = step(jax.grad(loss)(params), state, params)
    assert all(x.is_deleted() for x in jax.tree.leaves(state))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(updates))


def test_complex_leaves():
    params = {"z": (_random((64, 128), 5) + 1j * _random((64, 128), 6)).astype(jnp.complex64)}
    tx = optim_zoo.adan(1e-2, **EIGHT_BIT)
    state = tx.init(params)
    assert _coded(state)[0].codes.shape == (2, 64, 128)
    updates, _ = jax.jit(tx.update)(params, state, params)
    assert updates["z"].dtype == jnp.complex64 and np.isfinite(updates["z"]).all()


def test_nan_in_the_state_is_never_hidden():
    params, loss = _problem()
    tx = optim_zoo.adan(1e-2, **EIGHT_BIT)
    state = tx.init(params)
    grads = jax.grad(loss)(params)
    grads["w"] = grads["w"].at[0, 0].set(jnp.inf)
    updates, state = jax.jit(tx.update)(grads, state, params)
    m = state[0].m["w"].astype(jnp.float32)
    assert np.isnan(m[0, 0]) and np.isfinite(np.delete(np.asarray(m).ravel(), 0)).all()
    assert not np.isfinite(updates["w"][0, 0])


def test_tree_map_params_maps_codes_and_scales():
    params, _ = _problem()
    tx = optim_zoo.adan(1e-2, **EIGHT_BIT)
    state = tx.init(params)
    # A function of one array reaches the codes and the scales of every coded field.
    shapes = optax.tree_map_params(tx, lambda x: x.shape, state)
    assert shapes[0].m["w"] == optim_zoo.CodedState((64, 128), (64, 2))
    # With is_leaf, each coded field arrives whole, beside its parameter.
    seen = optax.tree_map_params(
        tx, lambda x, p: type(x).__name__ + str(p.shape), state, params, is_leaf=_is_coded
    )
    assert seen[0].n["w"] == "CodedState(64, 128)" and seen[0].n["b"] == "ArrayImpl(128,)"


def test_orbax_resume_is_bit_for_bit(tmp_path):
    params, loss = _problem()
    tx = optim_zoo.adai(0.1, **EIGHT_BIT, state_rounding="stochastic")

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", {"params": params, "state": state})
    for _ in range(3):
        params, state = step(params, state)
    target = jax.eval_shape(lambda: {"params": _problem()[0], "state": tx.init(_problem()[0])})
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "ckpt", target)
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    resumed, resumed_state = restored["params"], restored["state"]
    for _ in range(3):
        resumed, resumed_state = step(resumed, resumed_state)
    chex.assert_trees_all_equal((resumed, resumed_state), (params, state))


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("dtype_momentum", jnp.uint8, "momenta take both signs"),
        ("dtype_second_moment", jnp.int8, "second moments are never negative"),
        ("dtype_momentum", jnp.int16, "jnp.int8"),
        ("dtype_second_moment", jnp.float8_e4m3fn, r"8-bit codes \(jnp.uint8\)"),
        ("dtype_momentum", jnp.float8_e5m2, r"8-bit codes \(jnp.int8\)"),
        ("dtype_second_moment", jnp.float16, "uint8 stores 8-bit codes"),
    ],
)
def test_bad_code_dtypes_are_refused_naming_the_argument(argument, value, message):
    for make in (optim_zoo.adan, optim_zoo.apollo, optim_zoo.adai, optim_zoo.came):
        with pytest.raises(ValueError, match=message) as error:
            make(1e-2, **{argument: value})
        assert argument in str(error.value)


def test_nnx_optimizer_holds_codes():
    from flax import nnx

    model = nnx.Linear(64, 128, rngs=nnx.Rngs(0))
    tx = optim_zoo.adan(1e-2, **EIGHT_BIT, state_rounding="stochastic")
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.ones((4, 64))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)

    before = np.asarray(model.kernel[...])
    step(model, optimizer)
    step(model, optimizer)
    state = nnx.to_pure_dict(nnx.state(optimizer))
    codes = [
        x
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if "kernel" in jax.tree_util.keystr(path) and x.dtype in (jnp.int8, jnp.uint8)
    ]
    assert len(codes) == 4  # m, v, n and the previous gradient of the kernel
    assert not np.array_equal(np.asarray(model.kernel[...]), before)


@pytest.mark.parametrize("name", ["adan", "adai"])
def test_all_zero_leaf_stays_zero(name):
    params = {"w": jnp.zeros((64, 128))}
    tx = OPTIMIZERS[name](**EIGHT_BIT, state_rounding="stochastic")
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(2):
        updates, state = step(params, state, params)  # zero gradients
    np.testing.assert_array_equal(updates["w"], 0.0)
    for x in _coded(state):
        np.testing.assert_array_equal(x.codes, 0)
        np.testing.assert_array_equal(x.scales, 0.0)
