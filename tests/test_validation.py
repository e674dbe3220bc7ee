"""Construction-time validation of hyperparameters (SPEC.md, "Validation and errors")."""

import inspect
import math

import jax
import jax.numpy as jnp
import optax
import pytest

import optim_zoo

# The smallest valid call of each alias; the cases below override one argument at a time.
_BASE = {
    "adan": {"learning_rate": 0.01},
    "adafactor": {},
    "apollo": {"learning_rate": 0.01},
    "adai": {"learning_rate": 0.1},
    "adaiw": {"learning_rate": 0.1},
    # The 2 x 2 matrix of the tests below is factored.
    "factored_adan": {"learning_rate": 0.01, "min_dim_size_to_factor": 2},
    "factored_adai": {"learning_rate": 0.1, "min_dim_size_to_factor": 2},
    "came": {"learning_rate": 1e-3},
}
_ALIASES = tuple(_BASE)


def _make(alias, **overrides):
    return getattr(optim_zoo, alias)(**{**_BASE[alias], **overrides})


def _weight_decay_name(alias):
    return "weight_decay_rate" if alias == "adafactor" else "weight_decay"


# (alias, argument, bad value).
_INVALID = [
    # Every optimizer: learning_rate >= 0, eps >= 0, weight decay >= 0.
    *[(alias, "learning_rate", -0.1) for alias in _ALIASES],
    *[(alias, "eps", -0.5) for alias in _ALIASES],
    *[(alias, _weight_decay_name(alias), -0.5) for alias in _ALIASES],
    # Adan and CAME: b1, b2, b3 in [0, 1).
    *[
        (alias, b, v)
        for alias in ("adan", "came")
        for b in ("b1", "b2", "b3")
        for v in (-0.1, 1.0, 1.5)
    ],
    # CAME.
    ("came", "eps_confidence", -1e-16),
    ("came", "clipping_threshold", 0.0),
    ("came", "factoring", "largest"),
    # Apollo.
    ("apollo", "beta", -0.1),
    ("apollo", "beta", 1.0),
    ("apollo", "rebound", "bogus"),
    ("apollo", "warmup", -1),
    ("apollo", "init_lr", -0.001),
    ("apollo", "init_lr", 0.02),  # above learning_rate=0.01
    ("apollo", "weight_decay_type", "bogus"),
    ("apollo", "weight_decay_type", "l2"),  # case matters
    # Adai / AdaiW: beta0 >= 0, beta2 in [0, 1).
    *[(alias, "beta0", -0.1) for alias in ("adai", "adaiw")],
    *[(alias, "beta2", value) for alias in ("adai", "adaiw") for value in (-0.1, 1.0)],
    # Adafactor.
    ("adafactor", "clipping_threshold", 0.0),
    ("adafactor", "clipping_threshold", -1.0),
    ("adafactor", "decay_offset", -1),
    ("adafactor", "momentum", 1.0),
    ("adafactor", "momentum", -0.1),
    ("adafactor", "min_dim_size_to_factor", -1),
    ("adafactor", "decay_rate", 0.0),
    ("adafactor", "decay_rate", -0.5),
    # factored_adan and factored_adai: their own argument, and those they share.
    *[(alias, "min_dim_size_to_factor", -1) for alias in ("factored_adan", "factored_adai")],
    *[("factored_adan", b, 1.0) for b in ("b1", "b2", "b3")],
    ("factored_adan", "eps_root", -1e-9),
    ("factored_adai", "beta0", -0.1),
    ("factored_adai", "beta2", 1.0),
    *[(alias, "dampening", v) for alias in ("adai", "factored_adai") for v in (-0.1, 1.5)],
    # State dtypes, on every optimizer: None or a floating-point dtype.
    *[
        (alias, argument, value)
        for alias in _ALIASES
        for argument in ("dtype_momentum", "dtype_second_moment")
        for value in (jnp.int32, "not-a-dtype", jnp.bool_, "complex64")
    ],
    # State rounding, on every optimizer: "nearest" or "stochastic", and an integer seed.
    *[
        (alias, "state_rounding", value)
        for alias in _ALIASES
        for value in ("bogus", "Stochastic", True, None)
    ],
    *[(alias, "state_rounding_seed", value) for alias in _ALIASES for value in (-1, 2**32, 1.5)],
    # Adai's shard_map axes: a mesh axis name or a tuple of distinct ones.
    *[
        (alias, "axis_name", value)
        for alias in ("adai", "adaiw")
        for value in (1, True, ("data", "data"), ("data", 2))
    ],
    # float16 (and 8-bit floats) cannot hold g**2 of ordinary gradients.
    *[
        (alias, "dtype_second_moment", value)
        for alias in _ALIASES
        for value in (jnp.float16, "float16", jnp.float8_e4m3fn)
    ],
]


