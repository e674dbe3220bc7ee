"""`dtype_momentum` and `dtype_second_moment` on every optimizer.

First-moment-like state (Adan's m, v and previous gradient, Apollo's m and direction, Adai's m,
Adafactor's momentum) is stored in `dtype_momentum`, default the parameter's (Adafactor's:
float32); second-moment-like state (Adan's n, Adafactor's statistics, Apollo's Hessian estimate,
Adai's v) in `dtype_second_moment`, default at least float32. Adai's product of past inertias
stays at least float32. Whatever the storage, a step's arithmetic runs in at least float32 and
its updates come out in the gradient's dtype.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_zoo
from fixtures import registry

BF16, F16, F32, F64 = (jnp.dtype(d) for d in ("bfloat16", "float16", "float32", "float64"))

# Every optimizer, with the options that give it the most state (Adafactor's momentum, factored
# statistics on the matrices): the "dtypes" family of fixtures/registry.py.
OPTIMIZERS = {case.name: (case.factory, case.kwargs) for case in registry.select("dtypes")}
NAMES = list(OPTIMIZERS)
# An `init` traced under jax.jit cannot read an injected shape-deciding int (it is a tracer
# there), so the jitted-init test below keeps it static; an eager init needs no static_args.
STATIC_ARGS = {
    "adafactor": ("min_dim_size_to_factor",),
    "factored_adan": ("min_dim_size_to_factor",),
    "factored_adai": ("min_dim_size_to_factor",),
}

# Per state type: (first-moment-like fields, second-moment-like fields, fields kept >= float32).
_FIELDS = {
    optim_zoo.ScaleByNesterovMomentState: (("m", "v", "prev_grad"), ("n",), ()),
    optim_zoo.ScaleByFactoredRmsState: ((), ("v_row", "v_col", "v"), ()),
    optim_zoo.ScaleByRectifiedDiagHessianState: (("m", "direction"), ("hessian_diag",), ()),
    optim_zoo.ScaleByAdaptiveInertiaState: (("m",), ("v",), ("beta1_prod",)),
    optim_zoo.ScaleByConfidenceState: (("m",), ("instability",), ()),
    optax.EmaState: (("ema",), (), ()),  # Adafactor's momentum
}


def _make(name, **overrides):
    factory, kwargs = OPTIMIZERS[name]
    return factory(**{**kwargs, **overrides})


def _params(dtype) -> dict:
    rng = np.random.default_rng(0)
    shapes = {"b": (4,), "k": (2, 3, 4), "s": (), "w": (3, 4)}
    return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}


def _grads(params, t=0) -> dict:
    # Values with full mantissas, so that rounding to 16 bits shows.
    return jax.tree.map(
        lambda p: (0.9 * p + jnp.sin(3.7 * p + 1.3 * t + 0.1)).astype(p.dtype), params
    )


def _state_leaves_by_kind(state) -> dict[str, list[tuple[str, jax.Array]]]:
    """Every float state leaf as ("momentum" | "second" | "prod") -> [(field, leaf)]."""
    types = tuple(_FIELDS)
    found = {"momentum": [], "second": [], "prod": []}
    primitives = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, types))
        if isinstance(s, types)
    ]
    for s in primitives:
        for kind, fields in zip(("momentum", "second", "prod"), _FIELDS[type(s)], strict=True):
            for field in fields:
                found[kind] += [(field, x) for x in jax.tree.leaves(getattr(s, field))]
    return found


def _first_step(tx, params):
    return jax.eval_shape(lambda: tx.update(_grads(params), tx.init(params), params))


def _assert_dtypes(name, state, momentum, second, prod) -> None:
    kinds = _state_leaves_by_kind(state)
    assert kinds["momentum"] and kinds["second"], name
    for kind, expected in (("momentum", momentum), ("second", second), ("prod", prod)):
        for field, leaf in kinds[kind]:
            assert leaf.dtype == expected, (name, field, leaf.dtype, expected)
    assert bool(kinds["prod"]) == (name in ("adai", "adaiw", "factored_adai"))


# (dtype_momentum, dtype_second_moment) asked for, float32 parameters. float16 second moments
# are refused (tests/test_validation.py).
_ASKED = [(BF16, BF16), (F16, BF16), (F32, BF16), (BF16, F32), (F16, F32)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("dtype_momentum", "dtype_second_moment"), _ASKED, ids=[f"{a}-{b}" for a, b in _ASKED]
)
def test_each_state_field_gets_the_dtype_asked_for(name, dtype_momentum, dtype_second_moment):
    tx = _make(name, dtype_momentum=dtype_momentum, dtype_second_moment=dtype_second_moment)
    params = _params(F32)
    init_state = jax.eval_shape(tx.init, params)
    updates, state = _first_step(tx, params)
    for s in (init_state, state):
        # beta1_prod: float32, never narrower (bfloat16 would round 0.999 to 1).
        _assert_dtypes(name, s, dtype_momentum, dtype_second_moment, F32)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, init_state)
    chex.assert_trees_all_equal_dtypes(updates, params)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("param_dtype", [BF16, F16, F32], ids=str)
def test_defaults_follow_the_parameter_dtype(name, param_dtype):
    params = _params(param_dtype)
    updates, state = _first_step(_make(name), params)
    # Adafactor's momentum defaults to float32 (as optax's and tensor2tensor's).
    momentum = F32 if name == "adafactor" else param_dtype
    _assert_dtypes(name, state, momentum, F32, F32)
    chex.assert_trees_all_equal_dtypes(updates, params)
    if name == "adafactor":  # None asks for the parameter's dtype there too.
        _, state = _first_step(_make(name, dtype_momentum=None), params)
        _assert_dtypes(name, state, param_dtype, F32, F32)


@pytest.mark.parametrize("name", NAMES)
def test_float64_under_x64(name):
    with jax.enable_x64(True):
        # float64 parameters keep float64 second moments by default...
        params = _params(F64)
        updates, state = _first_step(_make(name, dtype_momentum=None), params)
        _assert_dtypes(name, state, F64, F64, F64)
        chex.assert_trees_all_equal_dtypes(updates, params)
        # ...and float32 parameters may ask for them; the inertia product follows them up.
        params = _params(F32)
        tx = _make(name, dtype_momentum=F64, dtype_second_moment=F64)
        updates, state = _first_step(tx, params)
        _assert_dtypes(name, state, F64, F64, F64)
        chex.assert_trees_all_equal_dtypes(updates, params)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spelling", ["str", "numpy", "jnp_type", "dtype"])
def test_dtype_spellings_are_equivalent(name, spelling):
    momentum, second = {
        "str": ("bfloat16", "bfloat16"),
        "numpy": (np.float16, np.float32),
        "jnp_type": (jnp.bfloat16, jnp.bfloat16),
        "dtype": (jnp.dtype("float16"), jnp.dtype("bfloat16")),
    }[spelling]
    _, state = _first_step(
        _make(name, dtype_momentum=momentum, dtype_second_moment=second), _params(F32)
    )
    _assert_dtypes(name, state, jnp.dtype(momentum), jnp.dtype(second), F32)


# Per state type, the fields that the first step computes from the gradient alone (the state
# starts at zero): Adai's m depends on v through the inertia, Apollo's direction on m, and
# Adafactor's momentum on its statistics.
_FROM_GRADIENT_ALONE = {
    optim_zoo.ScaleByNesterovMomentState: ("m", "v", "n", "prev_grad"),
    optim_zoo.ScaleByFactoredRmsState: ("v_row", "v_col", "v"),
    optim_zoo.ScaleByRectifiedDiagHessianState: ("m", "hessian_diag"),
    optim_zoo.ScaleByAdaptiveInertiaState: ("v",),
}


def _from_gradient_alone(state) -> list[jax.Array]:
    types = tuple(_FROM_GRADIENT_ALONE)
    primitives = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, types))
        if isinstance(s, types)
    ]
    return [
        leaf
        for s in primitives
        for field in _FROM_GRADIENT_ALONE[type(s)]
        for leaf in jax.tree.leaves(getattr(s, field))
    ]


@pytest.mark.parametrize("name", NAMES)
def test_first_step_in_bfloat16_is_the_float32_step_rounded(name):
    # After one step from a zero state, a field computed from the gradient alone holds exactly
    # the float32 step's value rounded to bfloat16 when the step's arithmetic ran in float32;
    # arithmetic in bfloat16 would round each intermediate and differ. Fields that read other
    # state may read it rounded: within bfloat16 rounding of the float32 step, as the update.
    params = _params(F32)
    grads = _grads(params)

    def first_step(**dtypes):
        tx = _make(name, **dtypes)
        return jax.jit(lambda: tx.update(grads, tx.init(params), params))()

    wide_updates, wide_state = first_step(dtype_momentum=F32, dtype_second_moment=F32)
    updates, state = first_step(dtype_momentum=BF16, dtype_second_moment=BF16)
    _assert_dtypes(name, state, BF16, BF16, F32)
    wide_leaves, leaves = _from_gradient_alone(wide_state), _from_gradient_alone(state)
    assert leaves and all(x.dtype == BF16 for x in leaves)
    rounded = [w.astype(BF16) for w in wide_leaves]
    chex.assert_trees_all_equal(leaves, rounded)
    # Guard: the rounding is visible, so the comparison above is not between equal arrays.
    assert any(bool(jnp.any(w != r.astype(F32))) for w, r in zip(wide_leaves, rounded, strict=True))

    as_float32 = jax.tree.map(lambda x: x.astype(F32), state)
    chex.assert_trees_all_close(as_float32, wide_state, rtol=2**-7, atol=1e-30)
    chex.assert_trees_all_close(updates, wide_updates, rtol=2**-6, atol=1e-7)
    chex.assert_trees_all_equal_dtypes(updates, wide_updates)


@pytest.mark.parametrize("name", NAMES)
def test_float64_params_with_float32_second_moment(name):
    with jax.enable_x64(True):
        params = _params(F64)
        # Adafactor's momentum would otherwise be float32 too.
        wide = _make(name, dtype_momentum=F64)
        narrow = _make(name, dtype_momentum=F64, dtype_second_moment=F32)

        def run(tx, num_steps):
            def body(carry, t):
                p, state = carry
                updates, state = tx.update(_grads(p, t), state, p)
                return (optax.apply_updates(p, updates), state), None

            steps = jnp.arange(num_steps)
            # Compiling dominates; the optimisation level changes float64 results at rounding.
            run = jax.jit(
                lambda p: jax.lax.scan(body, (p, tx.init(p)), steps)[0],
                compiler_options={"xla_backend_optimization_level": 0},
            )
            return run(params)

        narrow_params, narrow_state = run(narrow, 5)
        wide_params, wide_state = run(wide, 5)
        _assert_dtypes(name, narrow_state, F64, F32, F64)
        chex.assert_trees_all_equal_dtypes(narrow_params, params)
        # float32 statistics: float32 rounding, no more.
        chex.assert_trees_all_close(narrow_params, wide_params, rtol=1e-5, atol=1e-7)
        narrow_stats = _state_leaves_by_kind(narrow_state)["second"]
        wide_stats = _state_leaves_by_kind(wide_state)["second"]
        chex.assert_trees_all_close(
            [x.astype(F64) for _, x in narrow_stats],
            [x for _, x in wide_stats],
            rtol=1e-5,
            atol=1e-10,
        )


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_with_dtype_callables_under_jit(name):
    # inject_hyperparams takes the callables jnp.float16 and jnp.bfloat16 for schedules and passes
    # their values at the step count, arrays whose dtype is the one asked for (optax >= 0.2.8).
    factory, kwargs = OPTIMIZERS[name]
    kwargs = {**kwargs, "dtype_momentum": jnp.float16, "dtype_second_moment": jnp.bfloat16}
    params = _params(F32)
    if not registry.INJECTED_DTYPES_KEPT:
        # This optax casts the injected jnp.float16(count) to float32: refused, naming the way out.
        injected = optax.inject_hyperparams(factory, static_args=STATIC_ARGS.get(name, ()))
        with pytest.raises(
            ValueError, match=r"dtype_(momentum|second_moment) arrived .* static_args"
        ):
            jax.jit(injected(**kwargs).init)(params)
    tx = registry.inject_hyperparams(factory, kwargs, STATIC_ARGS.get(name, ()))
    state = jax.jit(tx.init)(params)
    traces = []

    @jax.jit
    def update(grads, state, params):
        traces.append(None)
        return tx.update(grads, state, params)

    for t in range(3):
        updates, new_state = update(_grads(params, t), state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        chex.assert_trees_all_equal_dtypes(updates, params)
        params, state = optax.apply_updates(params, updates), new_state
    assert len(traces) == 1  # the state's dtypes are stable from init on
    _assert_dtypes(name, state.inner_state, F16, BF16, F32)
    chex.assert_tree_all_finite(params)

    # The same run as with the dtypes given directly (the hyperparameters differ only in being
    # float32 arrays: equal up to one 16-bit rounding). Compared as the distance each parameter
    # moved, relative to each leaf's largest move: Adafactor's three steps move its parameters
    # by 2e-3 to 8e-3, less than a tolerance on the parameters themselves would allow.
    plain = _make(name, dtype_momentum=F16, dtype_second_moment=BF16)
    initial = _params(F32)
    plain_params, plain_state = initial, plain.init(initial)
    plain_update = jax.jit(plain.update)
    for t in range(3):
        updates, plain_state = plain_update(_grads(plain_params, t), plain_state, plain_params)
        plain_params = optax.apply_updates(plain_params, updates)
    for key, p0 in initial.items():
        moved = np.asarray(params[key] - p0, np.float64)
        want = np.asarray(plain_params[key] - p0, np.float64)
        largest = np.max(np.abs(want))
        # Every optimizer here moves each leaf by 1e-3 or more; 1e-4 is about a thousand float32
        # units of these parameters, so a step lost to rounding or a zero step fails.
        assert largest > 1e-4, f"{key} barely moved: {largest}"
        np.testing.assert_allclose(moved, want, rtol=2**-7, atol=2**-7 * largest, err_msg=key)


def test_inject_hyperparams_adan_bfloat16_momentum():
    # The case from the docstring of _checks.check_dtype, under jax.jit.
    kwargs = {"learning_rate": 0.1, "dtype_momentum": jnp.bfloat16}
    tx = registry.inject_hyperparams(optim_zoo.adan, kwargs)
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    state = jax.jit(tx.init)(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    (moment,) = [
        s for s in state.inner_state if isinstance(s, optim_zoo.ScaleByNesterovMomentState)
    ]
    assert {x.dtype for x in jax.tree.leaves((moment.m, moment.v, moment.prev_grad))} == {BF16}
    assert {x.dtype for x in jax.tree.leaves(moment.n)} == {F32}
    chex.assert_trees_all_equal_dtypes(updates, params)
    # First Adan step: -lr * g / (|g| + eps) = -0.1, up to a bfloat16 rounding of m.
    chex.assert_trees_all_close(
        updates, jax.tree.map(lambda p: jnp.full_like(p, -0.1), params), rtol=2**-7
    )


# The primitives validate the dtype arguments themselves.
_PRIMITIVES = {
    "scale_by_nesterov_moment": (optim_zoo.scale_by_nesterov_moment, True),
    "scale_by_factored_rms": (optim_zoo.scale_by_factored_rms, False),
    "scale_by_rectified_diag_hessian": (optim_zoo.scale_by_rectified_diag_hessian, True),
    "scale_by_adaptive_inertia": (optim_zoo.scale_by_adaptive_inertia, True),
}
_PRIMITIVE_CASES = [
    (primitive, argument, value)
    for primitive, (_, has_momentum) in _PRIMITIVES.items()
    for argument in (("dtype_momentum",) if has_momentum else ()) + ("dtype_second_moment",)
    for value in (jnp.int32, "not-a-dtype", jnp.complex64, 3)
]


@pytest.mark.parametrize(
    ("primitive", "argument", "value"),
    _PRIMITIVE_CASES,
    ids=[f"{p}-{a}-{v!r}" for p, a, v in _PRIMITIVE_CASES],
)
def test_primitives_reject_non_floating_dtypes(primitive, argument, value):
    factory, _ = _PRIMITIVES[primitive]
    with pytest.raises(ValueError, match=argument):
        factory(**{argument: value})


def test_inject_hyperparams_rejects_an_integer_dtype():
    tx = optax.inject_hyperparams(optim_zoo.adan)(learning_rate=0.1, dtype_momentum=jnp.int32)
    with pytest.raises(ValueError, match="dtype_momentum"):
        tx.init({"w": jnp.ones(3)})
