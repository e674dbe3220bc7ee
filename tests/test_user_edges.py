"""Edges a careful user hits: field names in leaf paths, 8-bit floats, rounding seeds, callables
under ``optax.inject_hyperparams``, and zero epsilons."""

from __future__ import annotations

import dataclasses
import inspect
from typing import NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optim_zoo

BF16 = jnp.dtype(jnp.bfloat16)

# The smallest call of each optimizer, and of each primitive.
_OPTIMIZERS = {
    "adan": (optim_zoo.adan, {"learning_rate": 1e-2}),
    "factored_adan": (
        optim_zoo.factored_adan,
        {"learning_rate": 1e-2, "min_dim_size_to_factor": 2},
    ),
    "adafactor": (optim_zoo.adafactor, {"learning_rate": 1e-2, "min_dim_size_to_factor": 2}),
    "apollo": (optim_zoo.apollo, {"learning_rate": 1e-2, "warmup": 5}),
    "adai": (optim_zoo.adai, {"learning_rate": 0.1}),
    "adaiw": (optim_zoo.adaiw, {"learning_rate": 0.1}),
    "factored_adai": (optim_zoo.factored_adai, {"learning_rate": 0.1, "min_dim_size_to_factor": 2}),
    "came": (optim_zoo.came, {"learning_rate": 1e-2}),
}
_PRIMITIVES = {
    "scale_by_nesterov_moment": (optim_zoo.scale_by_nesterov_moment, {}),
    "scale_by_factored_rms": (optim_zoo.scale_by_factored_rms, {"min_dim_size_to_factor": 2}),
    "scale_by_rectified_diag_hessian": (optim_zoo.scale_by_rectified_diag_hessian, {}),
    "scale_by_adaptive_inertia": (optim_zoo.scale_by_adaptive_inertia, {}),
    "scale_by_confidence": (optim_zoo.scale_by_confidence, {}),
}
_ALL = {**_OPTIMIZERS, **_PRIMITIVES}


def _make(name, **overrides):
    factory, kwargs = _ALL[name]
    return factory(**{**kwargs, **overrides})


def _takes(name, argument):
    return argument in inspect.signature(_ALL[name][0]).parameters


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3), jnp.float32),
    }


def _run(tx, params, grad_fn, steps=3):
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _ordinary_grads(params):
    return jax.tree.map(lambda p: 2 * p + 0.1, params)


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --- 1. Leaf paths keep the field names of NamedTuples, dataclasses and flax.struct ---------------


class _Pair(NamedTuple):
    kernel: jax.Array
    embedding: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _PairDataclass:
    kernel: jax.Array
    embedding: jax.Array


@flax.struct.dataclass
class _PairStruct:
    kernel: jax.Array
    embedding: jax.Array


_CONTAINERS = {"namedtuple": _Pair, "dataclass": _PairDataclass, "flax_struct": _PairStruct}


def _field_names(path):
    return [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]


def _factor_kernels(path, shape):
    return (0, 1) if _field_names(path)[-1:] == ["kernel"] else None


@pytest.mark.parametrize("container", list(_CONTAINERS))
def test_a_factoring_rule_sees_field_names(container):
    params = _CONTAINERS[container](kernel=jnp.ones((4, 3)), embedding=jnp.ones((4, 3)))
    tx = optim_zoo.adafactor(1e-2, factoring=_factor_kernels)
    state = tx.init(params)
    # Leaves in field order: the kernel is factored, the embedding keeps a full statistic.
    assert [x is not None for x in state[0].v_row] == [True, False]
    updates, _ = tx.update(jax.tree.map(lambda p: p + 0.5, params), state, params)
    assert _all_finite(updates)


@pytest.mark.parametrize("container", list(_CONTAINERS))
def test_same_shaped_fields_draw_their_own_rounding_bits(container):
    # Identical fields with identical gradients: only their rounding bits can tell them apart.
    x = jnp.asarray(np.random.default_rng(1).standard_normal(64), jnp.float32)
    params = _CONTAINERS[container](kernel=x, embedding=x)
    tx = optim_zoo.adan(
        1e-2,
        dtype_momentum=BF16,
        dtype_second_moment=BF16,
        state_rounding="stochastic",
        state_rounding_seed=3,
    )
    _, state = _run(tx, params, _ordinary_grads)
    moment = state[0]
    assert not np.array_equal(moment.m.kernel, moment.m.embedding)
    assert not np.array_equal(moment.n.kernel, moment.n.embedding)