@pytest.mark.parametrize(
    ("alias", "argument", "value"), _INVALID, ids=[f"{a}-{g}={v}" for a, g, v in _INVALID]
)
def test_invalid_value_raises(alias, argument, value):
    _assert_refused(alias, argument, value, str(value))


def _assert_refused(alias, argument, value, shown):
    """Building `alias` with `argument=value` raises a ValueError naming both; returns it."""
    with pytest.raises(ValueError) as excinfo:
        _make(alias, **{argument: value})
    message = str(excinfo.value)
    assert argument in message
    assert shown in message
    return excinfo.value


# Values on the boundary of the allowed ranges: each constructs, and takes a finite step on
# gradients that are non-zero everywhere.
_VALID = [
    ("adan", {"learning_rate": 0.0}),
    ("adan", {"b1": 0.0, "b2": 0.0, "b3": 0.0}),
    ("adan", {"eps": 0.0}),
    ("adan", {"eps_root": 0.0, "weight_decay": 0.0}),
    ("adan", {"b1": 0.999, "b2": 0.999, "b3": 0.999}),
    ("adafactor", {"learning_rate": 0.0}),
    ("adafactor", {"momentum": 0.0}),
    ("adafactor", {"momentum": None}),
    ("adafactor", {"clipping_threshold": 1.0}),
    ("adafactor", {"clipping_threshold": 0.5}),  # below 1, as tensor2tensor and optax accept
    ("adafactor", {"clipping_threshold": None}),
    ("adafactor", {"decay_rate": 1.0}),
    ("adafactor", {"decay_rate": 1.5}),  # above 1, as tensor2tensor and optax accept
    ("adafactor", {"decay_offset": 3}),  # on a fresh state: finite, not NaN
    ("adafactor", {"min_dim_size_to_factor": 0}),
    ("adafactor", {"eps": 0.0, "weight_decay_rate": 0.0}),
    ("apollo", {"init_lr": 0.01}),  # == learning_rate
    ("apollo", {"init_lr": 0.0}),
    ("apollo", {"warmup": 0}),
    ("apollo", {"beta": 0.0}),
    ("apollo", {"learning_rate": 0.0}),
    ("apollo", {"weight_decay_type": None}),
    ("apollo", {"weight_decay_type": "L2", "weight_decay": 1e-3}),
    ("apollo", {"weight_decay_type": "decoupled", "weight_decay": 1e-3}),
    ("apollo", {"weight_decay_type": "stable", "weight_decay": 1e-3}),
    ("apollo", {"rebound": "belief", "weight_decay_type": "L2", "weight_decay": 1e-3}),
    ("adai", {"beta0": 0.0}),
    ("adai", {"beta0": 50.0}),  # no upper bound, as in the official code
    ("adai", {"beta2": 0.0}),
    ("adai", {"learning_rate": 0.0, "weight_decay": 0.0}),
    ("adaiw", {"beta0": 50.0, "beta2": 0.0}),
    ("adaiw", {"weight_decay": 0.0}),
    ("factored_adan", {"min_dim_size_to_factor": 0}),
    ("factored_adan", {"b1": 0.0, "b2": 0.0, "b3": 0.0, "weight_decay": 0.1, "no_prox": True}),
    ("factored_adai", {"min_dim_size_to_factor": 0, "dampening": 0.0}),
    ("factored_adai", {"beta2": 0.0, "decoupled": True, "weight_decay": 0.1}),
    *[
        (alias, {"dtype_momentum": momentum, "dtype_second_moment": second})
        for alias in _ALIASES
        for momentum, second in (
            (None, None),
            ("bfloat16", jnp.bfloat16),
            (jnp.float16, "float32"),
            (jnp.float32, "float32"),
        )
    ],
    *[
        (alias, {"dtype_second_moment": "bfloat16", **rounding})
        for alias in _ALIASES
        for rounding in (
            {"state_rounding": "stochastic"},
            {"state_rounding": "stochastic", "state_rounding_seed": 2**32 - 1},
            {"state_rounding": "nearest", "state_rounding_seed": 3},
        )
    ],
]


