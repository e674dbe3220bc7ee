"""Every optimizer inside optax's wrappers, checked against an equivalent run without them.

`inject_hyperparams` (every float scheduled or injected, only Adafactor's shape-deciding
`min_dim_size_to_factor` static), `MultiSteps` with bfloat16 parameters, `weight_decay_mask`,
`multi_transform` with different optim_zoo optimizers per group (and the scope of Adai's global
mean there), `apply_if_finite` and `optax.contrib.reduce_on_plateau`.

A wrapped run and its unwrapped equivalent are different XLA programs, which may round
differently in the last bit; they are compared in float64, where a real difference in what is
computed shows up far above the 1e-12 tolerance.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_zoo
from fixtures import registry

# The six paper optimizers: the "ecosystem" family of fixtures/registry.py.
OPTIMIZER_IDS = registry.names("ecosystem")

NUM_STEPS = 4


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def _params(dtype=jnp.float64) -> dict:
    rng = np.random.default_rng(0)
    shapes = {"b": (16,), "w1": (8, 16), "w2": (16, 8)}
    return {k: jnp.asarray(0.5 * rng.standard_normal(s), dtype) for k, s in shapes.items()}


def _grads(params, t: int) -> dict:
    # A parameter-dependent gradient with a different offset per step.
    return jax.tree.map(lambda p: 0.5 * p + jnp.sin(0.7 * t + jnp.cos(p)).astype(p.dtype), params)


def _run(tx, params, grads_fn=_grads, num_steps=NUM_STEPS, **extra_args):
    @jax.jit
    def step(params, state, t):
        updates, state = tx.update(grads_fn(params, t), state, params, **extra_args)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for t in range(num_steps):
        params, state = step(params, state, t)
    return params, state


def _assert_same(actual, expected, rtol=1e-12, atol=1e-14) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    chex.assert_trees_all_equal_dtypes(actual, expected)
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def make_optimizer(name):
    return registry.make("ecosystem", name)


def _factory_and_kwargs(name):
    case = registry.get("ecosystem", name)
    return case.factory, case.kwargs


def _injected(name, **overrides):
    factory, kwargs = _factory_and_kwargs(name)
    kwargs = {**kwargs, **overrides}
    return optax.inject_hyperparams(factory)(**kwargs)


# inject_hyperparams


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_inject_hyperparams_equals_the_optimizer_with_array_hyperparameters(name):
    # Every numeric hyperparameter, defaults included, is injected as an array in the state; the
    # same arrays passed to the optimizer itself must give the same run.
    factory, kwargs = _factory_and_kwargs(name)
    injected = _injected(name)
    hyperparams = injected.init(_params()).hyperparams
    assert "learning_rate" in hyperparams
    if name == "adafactor":  # shape-deciding, and injected all the same
        assert "min_dim_size_to_factor" in hyperparams
    params, state = _run(injected, _params())
    expected_params, expected_state = _run(factory(**{**kwargs, **hyperparams}), _params())
    _assert_same(params, expected_params)
    _assert_same(state.inner_state, expected_state)


def test_inject_hyperparams_adafactor_momentum_with_the_default_dtype():
    # inject_hyperparams takes any callable argument for a schedule, so a default of the dtype
    # class jnp.float32 would arrive as jnp.float32(count), which some optax versions cast to the
    # parameters' bf16. The default is a dtype instance instead, which is passed through as is.
    tx = optax.inject_hyperparams(optim_zoo.adafactor)(
        learning_rate=1e-2, min_dim_size_to_factor=2, momentum=0.9
    )
    params, state = _run(tx, _params(jnp.bfloat16))
    chex.assert_trees_all_equal_dtypes(params, _params(jnp.bfloat16))
    (momentum,) = [s.ema for s in state.inner_state if isinstance(s, optax.EmaState)]
    assert {x.dtype for x in jax.tree.leaves(momentum)} == {jnp.dtype(jnp.float32)}


# Per optimizer: a float hyperparameter other than the learning rate, scheduled linearly from
# its first to its second value over 5 steps.
SCHEDULED = {
    "adan": ("b1", 0.98, 0.9),
    "adafactor": ("decay_rate", 0.8, 0.5),
    "apollo": ("beta", 0.9, 0.5),
    "adai": ("beta0", 0.1, 0.05),
    "adaiw": ("weight_decay", 1e-3, 1e-2),
    "came": ("b1", 0.9, 0.8),
}


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_inject_hyperparams_schedules_floats_under_jit_without_recompiling(name):
    _, kwargs = _factory_and_kwargs(name)
    learning_rate = optax.cosine_decay_schedule(kwargs["learning_rate"], 10)
    other, start, end = SCHEDULED[name]
    other_schedule = optax.linear_schedule(start, end, 5)
    tx = _injected(name, learning_rate=learning_rate, **{other: other_schedule})

    traces = []

    @jax.jit
    def step(params, state, t):
        traces.append(None)
        updates, state = tx.update(_grads(params, t), state, params)
        return optax.apply_updates(params, updates), state

    params = _params()
    state = tx.init(params)
    for t in range(NUM_STEPS):
        params, state = step(params, state, t)
        # The state records the values used at step t.
        np.testing.assert_allclose(state.hyperparams["learning_rate"], learning_rate(t))
        np.testing.assert_allclose(state.hyperparams[other], other_schedule(t), rtol=1e-6)
    assert len(traces) == 1
    chex.assert_tree_all_finite(params)


# Hyperparameters that, set to zero, make the next update zero: the learning rate, and where the
# step does not scale with it, Apollo's warmup start, Adafactor's momentum and decay.
ZERO_STEP = {
    "adafactor": ("learning_rate", "momentum", "weight_decay_rate"),
    "apollo": ("learning_rate", "init_lr"),
}


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_inject_hyperparams_takes_hand_set_values_without_recompiling(name):
    tx = _injected(name)
    traces = []

    @jax.jit
    def update(grads, state, params):
        traces.append(None)
        return tx.update(grads, state, params)

    params = _params()
    state = tx.init(params)
    updates, state = update(_grads(params, 0), state, params)
    params = optax.apply_updates(params, updates)
    for hyperparam in ZERO_STEP.get(name, ("learning_rate",)):
        state.hyperparams[hyperparam] = jnp.zeros_like(state.hyperparams[hyperparam])
    updates, _ = update(_grads(params, 1), state, params)
    chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
    assert len(traces) == 1


# Values exact in float32 and float64 alike, whatever dtype a code path evaluates them in.
EXACT_SCHEDULE = optax.piecewise_constant_schedule(2.0**-6, {2: 0.5})


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_injected_learning_rate_schedule_equals_a_schedule_argument(name):
    factory, kwargs = _factory_and_kwargs(name)
    overrides = {"learning_rate": EXACT_SCHEDULE}
    if name == "adafactor":
        # A float32 momentum times a Python float stays float32, times an injected float64
        # array it does not: keep the accumulator float64 so that only the schedule differs.
        overrides["dtype_momentum"] = jnp.dtype(jnp.float64)
    params, _ = _run(_injected(name, **overrides), _params())
    expected_params, _ = _run(factory(**{**kwargs, **overrides}), _params())
    _assert_same(params, expected_params)


# MultiSteps with bfloat16 parameters


def _dyadic_grads(params, t: int) -> dict:
    # Multiples of 1/8 in [-2, 2]: bfloat16 holds them and the mean of two exactly.
    def leaf(p):
        index = jnp.arange(p.size).reshape(p.shape)
        return (((index * 7 + 5 * t) % 33 - 16) / 8).astype(p.dtype)

    return jax.tree.map(leaf, params)


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_multi_steps_with_bfloat16_params(name):
    tx = make_optimizer(name)
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    params = _params(jnp.bfloat16)
    state = multi.init(params)
    init_dtypes = jax.tree.map(lambda x: x.dtype, state)

    update = jax.jit(multi.update)
    first, second = _dyadic_grads(params, 0), _dyadic_grads(params, 1)
    updates, state = update(first, state, params)
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, jnp.zeros_like(u)), updates)
    updates, state = update(second, state, params)
    multi_params = optax.apply_updates(params, updates)

    # One step of the optimizer itself on the (exact) mean gradient.
    mean = jax.tree.map(
        lambda a, b: ((a.astype(jnp.float32) + b) / 2).astype(a.dtype), first, second
    )
    inner_updates, inner_state = jax.jit(tx.update)(mean, tx.init(params), params)
    expected_params = optax.apply_updates(params, inner_updates)

    chex.assert_trees_all_equal_dtypes(multi_params, params)
    assert jax.tree.map(lambda x: x.dtype, state) == init_dtypes
    # The mean is exact, so the two updates differ at most by how XLA rounds two programs: one
    # bfloat16 rounding, relative to each leaf's largest step.
    for key, got in updates.items():
        want = np.asarray(inner_updates[key], np.float64)
        step = np.max(np.abs(want))
        np.testing.assert_allclose(
            np.asarray(got, np.float64), want, rtol=2**-8, atol=2**-8 * step, err_msg=key
        )
    # bfloat16 parameters (8 significant bits): within one unit in their last place of the
    # expected ones. Many steps are smaller than that unit (Adafactor's and Apollo's are about
    # 1e-3 on parameters of 0.5), so every leaf must also hold parameters that moved further.
    for key, p in multi_params.items():
        p0, want = np.asarray(params[key]), np.asarray(expected_params[key])
        ulp = np.abs(np.spacing(want)).astype(np.float64)
        want = want.astype(np.float64)
        within_one_ulp = bool(np.all(np.abs(np.asarray(p, np.float64) - want) <= ulp))
        moved_further = bool(np.any(np.abs(want - p0.astype(np.float64)) > ulp))
        assert within_one_ulp, f"{key}: more than one ulp from the inner step's parameters"
        assert moved_further, f"{key}: no parameter moved by more than one ulp"
    _assert_same(state.inner_opt_state, inner_state, rtol=1e-6, atol=1e-7)
    # Second-moment statistics are float32 even for bfloat16 parameters.
    dtypes = {x.dtype for x in jax.tree.leaves(state.inner_opt_state) if x.ndim > 0}
    assert jnp.dtype(jnp.float32) in dtypes


# weight_decay_mask


def _matrices_only(params):
    return {k: p.ndim > 1 for k, p in params.items()}


def _noise(params, t: int) -> dict:
    # Gradients that do not depend on the parameters: decay on one leaf then cannot reach
    # another leaf through its gradient (Adai's global mean would carry it to every leaf).
    def leaf(p):
        return jnp.sin(0.7 * t + 0.37 * jnp.arange(p.size).reshape(p.shape)).astype(p.dtype)

    return jax.tree.map(leaf, params)


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_weight_decay_mask(name):
    factory, kwargs = _factory_and_kwargs(name)
    decay_arg = "weight_decay_rate" if name == "adafactor" else "weight_decay"
    params = _params()
    masked_run = _run(factory(**kwargs, weight_decay_mask=_matrices_only), params, _noise)
    masked = masked_run[0]

    # A mask given as a tree is the same as one given as a callable.
    as_tree = factory(**kwargs, weight_decay_mask=_matrices_only(params))
    _assert_same(_run(as_tree, params, _noise), masked_run)

    decayed, _ = _run(factory(**kwargs), params, _noise)
    undecayed, _ = _run(factory(**{**kwargs, decay_arg: 0.0}), params, _noise)
    assert not np.allclose(decayed["b"], undecayed["b"])  # The decay matters at all.
    if name == "adai":
        # L2 decay enters the gradients, which Adai's global mean couples across leaves: the
        # masked run is Adai without decay on gradients that carry it on the matrices only.
        def noise_with_l2(params, t):
            noise = _noise(params, t)
            return {
                k: g + kwargs[decay_arg] * params[k] if params[k].ndim > 1 else g
                for k, g in noise.items()
            }

        expected, _ = _run(factory(**{**kwargs, decay_arg: 0.0}), params, noise_with_l2)
        _assert_same(masked, expected)
    else:
        # Decay outside the statistics: matrices follow the decayed run, the vector the other.
        _assert_same(masked["b"], undecayed["b"])
        matrices = ("w1", "w2")
        _assert_same({k: masked[k] for k in matrices}, {k: decayed[k] for k in matrices})


# multi_transform


# CAME on the matrices (both factored statistics), and on the vector alone (no instability).
GROUPS = [
    ("adafactor", "adan"),
    ("adai", "apollo"),
    ("adaiw", "adafactor"),
    ("came", "adai"),
    ("apollo", "came"),
]


@pytest.mark.parametrize(("for_matrices", "for_vectors"), GROUPS)
def test_multi_transform_with_optimizers_per_group(for_matrices, for_vectors):
    labels = {"b": "vectors", "w1": "matrices", "w2": "matrices"}
    tx = optax.multi_transform(
        {"matrices": make_optimizer(for_matrices), "vectors": make_optimizer(for_vectors)},
        labels,
    )
    params = _params()
    combined, _ = _run(tx, params)

    matrices = {k: v for k, v in params.items() if labels[k] == "matrices"}
    expected, _ = _run(make_optimizer(for_matrices), matrices)
    expected["b"] = _run(make_optimizer(for_vectors), {"b": params["b"]})[0]["b"]
    _assert_same(combined, expected)


def test_adai_global_mean_covers_only_its_group_under_multi_transform():
    labels = {"b": "vectors", "w1": "matrices", "w2": "matrices"}
    grouped = optax.multi_transform(
        {"matrices": optim_zoo.adai(0.1), "vectors": optim_zoo.adai(0.1)}, labels
    )
    params = _params()
    grouped_params, _ = _run(grouped, params)
    # Each group's mean is over its own leaves, exactly as separate optimizers...
    separate, _ = _run(optim_zoo.adai(0.1), {"w1": params["w1"], "w2": params["w2"]})
    separate["b"] = _run(optim_zoo.adai(0.1), {"b": params["b"]})[0]["b"]
    _assert_same(grouped_params, separate)
    # ...which is not one Adai over the whole model, whose mean spans every leaf.
    whole, _ = _run(optim_zoo.adai(0.1), params)
    assert not np.allclose(grouped_params["b"], whole["b"])


# apply_if_finite


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_apply_if_finite_skips_non_finite_steps(name):
    tx = make_optimizer(name)
    guarded = optax.apply_if_finite(tx, max_consecutive_errors=2)
    bad_steps = {1: np.nan, 3: np.inf}

    def grads(params, t):
        grads = _grads(params, t)
        w1 = grads["w1"]
        for bad_step, bad_value in bad_steps.items():
            w1 = jnp.where(t == bad_step, w1.at[0, 0].set(bad_value), w1)
        return {**grads, "w1": w1}

    params, state = _run(guarded, _params(), grads, num_steps=NUM_STEPS + len(bad_steps))
    assert int(state.total_notfinite) == len(bad_steps) and int(state.notfinite_count) == 0

    # The same run with the bad steps left out: good step i is step t = i + (bad steps <= t).
    def skipping(params, i):
        return _grads(params, i + (i >= 1) + (i >= 2))

    expected_params, expected_state = _run(tx, _params(), skipping)
    _assert_same(params, expected_params)
    _assert_same(state.inner_state, expected_state)


# optax.contrib.reduce_on_plateau


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
def test_reduce_on_plateau_scales_the_updates(name):
    tx = make_optimizer(name)
    plateau = optax.contrib.reduce_on_plateau(factor=0.5, patience=1, accumulation_size=1)
    chained = optax.chain(tx, plateau)
    params = _params()
    state = chained.init(params)
    inner_state = tx.init(params)
    update = jax.jit(chained.update)
    inner_update = jax.jit(tx.update)
    for t in range(NUM_STEPS):
        grads = _grads(params, t)
        # A loss that never improves: the scale halves after each `patience` steps.
        updates, state = update(grads, state, params, value=jnp.asarray(1.0))
        inner_updates, inner_state = inner_update(grads, inner_state, params)
        expected = jax.tree.map(lambda u, s=state[1].scale: s * u, inner_updates)
        _assert_same(updates, expected)
        _assert_same(state[0], inner_state)
        params = optax.apply_updates(params, updates)
    assert float(state[1].scale) < 1.0