def test_nnx_variables_and_linen_boxes_add_nothing_to_paths():
    # NNX gives init its variables (`['w'].value`) and update bare arrays (`['w']`); Linen's
    # boxes may be unboxed between the two. Both must name the leaf alike.
    seen = []

    def rule(path, shape):
        seen.append(jax.tree_util.keystr(path))
        return (0, 1)

    tx = optim_zoo.adafactor(1e-2, factoring=rule, multiply_by_parameter_scale=False)
    w = jnp.ones((4, 3))
    for wrapped in (nnx.Param(w), nn.Partitioned(w, names=("a", "b"))):
        state = tx.init({"w": wrapped})
        updates, _ = tx.update({"w": w + 1.0}, state)
        assert _all_finite(updates)
    assert set(seen) == {"['w']"}


# --- 2. State and parameter dtypes the arithmetic cannot promote ----------------------------------

_NARROW_FLOATS = [jnp.float8_e4m3fn, jnp.float8_e5m2]


@pytest.mark.parametrize("dtype", _NARROW_FLOATS, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("argument", ["dtype_momentum", "dtype_second_moment"])
@pytest.mark.parametrize("name", list(_ALL))
def test_an_8_bit_state_dtype_is_refused_at_construction(name, argument, dtype):
    if not _takes(name, argument):
        pytest.skip(f"{name} has no {argument}")
    with pytest.raises(ValueError, match=argument):
        _make(name, **{argument: dtype})


@pytest.mark.parametrize("dtype", _NARROW_FLOATS, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", list(_ALL))
def test_8_bit_parameters_are_refused_at_init(name, dtype):
    tx = _make(name)
    params = {"w": jnp.ones((4, 3), dtype), "b": jnp.ones((3,), jnp.float32)}
    with pytest.raises(TypeError, match=r"\['w'\]") as excinfo:
        tx.init(params)
    assert jnp.dtype(dtype).name in str(excinfo.value)


# --- 3. The rounding seed is an integer in [0, 2**32) ---------------------------------------------

_STOCHASTIC = {"dtype_momentum": BF16, "dtype_second_moment": BF16, "state_rounding": "stochastic"}


def _stochastic(name):
    return {k: v for k, v in _STOCHASTIC.items() if _takes(name, k)}


@pytest.mark.parametrize("seed", [1.0, np.float32(2.0), 1.5])
@pytest.mark.parametrize("name", list(_ALL))
def test_a_float_seed_is_refused(name, seed):
    with pytest.raises(ValueError, match="state_rounding_seed"):
        _make(name, **_stochastic(name), state_rounding_seed=seed)


@pytest.mark.parametrize("name", list(_OPTIMIZERS))
def test_a_float_seed_is_refused_under_inject_hyperparams(name):
    factory, kwargs = _OPTIMIZERS[name]
    tx = optax.inject_hyperparams(factory)(**kwargs, **_STOCHASTIC, state_rounding_seed=1.0)
    with pytest.raises(ValueError, match="state_rounding_seed"):
        jax.jit(tx.init)(_params())


def _injected_seed_only(factory):
    """`factory` under inject_hyperparams with every argument but the seed static."""
    names = set(inspect.signature(factory).parameters) - {"state_rounding_seed"}
    return optax.inject_hyperparams(factory, static_args=tuple(names))


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 2**31, 2**32 - 1])
@pytest.mark.parametrize("name", list(_OPTIMIZERS))
def test_every_seed_gives_the_same_run_with_and_without_inject_hyperparams(name, seed):
    factory, kwargs = _OPTIMIZERS[name]
    expected = _run(
        factory(**kwargs, **_STOCHASTIC, state_rounding_seed=seed), _params(), _ordinary_grads
    )
    # optax turns a Python int into an int32 array: from 2**31, give the seed as an unsigned
    # 32-bit number (or in static_args).
    given = [seed if seed < 2**31 else np.uint32(seed), jnp.uint32(seed)]
    for value in given:
        tx = _injected_seed_only(factory)(**kwargs, **_STOCHASTIC, state_rounding_seed=value)
        params, state = _run(tx, _params(), _ordinary_grads)
        jax.tree.map(np.testing.assert_array_equal, params, expected[0])
        jax.tree.map(np.testing.assert_array_equal, state.inner_state, expected[1])


# --- 4. Callables that optax.inject_hyperparams would take for schedules --------------------------


