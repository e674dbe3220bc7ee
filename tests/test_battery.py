"""One behavioural battery run over every optim_zoo optimizer and its main options.

Modelled on optax's `alias_test.py`: a module-level list of configurations, and every test is
parametrised over it. The tests check what any optax optimizer must do (converge on small
problems, compile once, accept extra `update` arguments, work inside `inject_hyperparams`,
`MultiSteps`, `apply_if_finite`, `lax.cond`, abstract `init`, schedules and weight-decay masks);
the step-by-step numerics against the official code are tested elsewhere.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_zoo
from fixtures import registry

# Every configuration under test: (name, factory, kwargs), from the "battery" family of
# fixtures/registry.py, which says why each learning rate. These kwargs, learning rates included,
# are used by every test below. Each configuration converges on the three problems of
# `test_convergence` in `_NUM_STEPS` steps to `_ATOL` of the minimiser (per coordinate), or to
# the looser tolerance of `_ATOL_OVERRIDES` (the registry's attrs["atol"]).
_BATTERY = registry.select("battery")
OPTIMIZERS = [(case.name, case.factory, case.kwargs) for case in _BATTERY]

_NUM_STEPS = 10_000
_ATOL = 1e-3
_ATOL_OVERRIDES = {case.name: case.attrs["atol"] for case in _BATTERY if "atol" in case.attrs}

_IDS = [name for name, _, _ in OPTIMIZERS]
_ALL = pytest.mark.parametrize(("name", "factory", "kwargs"), OPTIMIZERS, ids=_IDS)

_WITH_LEARNING_RATE = [case for case in OPTIMIZERS if case[2].get("learning_rate") is not None]
_WITH_DECAY = [
    case
    for case in OPTIMIZERS
    if case[2].get("weight_decay", 0.0) > 0.0 or case[2].get("weight_decay_rate") is not None
]


def _parabola():
    initial = jnp.array([-1.0, 10.0, 1.0])
    solution = jnp.array([1.0, -1.0, 1.0])

    def objective(params):
        return jnp.sum((params - solution) ** 2)

    return initial, solution, objective


def _rosenbrock():
    initial = jnp.array([0.0, 0.0])
    solution = jnp.array([1.0, 1.0])

    def objective(params):
        return (1.0 - params[0]) ** 2 + 100.0 * (params[1] - params[0] ** 2) ** 2

    return initial, solution, objective


def _matrix_quadratic():
    """A (3, 4) least-squares problem, so that factored second moments are exercised."""
    initial = jnp.zeros((3, 4))
    solution = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
    scales = jnp.linspace(0.5, 2.0, 12).reshape(3, 4)

    def objective(params):
        return jnp.sum(scales * (params - solution) ** 2)

    return initial, solution, objective


def _tree_problem(dtype=jnp.float32):
    """Separable quadratic over a matrix and a vector leaf, with non-zero, varied gradients."""
    params = {
        "b": jnp.array([0.5, -1.0, 2.0, 0.25], dtype),
        "w": jnp.linspace(-1.0, 1.5, 12, dtype=dtype).reshape(3, 4),
    }
    targets = {
        "b": jnp.array([1.0, 1.0, -1.0, 0.0]),
        "w": jnp.linspace(2.0, -1.0, 12).reshape(3, 4),
    }

    def objective(params):
        total = 0.0
        for key in ("b", "w"):
            x = params[key].astype(jnp.promote_types(params[key].dtype, jnp.float32))
            total = total + jnp.sum((x - targets[key]) ** 2)
        return total

    return params, objective


def _run(tx, objective, params, num_steps):
    """Runs `num_steps` steps of `tx` on `objective` in one jitted scan: (params, state)."""

    def body(carry, _):
        params, state = carry
        grads = jax.grad(objective)(params)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    @jax.jit
    def run(params):
        (params, state), _ = jax.lax.scan(body, (params, tx.init(params)), length=num_steps)
        return params, state

    return run(params)


def _run_eager(tx, objective, params, num_steps, **extra_args):
    """The same as `_run`, op by op: cheaper than compiling for a handful of steps."""
    state = tx.init(params)
    for _ in range(num_steps):
        updates, state = tx.update(jax.grad(objective)(params), state, params, **extra_args)
        params = optax.apply_updates(params, updates)
    return params, state


def _tree_all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _avals(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@_ALL
@pytest.mark.parametrize("target", [_parabola, _rosenbrock, _matrix_quadratic])
def test_convergence(name, factory, kwargs, target):
    initial, solution, objective = target()
    params, _ = _run(factory(**kwargs), objective, initial, _NUM_STEPS)
    atol = _ATOL_OVERRIDES.get(name, _ATOL)
    chex.assert_trees_all_close(params, solution, atol=atol, rtol=0.0)


@_ALL
def test_returns_extra_args_transformation(name, factory, kwargs):
    assert isinstance(factory(**kwargs), optax.GradientTransformationExtraArgs)


@_ALL
def test_no_recompilation_on_second_step(name, factory, kwargs):
    tx = factory(**kwargs)
    params, objective = _tree_problem()
    num_traces = 0

    @jax.jit
    def step(params, state):
        nonlocal num_traces
        num_traces += 1
        grads = jax.grad(objective)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    # A second trace means that the state returned by `update` differs from the one built by
    # `init` in structure, shape, dtype or weak type, so every training loop would compile twice.
    assert num_traces == 1


@_ALL
def test_update_accepts_unknown_extra_args(name, factory, kwargs):
    tx = factory(**kwargs)
    params, objective = _tree_problem()
    expected, _ = _run_eager(tx, objective, params, 2)
    got, _ = _run_eager(tx, objective, params, 2, some_unexpected_argument=1.0, loss=jnp.ones(()))
    chex.assert_trees_all_equal(got, expected)


# Non-default float hyperparameters injected on top of each configuration, so that injected
# values differ from the defaults baked into the code.
_FLOAT_OVERRIDES = {
    optim_zoo.adan: {"b1": 0.9, "b2": 0.95, "b3": 0.95, "eps": 1e-6},
    optim_zoo.adafactor: {"decay_rate": 0.7, "clipping_threshold": 1.5, "eps": 1e-20},
    optim_zoo.apollo: {"beta": 0.8, "eps": 1e-3},
    optim_zoo.adai: {"beta0": 0.2, "beta2": 0.95, "eps": 1e-2},
    optim_zoo.adaiw: {"beta0": 0.2, "beta2": 0.95, "eps": 1e-2},
    optim_zoo.factored_adan: {"b1": 0.9, "b2": 0.95, "b3": 0.95, "eps": 1e-6},
    optim_zoo.factored_adai: {"beta0": 0.2, "beta2": 0.95, "eps": 1e-2},
    optim_zoo.came: {"b1": 0.8, "b2": 0.99, "b3": 0.999, "eps_confidence": 1e-12},
}
# Nothing is static: every number, shape-deciding `min_dim_size_to_factor` included, is
# injected (factoring is decided at an eager `init`, and `update` reads it from the state).
# `dtype_momentum` (a callable such as `jnp.float32`) is taken for a schedule by
# inject_hyperparams; optim_zoo.adafactor reads the dtype of the value that schedule yields
# (static before optax 0.2.8, which casts that value: see registry.inject_hyperparams).


def _injected_and_plain(factory, kwargs):
    kwargs = {**kwargs, **_FLOAT_OVERRIDES[factory]}
    injected = registry.inject_hyperparams(factory, kwargs)
    # Every number the caller passes, and every float override, is injected: a traced value.
    numbers = {
        k for k, v in kwargs.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return injected, factory(**kwargs), numbers


@_ALL
def test_inject_hyperparams_matches_plain(name, factory, kwargs):
    # float64, where the plain and the injected runs must agree to round-off: in float32 the
    # round-off of the hyperparameters' own float32 conversion is amplified by Apollo's secant
    # update to about 1e-5 after five steps.
    with jax.enable_x64(True):
        if factory is optim_zoo.adafactor and kwargs.get("momentum") is not None:
            # The default float32 momentum would round the float64 run.
            kwargs = {**kwargs, "dtype_momentum": jnp.float64}
        injected, plain, numbers = _injected_and_plain(factory, kwargs)
        params, objective = _tree_problem(jnp.float64)
        injected_params, injected_state = _run(injected, objective, params, 5)
        plain_params, plain_state = _run_eager(plain, objective, params, 5)
        chex.assert_trees_all_close(injected_params, plain_params, rtol=1e-10, atol=1e-12)
        chex.assert_trees_all_close(injected_state.inner_state, plain_state, rtol=1e-10, atol=1e-12)
        assert numbers <= set(injected_state.hyperparams)


@_ALL
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_inject_hyperparams_state_dtypes(name, factory, kwargs, dtype):
    injected, plain, _ = _injected_and_plain(factory, kwargs)
    params, objective = _tree_problem(jnp.dtype(dtype))
    grads = jax.grad(objective)(params)

    def step(tx):
        # An eager init (where an injected min_dim_size_to_factor can be read), a traced update.
        state = tx.init(params)
        return lambda: tx.update(grads, state, params)

    # Abstract evaluation traces the injected optimizer with array hyperparameters (no compile).
    injected_updates, injected_state = jax.eval_shape(step(injected))
    plain_updates, plain_state = jax.eval_shape(step(plain))
    chex.assert_trees_all_equal_shapes_and_dtypes(injected_updates, plain_updates)
    chex.assert_trees_all_equal_structs(injected_state.inner_state, plain_state)
    chex.assert_trees_all_equal_shapes_and_dtypes(injected_state.inner_state, plain_state)


@_ALL
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_dtypes_stable_through_cond(name, factory, kwargs, dtype):
    """Updates keep the gradient dtype; the state keeps its tree, shapes and dtypes."""
    with jax.enable_x64(dtype == "float64"):
        tx = factory(**kwargs)
        params, objective = _tree_problem(jnp.dtype(dtype))

        @jax.jit
        def step(params, state, take_update):
            grads = jax.grad(objective)(params)
            updates, new_state = tx.update(grads, state, params)
            # Both branches must agree on tree structure, shapes and dtypes (as in optax's tests,
            # a traced predicate keeps the compiler from folding the cond away).
            new_state = jax.lax.cond(take_update, lambda: new_state, lambda: state)
            return optax.apply_updates(params, updates), new_state, updates, grads

        state = tx.init(params)
        for _ in range(2):
            params, new_state, updates, grads = step(params, state, jnp.asarray(True))
            chex.assert_trees_all_equal_dtypes(updates, grads)
            chex.assert_trees_all_equal_structs(new_state, state)
            chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
            state = new_state
        assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(params))


@_ALL
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_multi_steps(name, factory, kwargs, dtype):
    every_k = 3
    tx = factory(**kwargs)
    multi = optax.MultiSteps(tx, every_k_schedule=every_k)
    params, objective = _tree_problem(jnp.dtype(dtype))
    grads = jax.grad(objective)(params)
    grads_sequence = [jax.tree.map(lambda g, s=s: g * s, grads) for s in (1.0, -0.5, 2.0)]

    @jax.jit
    def run(params, stacked_grads):
        def body(state, grads):
            updates, state = multi.update(grads, state, params)
            return state, updates

        return jax.lax.scan(body, multi.init(params), stacked_grads)[1]

    stacked_updates = run(params, jax.tree.map(lambda *gs: jnp.stack(gs), *grads_sequence))
    chex.assert_trees_all_equal_dtypes(stacked_updates, grads)
    # No update until the k-th gradient, then the inner update of the mean gradient.
    for i in range(every_k - 1):
        updates = jax.tree.map(lambda u, i=i: u[i], stacked_updates)
        chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))
    updates = jax.tree.map(lambda u: u[every_k - 1], stacked_updates)
    expected, _ = tx.update(_running_mean(grads_sequence), tx.init(params), params)
    # The same inner update, up to how XLA rounds two different programs: one rounding of the
    # update's dtype, relative to each leaf's largest step (the steps run from 1e-6 to 0.15
    # here, below any fixed tolerance). The inner update must not be zero: two zero steps agree.
    tol = 2**-8 if dtype == "bfloat16" else 1e-5
    for (path, want), got in zip(
        jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(updates), strict=True
    ):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        step = np.max(np.abs(want))
        assert step > 0, f"{jax.tree_util.keystr(path)}: the inner update is zero"
        np.testing.assert_allclose(
            got, want, rtol=tol, atol=tol * step, err_msg=jax.tree_util.keystr(path)
        )


def _running_mean(grads_sequence):
    """The mean gradient as MultiSteps accumulates it: a float32 running mean, then cast back."""

    def mean(*gs):
        acc = jnp.zeros(gs[0].shape, jnp.float32)
        for n, g in enumerate(gs):
            acc = acc + (g - acc) / (n + 1)
        return acc.astype(gs[0].dtype)

    return jax.tree.map(mean, *grads_sequence)


@_ALL
def test_apply_if_finite_skips_nonfinite_step(name, factory, kwargs):
    tx = factory(**kwargs)
    guarded = optax.apply_if_finite(tx, max_consecutive_errors=3)
    params, objective = _tree_problem()
    grad_fn = jax.grad(objective)

    guarded_update = jax.jit(guarded.update)
    state = guarded.init(params)
    updates, state = guarded_update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
    params_before, inner_before = params, state.inner_state

    bad_grads = grad_fn(params)
    bad_grads["b"] = bad_grads["b"].at[1].set(jnp.nan)
    updates, state = guarded_update(bad_grads, state, params)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(state.inner_state, inner_before)
    params = optax.apply_updates(params, updates)
    chex.assert_trees_all_equal(params, params_before)
    assert int(state.notfinite_count) == 1

    # The next finite steps continue as if the bad step never happened.
    for _ in range(2):
        updates, state = guarded_update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
    reference, _ = _run_eager(tx, objective, _tree_problem()[0], 3)
    chex.assert_trees_all_close(params, reference, rtol=1e-5, atol=1e-6)
    assert _tree_all_finite(state)


@_ALL
def test_init_from_shape_dtype_structs(name, factory, kwargs):
    tx = factory(**kwargs)
    params = {
        "b": jnp.ones((4,), jnp.bfloat16),
        "w": jnp.ones((3, 4), jnp.float32),
        "k": jnp.ones((2, 3, 5), jnp.float32),
    }
    expected = _avals(tx.init(params))

    from_eval_shape = jax.eval_shape(tx.init, _avals(params))
    chex.assert_trees_all_equal_structs(from_eval_shape, expected)
    chex.assert_trees_all_equal_shapes_and_dtypes(from_eval_shape, expected)

    # optax's own optimizers accept ShapeDtypeStructs in `init` directly.
    direct = tx.init(_avals(params))
    chex.assert_trees_all_equal_structs(direct, expected)
    chex.assert_trees_all_equal_shapes_and_dtypes(_avals(direct), expected)


def _schedule_kwargs(factory, kwargs):
    # Apollo's default init_lr derives from learning_rate; make it explicit so that a constant
    # learning rate per step reproduces the scheduled run exactly.
    if factory is optim_zoo.apollo:
        return {**kwargs, "init_lr": 1e-4}
    return kwargs


@pytest.mark.parametrize(
    ("name", "factory", "kwargs"), _WITH_LEARNING_RATE, ids=[c[0] for c in _WITH_LEARNING_RATE]
)
@pytest.mark.parametrize("schedule_name", ["linear", "exponential"])
def test_schedule_matches_manual_learning_rates(name, factory, kwargs, schedule_name):
    kwargs = _schedule_kwargs(factory, kwargs)
    lr = kwargs["learning_rate"]
    if schedule_name == "linear":
        optax_schedule = optax.linear_schedule(lr, 0.25 * lr, transition_steps=3)
    else:
        optax_schedule = optax.exponential_decay(lr, transition_steps=1, decay_rate=0.5)

    # float64 so that the tolerance can be tight and the schedule's effect stands far above it.
    # optax's schedules return float32 for the optimizer's int32 count even with x64 enabled; the
    # cast keeps later products such as lr * weight_decay in float64, like a Python float's.
    def schedule(count):
        return optax_schedule(count).astype(jnp.float64)

    num_steps = 4
    with jax.enable_x64(True):
        params, objective = _tree_problem(jnp.float64)
        grad_fn = jax.grad(objective)
        scheduled_params, _ = _run_eager(
            factory(**{**kwargs, "learning_rate": schedule}), objective, params, num_steps
        )

        manual_params, state = params, factory(**kwargs).init(params)
        for count in range(num_steps):
            step_lr = float(schedule(jnp.asarray(count, jnp.int32)))
            tx = factory(**{**kwargs, "learning_rate": step_lr})
            updates, state = tx.update(grad_fn(manual_params), state, manual_params)
            manual_params = optax.apply_updates(manual_params, updates)

        chex.assert_trees_all_close(scheduled_params, manual_params, rtol=1e-12, atol=1e-14)
        # The schedule has an effect: a constant learning rate gives another trajectory.
        constant_params, _ = _run_eager(factory(**kwargs), objective, params, num_steps)
        assert not np.allclose(constant_params["w"], scheduled_params["w"], rtol=1e-8, atol=0.0)


def _masked_adai_reference(factory, kwargs, decay, mask, objective, params, num_steps):
    """Adai with decay applied by hand to the leaves where `mask` is True.

    Adai's v_bar is a mean over every leaf, so decaying one leaf changes the others' momentum:
    the masked-out leaves cannot be compared with a decay-free run, only with this construction.
    """
    no_decay = factory(**{**kwargs, "weight_decay": 0.0})
    decoupled = factory is optim_zoo.adaiw or kwargs.get("decoupled", False)
    lr = kwargs["learning_rate"]
    state = no_decay.init(params)
    for _ in range(num_steps):
        grads = jax.grad(objective)(params)
        if not decoupled:
            grads = jax.tree.map(lambda g, p, m: g + decay * p if m else g, grads, params, mask)
        updates, state = no_decay.update(grads, state, params)
        if decoupled:
            updates = jax.tree.map(
                lambda u, p, m: u - lr * decay * p if m else u, updates, params, mask
            )
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize(
    ("name", "factory", "kwargs"), _WITH_DECAY, ids=[c[0] for c in _WITH_DECAY]
)
def test_weight_decay_mask(name, factory, kwargs):
    decay_key = "weight_decay_rate" if "weight_decay_rate" in kwargs else "weight_decay"
    kwargs = {**kwargs, decay_key: 0.1}
    mask = {"b": False, "w": True}
    num_steps = 8
    # float64, so that even a decay damped by Apollo's warmup stands far above round-off.
    with jax.enable_x64(True):
        params, objective = _tree_problem(jnp.float64)

        def run(**overrides):
            return _run_eager(factory(**{**kwargs, **overrides}), objective, params, num_steps)[0]

        masked_params = run(weight_decay_mask=mask)
        callable_params = run(weight_decay_mask=lambda p: {"b": False, "w": True})
        chex.assert_trees_all_close(callable_params, masked_params, rtol=1e-12)
        decayed_params = run()
        undecayed_params = run(**{decay_key: 0.0})
        # Guard: the decay visibly moves both leaves, so the comparisons below can fail.
        for key in ("b", "w"):
            assert not np.allclose(decayed_params[key], undecayed_params[key], rtol=1e-8, atol=0)

        if factory in (optim_zoo.adai, optim_zoo.adaiw, optim_zoo.factored_adai):
            reference = _masked_adai_reference(
                factory, kwargs, kwargs[decay_key], mask, objective, params, num_steps
            )
            chex.assert_trees_all_close(masked_params, reference, rtol=1e-10, atol=1e-12)
        else:
            # The other optimizers treat leaves independently on this separable problem: the
            # masked-out leaf follows the decay-free run, the masked-in leaf the decayed one.
            chex.assert_trees_all_close(masked_params["b"], undecayed_params["b"], rtol=1e-10)
            chex.assert_trees_all_close(masked_params["w"], decayed_params["w"], rtol=1e-10)


_FACTORING = [case for case in OPTIMIZERS if "min_dim_size_to_factor" in case[2]]


@pytest.mark.parametrize(("name", "factory", "kwargs"), _FACTORING, ids=[c[0] for c in _FACTORING])
def test_inject_hyperparams_traced_init_needs_no_static_args(name, factory, kwargs):
    # Under jax.jit and jax.eval_shape an injected min_dim_size_to_factor is a tracer in init,
    # which decides the state's shapes from it (optax issue #412): the same state as an eager
    # init, and as with static_args.
    params, _ = _tree_problem()
    injected = registry.inject_hyperparams(factory, kwargs)
    static = registry.inject_hyperparams(factory, kwargs, ("min_dim_size_to_factor",))
    eager = injected.init(params).inner_state
    for state in (jax.jit(injected.init)(params), jax.eval_shape(injected.init, params)):
        chex.assert_trees_all_equal_shapes_and_dtypes(state.inner_state, eager)
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.jit(static.init)(params).inner_state, eager)


def test_traced_min_dim_size_from_the_user_says_what_to_do():
    params, _ = _tree_problem()

    @jax.jit
    def init(size):
        return optim_zoo.adafactor(min_dim_size_to_factor=size).init(params)

    with pytest.raises(ValueError, match="min_dim_size_to_factor.*static_args"):
        init(jnp.asarray(2))


@_ALL
def test_tree_map_params(name, factory, kwargs):
    # optax's own battery: a no-op map over the state, and deriving one value per state leaf
    # that is like the params (as sharding specs are derived), the rest by transform_non_params.
    tx = factory(**kwargs)
    params, objective = _tree_problem()
    state = tx.init(params)
    _, state = tx.update(jax.grad(objective)(params), state, params)
    same = optax.tree_map_params(tx, lambda v: v, state)
    chex.assert_trees_all_equal(same, state)
    labels = jax.tree.map(lambda p: str(p.shape), params)
    mapped = optax.tree_map_params(
        tx,
        lambda leaf, label: str(leaf.shape) == label,
        state,
        labels,
        transform_non_params=lambda _: "other",
    )
    # Every state leaf like the params got its parameter's label (a factored statistic, with
    # an axis fewer, never does), and the rest went to transform_non_params.
    marks = jax.tree.leaves(mapped)
    assert set(marks) <= {True, "other"}, marks
    # Adafactor keeps its statistics per leaf (a PerLeaf field), so only its momentum is like
    # the params.
    assert (True in marks) == (not name.startswith("adafactor") or "momentum" in name), marks
