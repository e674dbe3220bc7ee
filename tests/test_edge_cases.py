"""Edge cases every optim_zoo optimizer must survive: odd trees, odd shapes, odd gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_zoo
from fixtures import registry

# Configurations chosen for the edges they exercise: global reductions (Adan's clipping, Adai's
# v_bar), per-tensor reductions (Adafactor's rms and factored means, Apollo's 4-norm, belief
# max and stable mean), weight decay of each kind, and Adafactor factoring every 2-D leaf; the
# "edge" family of fixtures/registry.py. Learning rates are such that a small quadratic makes
# progress in 100 bfloat16 steps.
EDGE_OPTIMIZERS = [(case.name, case.factory, case.kwargs) for case in registry.select("edge")]

_ALL = pytest.mark.parametrize(
    ("name", "factory", "kwargs"), EDGE_OPTIMIZERS, ids=[c[0] for c in EDGE_OPTIMIZERS]
)


def _has_decay(kwargs):
    return kwargs.get("weight_decay", 0.0) > 0.0 or kwargs.get("weight_decay_rate") is not None


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _float_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _quadratic(params):
    total = 0.0
    for i, leaf in enumerate(jax.tree.leaves(params)):
        x = leaf.astype(jnp.float32)
        target = jnp.linspace(-1.0, 1.0, x.size).reshape(x.shape) + i
        total = total + jnp.sum((x - target) ** 2)
    return total


def _run_eager(tx, params, grad_fn, num_steps):
    """(params, state, list of updates) after `num_steps` op-by-op steps."""
    state = tx.init(params)
    all_updates = []
    for _ in range(num_steps):
        updates, state = tx.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
        all_updates.append(updates)
    return params, state, all_updates


@_ALL
def test_empty_tree(name, factory, kwargs):
    tx = factory(**kwargs)
    state = tx.init({})
    updates, new_state = tx.update({}, state, {})
    assert updates == {}
    chex.assert_trees_all_equal_structs(new_state, state)
    updates, _ = jax.jit(tx.update)({}, new_state, {})
    assert updates == {}
    assert _all_finite(new_state)


@_ALL
def test_scalar_leaf(name, factory, kwargs):
    tx = factory(**kwargs)
    params = jnp.asarray(3.0)
    grad_fn = jax.grad(lambda p: (p - 1.0) ** 2)
    final, state, all_updates = _run_eager(tx, params, grad_fn, 5)
    for updates in all_updates:
        chex.assert_shape(updates, ())
        chex.assert_type(updates, jnp.float32)
    assert _all_finite((all_updates, state))
    assert abs(float(final) - 1.0) < 2.0  # moved towards the minimum


@_ALL
def test_size_zero_leaves(name, factory, kwargs):
    tx = factory(**kwargs)
    params = {
        "empty": jnp.zeros((0,)),
        "empty_matrix": jnp.zeros((0, 5)),
        "x": jnp.array([0.5, -1.0, 2.0]),
    }
    grad_fn = jax.grad(_quadratic)
    final, state, all_updates = _run_eager(tx, params, grad_fn, 3)
    for updates in all_updates:
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    assert _all_finite(state)
    assert _all_finite(final)

    # Zero-size leaves contribute nothing, even to global reductions (norms, means).
    alone = {"x": params["x"]}
    final_alone, _, _ = _run_eager(tx, alone, lambda p: {"x": grad_fn(params)["x"]}, 1)
    final_one, _, _ = _run_eager(tx, params, grad_fn, 1)
    chex.assert_trees_all_close(final_one["x"], final_alone["x"], rtol=1e-6)


@_ALL
def test_none_leaves(name, factory, kwargs):
    tx = factory(**kwargs)
    params = {"w": jnp.array([[0.5, -1.0], [2.0, 0.0]]), "frozen": None, "b": jnp.array([1.0])}

    def grad_fn(p):
        grads = jax.grad(lambda q: _quadratic({"b": q["b"], "w": q["w"]}))(
            {"b": p["b"], "w": p["w"]}
        )
        return {**grads, "frozen": None}

    final, state, all_updates = _run_eager(tx, params, grad_fn, 3)
    assert all(updates["frozen"] is None for updates in all_updates)
    assert final["frozen"] is None
    assert _all_finite(state)

    without_none = {"b": params["b"], "w": params["w"]}
    final_plain, _, _ = _run_eager(tx, without_none, lambda p: jax.grad(_quadratic)(p), 3)
    chex.assert_trees_all_close({"b": final["b"], "w": final["w"]}, final_plain, rtol=1e-6)


@_ALL
def test_zero_gradients_for_many_steps(name, factory, kwargs):
    tx = factory(**kwargs)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.array([0.5, -0.5, 2.0])}
    state = tx.init(params)
    for _ in range(50):
        grads = jax.tree.map(jnp.zeros_like, params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        # No NaN or Inf anywhere (Adai's v_bar is 0 here, where the official code divides by it).
        assert _all_finite(updates)
        assert _all_finite(_float_leaves(state))
        if not _has_decay(kwargs):
            chex.assert_trees_all_equal(updates, grads)
    # The real gradients that follow still move the parameters, and nothing blows up.
    moved = False
    for _ in range(10):
        updates, state = tx.update(jax.grad(_quadratic)(params), state, params)
        params = optax.apply_updates(params, updates)
        assert _all_finite((updates, _float_leaves(state)))
        moved = moved or any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
    assert moved


@_ALL
def test_bfloat16_hundred_steps(name, factory, kwargs):
    tx = factory(**kwargs)
    params = {
        "w": jnp.linspace(-2.0, 2.0, 12, dtype=jnp.bfloat16).reshape(4, 3),
        "b": jnp.array([0.5, -1.0, 3.0], jnp.bfloat16),
    }

    @jax.jit
    def run(params):
        def body(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(_quadratic)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(body, (params, tx.init(params)), length=100)[0]

    final, state = run(params)
    chex.assert_trees_all_equal_dtypes(final, params)
    assert _all_finite(final)
    assert _all_finite(_float_leaves(state))
    assert float(_quadratic(final)) < 0.5 * float(_quadratic(params))


@_ALL
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nonfinite_gradient_is_not_hidden(name, factory, kwargs, bad_value):
    """Documents the behaviour: like optax's optimizers, optim_zoo does not filter non-finite
    gradients; they reach the updates (so that they are seen), and `optax.apply_if_finite` is
    the tool to skip such steps (next test)."""
    tx = factory(**kwargs)
    params = {"w": jnp.ones((2, 3)), "b": jnp.array([0.5, -1.0, 2.0])}
    grads = jax.grad(_quadratic)(params)
    grads["b"] = grads["b"].at[0].set(bad_value)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert not bool(jnp.all(jnp.isfinite(updates["b"])))


@_ALL
def test_apply_if_finite_keeps_state_clean(name, factory, kwargs):
    tx = factory(**kwargs)
    guarded = optax.apply_if_finite(tx, max_consecutive_errors=3)
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.5, -1.0, 2.0])}
    grad_fn = jax.grad(_quadratic)
    update = jax.jit(guarded.update)

    def corrupt(grads, value):
        return {**grads, "w": grads["w"].at[1, 2].set(value)}

    state = guarded.init(params)
    guarded_params = params
    # Two good steps, a NaN step, an Inf step, two good steps.
    for bad in (None, None, np.nan, np.inf, None, None):
        grads = grad_fn(guarded_params)
        if bad is not None:
            grads = corrupt(grads, bad)
        previous = state.inner_state
        updates, state = update(grads, state, guarded_params)
        assert _all_finite(updates)
        assert _all_finite(_float_leaves(state.inner_state))
        if bad is not None:
            chex.assert_trees_all_equal(state.inner_state, previous)
        guarded_params = optax.apply_updates(guarded_params, updates)
    assert int(state.total_notfinite) == 2

    reference, _, _ = _run_eager(tx, params, grad_fn, 4)
    chex.assert_trees_all_close(guarded_params, reference, rtol=1e-5, atol=1e-6)


# Per primitive state: the fields that are second-moment-like, kept in at least float32, and the
# first-moment-like ones, kept in the parameter's dtype.
_STATE_FIELDS = {
    optim_zoo.ScaleByNesterovMomentState: (("n",), ("m", "v")),
    optim_zoo.ScaleByFactoredRmsState: (("v_row", "v_col", "v"), ()),
    optim_zoo.ScaleByRectifiedDiagHessianState: (("hessian_diag",), ("m",)),
    optim_zoo.ScaleByAdaptiveInertiaState: (("v", "beta1_prod"), ("m",)),
    optim_zoo.ScaleByConfidenceState: (("instability",), ("m",)),
}


def _primitive_states(state):
    state_types = tuple(_STATE_FIELDS)
    return [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, state_types))
        if isinstance(s, state_types)
    ]


@_ALL
def test_mixed_float32_and_bfloat16_leaves(name, factory, kwargs):
    tx = factory(**kwargs)
    params = {
        "a": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4),
        "b": jnp.array([0.5, -1.0, 2.0, 0.0], jnp.bfloat16),
    }
    grad_fn = jax.grad(_quadratic)
    final, state, all_updates = _run_eager(tx, params, grad_fn, 10)
    for updates in all_updates:
        chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_trees_all_equal_dtypes(final, params)
    assert _all_finite((final, _float_leaves(state)))
    chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(params))

    primitive_states = _primitive_states(state)
    assert primitive_states  # one per primitive (CAME chains two)
    for primitive in primitive_states:
        wide_fields, param_dtype_fields = _STATE_FIELDS[type(primitive)]
        for field in wide_fields:
            for leaf in jax.tree.leaves(getattr(primitive, field)):
                assert leaf.dtype == jnp.float32, (field, leaf.dtype)
        for field in param_dtype_fields:
            chex.assert_trees_all_equal_dtypes(getattr(primitive, field), params)


# --- Inputs a user can pass: each works, or is refused with an error that says why. ---------


def _fixed_grads(params, t):
    """Gradients that do not depend on the params, so two runs can be compared step by step."""
    return jax.tree.map(
        lambda p: (
            jnp.cos(jnp.arange(p.size, dtype=jnp.float32) + t).reshape(p.shape) + 0.1
        ).astype(p.dtype),
        params,
    )


def _params_wb():
    return {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.array([0.5, -1.0, 2.0])}


@_ALL
def test_python_float_leaf(name, factory, kwargs):
    # As optax.adam accepts {"t": 1.0}: the same run as with a jax scalar there.
    tx = factory(**kwargs)
    as_python = {"t": 1.0, "w": jnp.ones((2, 3))}
    as_array = {"t": jnp.asarray(1.0), "w": jnp.ones((2, 3))}
    grads = {"t": 0.5, "w": jnp.full((2, 3), 0.25)}
    array_grads = {"t": jnp.asarray(0.5), "w": grads["w"]}
    updates, state = tx.update(grads, tx.init(as_python), as_python)
    expected, expected_state = tx.update(array_grads, tx.init(as_array), as_array)
    chex.assert_trees_all_equal(updates, expected)
    chex.assert_trees_all_equal(state, expected_state)


@_ALL
@pytest.mark.parametrize(
    "leaf",
    [jnp.array([1, 2], jnp.int32), jnp.array([True, False]), 3],
    ids=["int32", "bool", "int"],
)
def test_integer_and_bool_leaves_are_refused_at_init(name, factory, kwargs, leaf):
    tx = factory(**kwargs)
    with pytest.raises(TypeError, match=r"\['count'\]"):
        tx.init({"count": leaf, "w": jnp.ones(3)})


def _complex_params():
    re = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    return {"c": jax.lax.complex(re, 0.5 - re[::-1]), "b": jnp.array([0.5, -1.0, 2.0])}


def _as_real(tree):
    return jax.tree.map(lambda x: jnp.stack([x.real, x.imag]) if jnp.iscomplexobj(x) else x, tree)


@_ALL
def test_complex_leaf_is_its_real_and_imaginary_parts(name, factory, kwargs):
    # PyTorch's convention: a complex leaf trains as the real array of its two parts, stacked.
    tx = factory(**kwargs)
    params = _complex_params()
    real_params = _as_real(params)
    state, real_state = tx.init(params), tx.init(real_params)
    for t in range(5):
        grads = jax.tree.map(lambda p, t=t: p * (1.0 + 0.1 * t) + 0.3, params)
        updates, state = tx.update(grads, state, params)
        real_updates, real_state = tx.update(_as_real(grads), real_state, real_params)
        chex.assert_trees_all_equal_dtypes(updates, params)
        chex.assert_trees_all_close(_as_real(updates), real_updates, rtol=1e-6, atol=1e-7)
        params = optax.apply_updates(params, updates)
        real_params = optax.apply_updates(real_params, real_updates)
    assert _all_finite(_as_real(params))


@_ALL
def test_complex_least_squares_converges(name, factory, kwargs):
    # JAX's gradient of a real loss in a complex parameter is the conjugate of the steepest
    # ascent direction; its conjugate is the gradient of the two real parts, (d/dre + i d/dim).
    target = jnp.array([1.0 + 2.0j, -0.5j, 0.25 - 1.0j])
    loss = lambda p: jnp.sum(jnp.abs(p["z"] - target) ** 2)  # noqa: E731
    tx = factory(**kwargs)
    params = {"z": jnp.zeros(3, jnp.complex64)}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.tree.map(jnp.conj, jax.grad(loss)(params))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(300):
        params, state = step(params, state)
    assert float(loss(params)) < float(loss({"z": jnp.zeros(3, jnp.complex64)}))


# A bad gradient with an infinite global norm makes the official Adan clip scale every gradient
# by zero for that step (documented in optim_zoo.adan); the infinite element itself turns NaN.
_CLIPPED = {"adan_clip_decay"}


@_ALL
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_a_bad_gradient_is_never_hidden(name, factory, kwargs, bad_value):
    """After one non-finite gradient element, every later update of the other elements is either
    the one a clean run gives, or non-finite: the bad value may stay in its own element (which
    may then freeze, as Adam's does once its second moment is infinite) or spread as NaN, but it
    never changes how the rest of the model trains while looking finite."""
    if bad_value == np.inf and name in _CLIPPED:
        pytest.skip("the official clip zeroes the whole step for an infinite norm")
    tx = factory(**kwargs)
    params = _params_wb()
    clean_state, bad_state = tx.init(params), tx.init(params)
    for t in range(4):
        grads = _fixed_grads(params, t)
        bad_grads = {**grads, "b": grads["b"].at[0].set(bad_value)} if t == 0 else grads
        clean, clean_state = tx.update(grads, clean_state, params)
        bad, bad_state = tx.update(bad_grads, bad_state, params)
        if t == 0:
            assert not bool(jnp.isfinite(bad["b"][0]))
        bad, clean = ({**u, "b": u["b"][1:]} for u in (bad, clean))  # the other elements
        for got, want in zip(jax.tree.leaves(bad), jax.tree.leaves(clean), strict=True):
            finite = jnp.isfinite(got)
            np.testing.assert_allclose(
                np.where(finite, got, 0), np.where(finite, want, 0), rtol=1e-5, atol=1e-7
            )


@_ALL
def test_a_nan_in_a_large_leaf_is_never_hidden_under_jit(name, factory, kwargs):
    """The rule above, jitted, with the NaN the last element of a leaf of 8,192: there XLA:CPU
    fuses the per-tensor reductions (a maximum among them, which under jit can drop a NaN
    from 4,096 elements on) and an 8-bit configuration stores the leaf as codes."""
    tx = factory(**kwargs)
    params = {"w": jnp.linspace(-1.0, 1.0, 64 * 128).reshape(64, 128), "b": jnp.ones(3)}
    update = jax.jit(tx.update)
    clean_state, bad_state = tx.init(params), tx.init(params)
    for t in range(3):
        grads = _fixed_grads(params, t)
        bad_grads = {**grads, "w": grads["w"].at[-1, -1].set(np.nan)} if t == 0 else grads
        clean, clean_state = update(grads, clean_state, params)
        bad, bad_state = update(bad_grads, bad_state, params)
        if t == 0:
            assert not bool(jnp.isfinite(bad["w"][-1, -1]))
        bad, clean = ({**u, "w": u["w"].ravel()[:-1]} for u in (bad, clean))
        for got, want in zip(jax.tree.leaves(bad), jax.tree.leaves(clean), strict=True):
            finite = jnp.isfinite(got)
            np.testing.assert_allclose(
                np.where(finite, got, 0), np.where(finite, want, 0), rtol=1e-5, atol=1e-7
            )


@_ALL
def test_gradient_tree_unlike_the_state_is_refused(name, factory, kwargs):
    tx = factory(**kwargs)
    params = _params_wb()
    state = tx.init(params)
    renamed = {"x": params["w"], "y": params["b"]}  # same shapes, other keys
    with pytest.raises(ValueError, match="tree structure"):
        tx.update(_fixed_grads(renamed, 0), state, renamed)


@_ALL
def test_gradient_leaf_of_another_shape_is_refused(name, factory, kwargs):
    # Broadcasting would let a (1,) gradient train the (3,) state of "b" without a word, as it
    # does in optax.adam.
    tx = factory(**kwargs)
    params = _params_wb()
    state = tx.init(params)
    grads = _fixed_grads(params, 0)
    with pytest.raises(ValueError, match=r"the update of \['b'\] has shape \(1,\)"):
        tx.update({**grads, "b": grads["b"][:1]}, state, params)


def _reads_params(factory, kwargs):
    return _has_decay(kwargs) or (
        factory is optim_zoo.adafactor and kwargs.get("multiply_by_parameter_scale", True)
    )


_READING_PARAMS = [case for case in EDGE_OPTIMIZERS if _reads_params(*case[1:])]


@pytest.mark.parametrize(
    ("name", "factory", "kwargs"), _READING_PARAMS, ids=[c[0] for c in _READING_PARAMS]
)
def test_parameter_of_another_shape_is_refused(name, factory, kwargs):
    # Where decay or the parameter scale reads a parameter, one of shape (1,) for an update of
    # shape (3,) would broadcast into the update, and apply_updates would reshape the parameter.
    tx = factory(**kwargs)
    params = _params_wb()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(3,\), but .* has shape \(1,\)"):
        tx.update(_fixed_grads(params, 0), state, {**params, "b": params["b"][:1]})


@pytest.mark.parametrize(
    ("tx", "message"),
    [
        # A factored leaf's statistics fit its transpose too; the parameter scale tells.
        (optim_zoo.adafactor(min_dim_size_to_factor=3), "but its parameter has shape"),
        # CAME factors the last two axes, not the two largest: the transpose's statistics would
        # be (4,) and (3,), not the stored (3,) and (4,).
        (optim_zoo.came(1e-3), "factored statistics, of shapes"),
    ],
    ids=["adafactor", "came"],
)
def test_transposed_gradient_of_a_factored_leaf_is_refused(tx, message):
    params = _params_wb()
    state = tx.init(params)
    grads = _fixed_grads(params, 0)
    with pytest.raises(ValueError, match=message):
        tx.update({**grads, "w": grads["w"].T}, state, params)


@_ALL
def test_update_without_params_when_nothing_needs_them(name, factory, kwargs):
    # As optax.adam: no params needed unless weight decay or the parameter scale reads them.
    tx = factory(**kwargs)
    params = _params_wb()
    needs_params = _reads_params(factory, kwargs)
    state = tx.init(params)
    if needs_params:
        with pytest.raises(ValueError, match="params"):
            tx.update(_fixed_grads(params, 0), state)
        return
    updates, _ = tx.update(_fixed_grads(params, 0), state)
    expected, _ = tx.update(_fixed_grads(params, 0), state, params)
    chex.assert_trees_all_equal(updates, expected)


@pytest.mark.parametrize("factored", [False, True], ids=["adan", "factored_adan"])
def test_adan_freezes_on_huge_gradients(factored):
    # (g + b2 diff)**2 overflows float32 at |g| ~ 1e19, as in the official code: Adan's n is then
    # inf and its step 0 (Adam does the same). The factored estimate must freeze too, not give
    # inf / inf = NaN.
    if factored:
        tx = optim_zoo.factored_adan(0.01, min_dim_size_to_factor=2)
    else:
        tx = optim_zoo.adan(0.01)
    initial = {"w": jnp.ones((3, 4))}

    def run(gradient, num_steps):
        params, state = initial, tx.init(initial)
        steps = []
        for _ in range(num_steps):
            updates, state = tx.update({"w": jnp.full((3, 4), gradient)}, state, params)
            steps.append(np.asarray(updates["w"]))
            params = optax.apply_updates(params, updates)
        (moment,) = [
            s
            for s in jax.tree.leaves(
                state, is_leaf=lambda x: isinstance(x, optim_zoo.ScaleByNesterovMomentState)
            )
            if isinstance(s, optim_zoo.ScaleByNesterovMomentState)
        ]
        return steps, params, jax.tree.leaves(moment.n)

    # Below the overflow ((1e18)**2 = 1e36) the same gradient moves the parameters...
    steps, params, n = run(1e18, 1)
    assert np.all(np.abs(steps[0]) > 1e-3) and all(np.all(np.isfinite(x)) for x in n)
    # ...above it n is infinite and every step is exactly zero: the parameters do not move.
    steps, params, n = run(1e30, 3)
    assert n and all(np.all(np.isinf(x)) for x in n)
    for step in steps:
        np.testing.assert_array_equal(step, np.zeros_like(step))
    np.testing.assert_array_equal(params["w"], initial["w"])


def test_adafactor_large_float16_leaf():
    # 2**16 + elements: the block-RMS clip sums squares in float32, not float16.
    params = {"w": jnp.full((300, 300), 0.5, jnp.float16)}
    grads = {"w": jnp.full((300, 300), 0.01, jnp.float16)}
    for factored in (True, False):
        tx = optim_zoo.adafactor(factored=factored)
        updates, _ = tx.update(grads, tx.init(params), params)
        f32 = jax.tree.map(lambda x: x.astype(jnp.float32), (params, grads))
        expected, _ = tx.update(f32[1], tx.init(f32[0]), f32[0])
        assert _all_finite(updates)
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x.astype(jnp.float32), updates), expected, rtol=2e-3
        )


def test_adafactor_decay_offset_on_a_fresh_state():
    # Steps before the offset count as the first (decay 0); from the offset on, the schedule
    # restarts, so step `offset + c` of an offset run is step `c` of a run without one.
    params = _params_wb()
    offset_tx = optim_zoo.scale_by_factored_rms(min_dim_size_to_factor=2, decay_offset=3)
    plain_tx = optim_zoo.scale_by_factored_rms(min_dim_size_to_factor=2)
    offset_state, plain_state = offset_tx.init(params), plain_tx.init(params)
    for t in range(3):
        _, offset_state = offset_tx.update(_fixed_grads(params, 100 + t), offset_state)
    for t in range(4):
        offset_updates, offset_state = offset_tx.update(_fixed_grads(params, t), offset_state)
        plain_updates, plain_state = plain_tx.update(_fixed_grads(params, t), plain_state)
        assert _all_finite(offset_updates)
        chex.assert_trees_all_close(offset_updates, plain_updates, rtol=1e-6)