# Optional numeric arguments whose default is None (so the signature does not show a number).
_OPTIONAL_NUMBERS = {
    "adafactor": ("learning_rate", "momentum", "clipping_threshold", "weight_decay_rate"),
    "adan": ("max_grad_norm",),
    "factored_adan": ("max_grad_norm",),
    "apollo": ("init_lr",),
}


def _numeric_arguments(alias):
    """Every numeric hyperparameter of `alias`: those with a number as default, and the rest."""
    names = ["learning_rate"]
    for name, parameter in inspect.signature(getattr(optim_zoo, alias)).parameters.items():
        default = parameter.default
        if isinstance(default, int | float) and not isinstance(default, bool):
            names.append(name)
    names.extend(_OPTIONAL_NUMBERS.get(alias, ()))
    return sorted(set(names))


# Strings (as YAML configs produce), bools, NaN and infinities are never a valid number.
_NOT_NUMBERS = ["0.01", True, False, math.nan, math.inf, -math.inf]
_WRONG_KIND = [
    (alias, argument, value)
    for alias in _ALIASES
    for argument in _numeric_arguments(alias)
    for value in _NOT_NUMBERS
]


def test_numeric_arguments_are_found():
    # The enumeration above sees the arguments it must (a rename would silently shrink it).
    assert {"b1", "b2", "b3", "eps", "eps_root", "weight_decay", "max_grad_norm"} <= set(
        _numeric_arguments("adan")
    )
    assert {"decay_rate", "decay_offset", "min_dim_size_to_factor", "momentum"} <= set(
        _numeric_arguments("adafactor")
    )
    assert {"beta", "warmup", "init_lr", "weight_decay"} <= set(_numeric_arguments("apollo"))
    assert {"beta0", "beta2", "dampening"} <= set(_numeric_arguments("factored_adai"))


@pytest.mark.parametrize(
    ("alias", "argument", "value"), _WRONG_KIND, ids=[f"{a}-{g}={v!r}" for a, g, v in _WRONG_KIND]
)
def test_strings_bools_and_nonfinite_values_raise(alias, argument, value):
    error = _assert_refused(alias, argument, value, repr(value))
    if isinstance(value, str | bool):
        assert isinstance(error, TypeError)  # the wrong kind of value, not a bad number


@pytest.mark.parametrize(
    ("alias", "argument"),
    [("adan", "no_prox"), ("adai", "decoupled"), ("adafactor", "factored")]
    + [("adafactor", "multiply_by_parameter_scale"), ("factored_adai", "decoupled")],
)
@pytest.mark.parametrize("value", [1, "yes", None])
def test_mode_switches_must_be_bools(alias, argument, value):
    with pytest.raises(TypeError, match=argument):
        _make(alias, **{argument: value})


def test_positional_bool_is_not_a_size():
    # optax's first argument is `factored`: here every argument is keyword-only, so optax's
    # positional call fails loudly instead of meaning min_dim_size_to_factor=1.
    with pytest.raises(TypeError, match="positional"):
        optim_zoo.scale_by_factored_rms(True, 0.8)