def _decay_matrices(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _decay_argument(name):
    return "weight_decay_rate" if name == "adafactor" else "weight_decay"


_WITH_MASK = [name for name in _ALL if _takes(name, "weight_decay_mask")]
_WITH_FACTORING = [name for name in _ALL if _takes(name, "factoring")]


@pytest.mark.parametrize("name", _WITH_MASK)
def test_a_callable_mask_under_inject_hyperparams_is_refused(name):
    factory, kwargs = _ALL[name]
    tx = optax.inject_hyperparams(factory)(
        **kwargs, **{_decay_argument(name): 0.1}, weight_decay_mask=_decay_matrices
    )
    with pytest.raises(ValueError, match="weight_decay_mask.*static_args"):
        tx.init(_params())


@pytest.mark.parametrize("name", _WITH_MASK)
def test_a_static_callable_mask_under_inject_hyperparams_decays(name):
    factory, kwargs = _ALL[name]
    decay = {_decay_argument(name): 0.1}
    # Every other argument static too, so that the runs are equal bit for bit.
    tx = optax.inject_hyperparams(
        factory, static_args=tuple(inspect.signature(factory).parameters)
    )(**kwargs, **decay, weight_decay_mask=_decay_matrices)
    plain = factory(**kwargs, **decay, weight_decay_mask=_decay_matrices)
    undecayed = factory(
        **kwargs, **decay, weight_decay_mask=lambda p: jax.tree.map(lambda _: False, p)
    )
    injected, _ = _run(tx, _params(), _ordinary_grads)
    expected, _ = _run(plain, _params(), _ordinary_grads)
    without, _ = _run(undecayed, _params(), _ordinary_grads)
    jax.tree.map(np.testing.assert_array_equal, injected, expected)
    assert not np.allclose(injected["w"], without["w"])


def _rule_with_default_shape(path, shape=()):
    # A rule optax can call with the step count alone, so the call reaches optim_zoo.
    return (0, 1) if len(shape) == 2 else None


@pytest.mark.parametrize("name", _WITH_FACTORING)
def test_a_callable_factoring_rule_under_inject_hyperparams_is_refused(name):
    factory, kwargs = _ALL[name]
    if _takes(name, "factored") and name.startswith("scale_by_"):
        kwargs = {**kwargs, "factored": True}
    tx = optax.inject_hyperparams(factory)(**kwargs, factoring=_rule_with_default_shape)
    with pytest.raises(ValueError, match="factoring.*static_args"):
        tx.init(_params())


# --- 5. Zero epsilons -----------------------------------------------------------------------------


@pytest.mark.parametrize("rebound", ["constant", "belief"])
@pytest.mark.parametrize("name", ["apollo", "scale_by_rectified_diag_hessian"])
def test_apollo_refuses_eps_zero(name, rebound):
    # Its first step divides the zero direction by its 4-norm plus eps: 0 / 0 for any gradient.
    with pytest.raises(ValueError, match="eps"):
        _make(name, eps=0.0, rebound=rebound)


# Every eps-like argument at 0, for each optimizer and primitive that takes one (Apollo refuses).
_EPS_ZERO = {
    "adan": {"eps": 0.0, "eps_root": 0.0},
    "factored_adan": {"eps": 0.0, "eps_root": 0.0},
    "adafactor": {"eps": 0.0},
    "adai": {"eps": 0.0},
    "adaiw": {"eps": 0.0, "weight_decay": 0.1},
    "factored_adai": {"eps": 0.0},
    "came": {"eps": 0.0, "eps_confidence": 0.0},
    "scale_by_nesterov_moment": {"eps": 0.0, "eps_root": 0.0},
    "scale_by_factored_rms": {"eps": 0.0},
    "scale_by_adaptive_inertia": {"eps": 0.0},
    "scale_by_confidence": {"eps_confidence": 0.0},
}
# Defined everywhere but where the second moment is zero, where a zero gradient is a zero step.
_EPS_ZERO_CASES = list(_EPS_ZERO)


@pytest.mark.parametrize("name", _EPS_ZERO_CASES)
def test_eps_zero_on_an_ordinary_gradient_is_finite(name):
    tx = _make(name, **_EPS_ZERO[name])
    assert _all_finite(_run(tx, _params(), _ordinary_grads))


@pytest.mark.parametrize("name", _EPS_ZERO_CASES)
def test_eps_zero_on_a_zero_gradient_is_finite(name):
    tx = _make(name, **_EPS_ZERO[name])
    assert _all_finite(_run(tx, _params(), lambda p: jax.tree.map(jnp.zeros_like, p)))