# Each factory with an optax namesake (or counterpart): its positional arguments are optax's,
# in optax's order, then any of its own.
_OPTAX_NAMESAKES = [
    (optim_zoo.adafactor, optax.adafactor),
    (optim_zoo.adan, optax.adan),
    (optim_zoo.scale_by_factored_rms, optax.scale_by_factored_rms),
    (optim_zoo.scale_by_nesterov_moment, optax.scale_by_adan),
    (optim_zoo.clip_by_block_rms, optax.clip_by_block_rms),
    (optim_zoo.scale_by_param_rms, optax.scale_by_param_block_rms),
    (optim_zoo.clip_by_global_norm, optax.clip_by_global_norm),
]


def _positional(fn):
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


@pytest.mark.parametrize(
    ("ours", "theirs"), _OPTAX_NAMESAKES, ids=[f.__name__ for f, _ in _OPTAX_NAMESAKES]
)
def test_positional_order_is_optax_order(ours, theirs):
    positional, optax_order = _positional(ours), _positional(theirs)
    shared = min(len(positional), len(optax_order))
    assert positional[:shared] == optax_order[:shared]
    # An argument optax does not have comes after all of optax's.
    assert not set(positional[shared:]) & set(optax_order)


_FACTORIES = [getattr(optim_zoo, name) for name in optim_zoo.__all__]
_FACTORIES = [f for f in _FACTORIES if inspect.isfunction(f)]


@pytest.mark.parametrize("factory", _FACTORIES, ids=[f.__name__ for f in _FACTORIES])
def test_mode_switches_are_keyword_only(factory):
    for parameter in inspect.signature(factory).parameters.values():
        is_switch = isinstance(parameter.default, bool) or isinstance(parameter.default, str)
        if is_switch:
            assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, parameter.name


@pytest.mark.parametrize(("alias", "overrides"), _VALID, ids=[f"{a}-{o}" for a, o in _VALID])
def test_boundary_values_are_allowed(alias, overrides):
    tx = _make(alias, **overrides)
    params = {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "b": jnp.array([1.0, -3.0])}
    grads = jax.tree.map(lambda p: p + 0.5, params)
    updates, state = tx.update(grads, tx.init(params), params)
    leaves = jax.tree.leaves((updates, state))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def test_apollo_eps_zero_is_refused():
    # With d = 0 on the first step the official update divides 0 by ||d||_4 + eps = 0, whatever
    # the gradient: Apollo's eps must be positive.
    _assert_refused("apollo", "eps", 0.0, "0.0")


# (alias, argument, an array that would be invalid as a Python number).
_ARRAY_CASES = [
    *[(alias, "learning_rate", -1.0) for alias in _ALIASES],
    *[(alias, "eps", -1.0) for alias in _ALIASES],
    *[(alias, _weight_decay_name(alias), -1.0) for alias in _ALIASES],
    ("adan", "b1", 1.5),
    ("adan", "b2", -1.0),
    ("adan", "b3", 1.0),
    ("apollo", "beta", 1.0),
    ("apollo", "warmup", -1),
    ("apollo", "init_lr", 1.0),
    ("adai", "beta0", -1.0),
    ("adai", "beta2", 1.0),
    ("adaiw", "beta2", 1.5),
    ("adafactor", "clipping_threshold", 0.5),
    ("adafactor", "momentum", 1.0),
    ("adafactor", "decay_rate", 0.0),
    ("factored_adan", "b3", 1.0),
    ("factored_adai", "beta2", 1.5),
]


@pytest.mark.parametrize(
    ("alias", "argument", "value"), _ARRAY_CASES, ids=[f"{a}-{g}" for a, g, _ in _ARRAY_CASES]
)
def test_array_values_are_not_checked(alias, argument, value):
    # Arrays (as optax.inject_hyperparams passes them) are left to the user: no ValueError, no
    # host sync, no concretization error.
    tx = _make(alias, **{argument: jnp.asarray(value)})
    assert isinstance(tx, optax.GradientTransformationExtraArgs)


# (alias, argument, a valid value): built from a tracer inside jax.jit, the optimizer computes
# the same update as when built from the Python number.
_TRACED_CASES = [
    ("adan", "learning_rate", 0.05),
    ("adan", "b2", 0.9),
    ("adan", "weight_decay", 0.01),
    ("adafactor", "learning_rate", 0.05),
    ("adafactor", "decay_rate", 0.7),
    ("adafactor", "clipping_threshold", 2.0),
    ("adafactor", "momentum", 0.8),
    ("apollo", "learning_rate", 0.05),
    ("apollo", "init_lr", 0.001),
    ("apollo", "warmup", 3),
    ("apollo", "beta", 0.8),
    ("adai", "learning_rate", 0.05),
    ("adai", "beta0", 0.2),
    ("adaiw", "weight_decay", 0.01),
    ("factored_adan", "b3", 0.9),
    ("factored_adan", "weight_decay", 0.01),
    ("factored_adai", "beta2", 0.9),
    ("factored_adai", "beta0", 0.2),
]


@pytest.mark.parametrize(
    ("alias", "argument", "value"), _TRACED_CASES, ids=[f"{a}-{g}" for a, g, _ in _TRACED_CASES]
)
def test_traced_values_work_under_jit(alias, argument, value):
    params = {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "b": jnp.array([1.0, -3.0])}
    grads = jax.tree.map(lambda p: p + 0.5, params)

    def two_steps(tx):
        state = tx.init(params)
        _, state = tx.update(grads, state, params)
        return tx.update(grads, state, params)[0]

    traced = jax.jit(lambda v: two_steps(_make(alias, **{argument: v})))(jnp.asarray(value))
    expected = two_steps(_make(alias, **{argument: value}))
    for got, want in zip(jax.tree.leaves(traced), jax.tree.leaves(expected), strict=True):
        assert jnp.allclose(got, want, rtol=1e-5, atol=1e-7), (got, want)


_SCHEDULES = {
    "constant": optax.constant_schedule(0.01),
    "linear": optax.linear_schedule(0.01, 0.001, transition_steps=5),
    "cosine": optax.cosine_decay_schedule(0.01, decay_steps=5),
    "python_function": lambda count: 0.01 / (1.0 + count),
}


@pytest.mark.parametrize("schedule_name", list(_SCHEDULES))
@pytest.mark.parametrize("alias", _ALIASES)
def test_learning_rate_schedule_accepted(alias, schedule_name):
    schedule = _SCHEDULES[schedule_name]
    tx = _make(alias, learning_rate=schedule)
    params = {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "b": jnp.array([1.0, -3.0])}
    grads = jax.tree.map(lambda p: p + 0.5, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(2):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((params, state)))
    # The schedule is used: the first step equals the one with its initial value as a number
    # (with a schedule, Apollo's default init_lr is not specified, so it is given here).
    extra = {"init_lr": 1e-5} if alias == "apollo" else {}
    scheduled = _make(alias, learning_rate=schedule, **extra)
    constant = _make(alias, learning_rate=float(schedule(0)), **extra)
    first_scheduled, _ = scheduled.update(grads, scheduled.init(params), params)
    first_constant, _ = constant.update(grads, constant.init(params), params)
    for got, want in zip(
        jax.tree.leaves(first_scheduled), jax.tree.leaves(first_constant), strict=True
    ):
        assert jnp.allclose(got, want, rtol=1e-6), (got, want)


def test_apollo_schedule_with_init_lr_is_not_compared():
    # init_lr <= learning_rate can only be checked against a number, not a schedule.
    tx = optim_zoo.apollo(optax.linear_schedule(0.01, 0.0, 10), init_lr=0.005)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)


def test_adai_axis_name_is_not_for_factored_statistics():
    with pytest.raises(ValueError, match="axis_name cannot be combined with factored"):
        optim_zoo.scale_by_adaptive_inertia(factored=True, axis_name="data")


def test_adai_axis_name_outside_shard_map_names_the_axis():
    tx = optim_zoo.adai(0.1, axis_name="data")
    params = {"w": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="axis_name 'data' is not an axis of an enclosing"):
        tx.update(params, tx.init(params), params)
