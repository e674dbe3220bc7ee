"""8-bit optimizer state on a (2, 4) mesh of 8 host CPU devices, with JAX's own sharding.

Run by `tests/test_mesh.py` in a subprocess (see `tests/on_devices/mesh_jax.py`). For auto and
explicit mesh axes: each coded field's codes have its parameter's sharding and its scales the
parameter's spec (the blocked last axis is shorter, not gone), after `init` and after jitted
updates with stochastic rounding; and (auto axes) the sharded run equals the single-device run
to float32 rounding. Layouts whose shards of the last axis are not whole blocks, with JAX's
sharding, in NNX and with Linen's logical names. And a Flax NNX model whose kernel is coded:
`nnx.Optimizer` holds the codes and the scales with the kernel's sharding, trained under
`nnx.jit`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optim_zoo
from fixtures.mesh import NUM_HOST_DEVICES

if jax.device_count() != NUM_HOST_DEVICES:
    pytest.skip(f"needs {NUM_HOST_DEVICES} devices", allow_module_level=True)

# Each scale covers 64 elements of the last axis: 256 / 4 devices = 64 per shard, one block.
SHAPES = {"b": (8192,), "w": (64, 256)}
SPECS = {"b": P("model"), "w": P("data", "model")}


def _make(params_on, axis_type):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in params_on.items()}


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_coded_state_shards_like_its_parameter(axis_type):
    rng = np.random.default_rng(0)
    values = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    tx = optim_zoo.adan(
        1e-2, dtype_momentum=jnp.int8, dtype_second_moment=jnp.uint8, state_rounding="stochastic"
    )

    def step(params, state):
        updates, state = tx.update(jax.tree.map(lambda p: 0.5 * p + 0.1, params), state, params)
        return optax.apply_updates(params, updates), state

    def run(params):
        state = tx.init(params)
        for _ in range(2):
            params, state = jax.jit(step)(params, state)
        return params, state

    params = _make(values, axis_type)
    mesh = params["w"].sharding.mesh

    def check(state):
        coded = 0
        for field in ("m", "v", "n", "prev_grad"):
            for k, x in getattr(state[0], field).items():
                assert isinstance(x, optim_zoo.CodedState), (field, k)
                assert x.codes.sharding.is_equivalent_to(params[k].sharding, len(SHAPES[k]))
                expected = NamedSharding(mesh, SPECS[k])
                assert x.scales.sharding.is_equivalent_to(expected, len(SHAPES[k])), (field, k)
                coded += 1
        assert coded == 8

    with jax.set_mesh(mesh):
        check(tx.init(params))
        sharded_params, sharded_state = run(params)
        check(sharded_state)
    if axis_type == AxisType.Explicit:
        return  # the layout; the values are compared once, with auto axes
    single = run(jax.tree.map(jnp.asarray, values))
    _assert_like_single_device((sharded_params, sharded_state), single, scales_rtol=1e-5)


def _is_coded(x):
    return isinstance(x, optim_zoo.CodedState)


def _assert_like_single_device(sharded, single, scales_rtol):
    """A sharded run's (params, state) equals the single-device run's up to the last bit of the
    float32 arithmetic (XLA fuses, and contracts products into sums, per shard): a value that
    falls that close to the middle between two grid points may take the other one, one code
    apart. `scales_rtol`: where blocks straddle devices, their maxima are computed per shard."""
    sharded, single = jax.device_get((sharded, single))
    leaves = [jax.tree.leaves(run[1], is_leaf=_is_coded) for run in (single, sharded)]
    for a, b in zip(*leaves, strict=True):
        if not _is_coded(a):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
            continue
        np.testing.assert_allclose(np.asarray(a.scales), np.asarray(b.scales), rtol=scales_rtol)
        apart = np.abs(np.asarray(a.codes, np.int32) - np.asarray(b.codes, np.int32))
        assert apart.max() <= 1 and apart.mean() < 1e-3, (apart.max(), apart.mean())
    for k in single[0]:  # the step reads the state as stored: a code apart moves a parameter
        np.testing.assert_allclose(sharded[0][k], single[0][k], rtol=1e-5, atol=1e-5)


def _two_steps(tx, params):
    """(params, state) after `tx.init` and two jitted steps on gradients ``0.5 p + 0.1``."""
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.tree.map(lambda x: 0.5 * x + 0.1, p), s, p))
    for _ in range(2):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    return params, state


# Shards that are not whole blocks: 200 / 4 = 50 elements of a row on each "model" device, and
# 256 / 8 = 32 on each of the 8 devices; the first axis split alone keeps whole blocks.
STRADDLING = {"a": ((64, 200), P(None, "model")), "c": ((64, 256), P(None, ("data", "model")))}
ROWS_ONLY = {"r": ((4096, 72), P(("data", "model"), None))}


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("name", ["adan", "came"])
def test_blocks_that_straddle_devices(name, axis_type):
    # A block may not fit in one device's shard of the last axis. The codes keep the
    # parameter's sharding; the scales keep the other axes' and hold the last axis whole (with
    # auto axes XLA may lay out the updated scales otherwise: checked after init); the run
    # equals the single-device one, a code apart at most.
    layout = {**STRADDLING, **ROWS_ONLY}
    rng = np.random.default_rng(1)
    values = {k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in layout.items()}
    make = {"adan": optim_zoo.adan, "came": optim_zoo.came}[name]
    tx = make(1e-2, dtype_momentum=jnp.int8, dtype_second_moment=jnp.uint8)

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):
        params = {
            k: jax.device_put(values[k], NamedSharding(mesh, spec))
            for k, (_, spec) in layout.items()
        }
        sharded = _two_steps(tx, params)
        checks = [(sharded[1], axis_type == AxisType.Explicit)]  # (state, check its scales)
        if axis_type == AxisType.Auto:
            checks.append((tx.init(params), True))
        for state, check_scales in checks:
            coded = [x for x in jax.tree.leaves(state, is_leaf=_is_coded) if _is_coded(x)]
            assert len(coded) == 3 * (4 if name == "adan" else 1)
            for x in coded:
                key = next(k for k, (shape, _) in layout.items() if shape == x.codes.shape)
                spec = layout[key][1]
                assert x.codes.sharding.is_equivalent_to(NamedSharding(mesh, spec), 2), key
                whole = P(spec[0], None) if key in STRADDLING else spec
                if check_scales:
                    assert x.scales.sharding.is_equivalent_to(NamedSharding(mesh, whole), 2), key
    single = _two_steps(tx, {k: jnp.asarray(v) for k, v in values.items()})
    _assert_like_single_device(sharded, single, scales_rtol=1e-4)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("name", ["apollo", "adai"])
def test_sums_over_sharded_codes(name, axis_type):
    # Apollo's per-tensor sums and Adai's global mean read coded fields of leaves split over
    # the mesh, straddling blocks included: the run equals the single-device one, a code apart
    # at most.
    layout = {**STRADDLING, **ROWS_ONLY, "w": ((64, 256), P("data", "model"))}
    rng = np.random.default_rng(3)
    values = {k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in layout.items()}
    make = {"apollo": optim_zoo.apollo, "adai": optim_zoo.adai}[name]
    tx = make(1e-2, dtype_momentum=jnp.int8, dtype_second_moment=jnp.uint8)

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):
        sharded = _two_steps(
            tx,
            {
                k: jax.device_put(values[k], NamedSharding(mesh, spec))
                for k, (_, spec) in layout.items()
            },
        )
    single = _two_steps(tx, {k: jnp.asarray(v) for k, v in values.items()})
    _assert_like_single_device(sharded, single, scales_rtol=1e-4)


@pytest.mark.parametrize("name", ["adan", "came"])
def test_explicit_axes_outside_a_mesh_context(name):
    # Arrays on a mesh with explicit axes, and no jax.set_mesh: init (eagerly, and under
    # jax.eval_shape) and a jitted step work as optax's do, and give what they give inside the
    # context. Before, the zeros of a factored statistic or of a coded field's scales took the
    # type's abstract mesh and the straddling blocks' gather a bare spec, which JAX refuses
    # outside a context. Float32 state (CAME's is factored) and 8-bit state.
    rng = np.random.default_rng(2)
    values = {
        k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in STRADDLING.items()
    }
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    params = {
        k: jax.device_put(values[k], NamedSharding(mesh, spec))
        for k, (_, spec) in STRADDLING.items()
    }
    grads = jax.tree.map(lambda x: 0.5 * x + 0.1, params)
    make = {"adan": optim_zoo.adan, "came": optim_zoo.came}[name]
    for kwargs in ({}, {"dtype_momentum": jnp.int8, "dtype_second_moment": jnp.uint8}):
        tx = make(1e-2, **kwargs)

        def run(tx):
            abstract = jax.eval_shape(tx.init, params)
            state = tx.init(params)
            assert jax.tree.structure(abstract) == jax.tree.structure(state)
            return jax.jit(tx.update)(grads, state, params)

        outside = run(tx)
        with jax.set_mesh(mesh):
            inside = run(tx)
        chex.assert_trees_all_equal(outside, inside)
        assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(outside[0])), kwargs


@pytest.mark.parametrize(
    "name,coded_fields,leaf_sized", [("adan", 4, 0), ("apollo", 3, 1)], ids=["adan", "apollo"]
)
def test_explicit_axes_keep_only_the_blocks_maxima(name, coded_fields, leaf_sized):
    # With explicit mesh axes each device computes its blocks' maxima, and its part of a sum
    # over codes, with a reducer of its own (_fusion.finite_block_max, coded_sum): an eighth of
    # a shard per coded field (Apollo also writes its direction, as on one device). Before, and
    # still with auto axes (the sharding is the compiler's), the plain maximum and sums wrote
    # every coded field's new value out whole: for four leaves, Adan 12.3 shards of
    # temporaries (here 0.57), Apollo 12.1 (4.07).
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    sharding = NamedSharding(mesh, P("data", "model"))
    leaves, shard_bytes = 4, 128 * 128 * 4
    params = {
        f"w{i}": jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=sharding)
        for i in range(leaves)
    }
    make = {"adan": optim_zoo.adan, "apollo": optim_zoo.apollo}[name]
    tx = make(1e-3, dtype_momentum=jnp.int8, dtype_second_moment=jnp.uint8)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    with jax.set_mesh(mesh):
        state = jax.eval_shape(tx.init, params)
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    bound = (leaf_sized + 1.2 * coded_fields / 8) * leaves * shard_bytes
    assert temporaries <= bound, temporaries / shard_bytes


class _Model(nnx.Module):
    """One 64 x 256 kernel sharded (data, model), large enough for codes, and a small bias."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model"))
        self.kernel = nnx.Param(init(rngs.params(), (64, 256)))
        self.bias = nnx.Param(jnp.zeros((256,)))

    def __call__(self, x):
        return x @ self.kernel[...] + self.bias[...]


@pytest.mark.parametrize("name", ["adan", "came"])
def test_nnx_optimizer_holds_sharded_codes(name):
    # nnx.Optimizer maps each state leaf's sharding from its parameter: a coded field's codes
    # keep the kernel's, and its scales the kernel's spec; the bias is too small to code.
    make = {"adan": optim_zoo.adan, "came": optim_zoo.came}[name]
    tx = make(1e-2, dtype_momentum=jnp.int8, dtype_second_moment=jnp.uint8)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)

    with jax.set_mesh(mesh):
        model = _Model(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        x = jnp.sin(jnp.arange(8 * 64.0).reshape(8, 64))
        for t in range(3):
            train_step(model, optimizer, x, jnp.cos(x[:, :1] * (t + 1)) * jnp.ones((8, 256)))
        state = nnx.to_pure_dict(nnx.state(optimizer))
    # NNX holds a CodedState's codes and scales as two variables, each mapped from the kernel.
    kernel = [
        x
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if "kernel" in jax.tree_util.keystr(path) and x.ndim == 2
    ]
    codes = [x for x in kernel if x.dtype in (jnp.int8, jnp.uint8)]
    scales = [x for x in kernel if x.shape == (64, 256 // 64)]
    # Adan: m, v, n and the previous gradient of the kernel; CAME: its momentum (its factored
    # statistics are vectors, and the bias is too small to code).
    assert len(codes) == len(scales) == (4 if name == "adan" else 1), (len(codes), len(scales))
    for x in (*codes, *scales):
        assert isinstance(x.sharding, NamedSharding)
        assert tuple(x.sharding.spec) == ("data", "model"), x.sharding.spec
    assert np.all(np.isfinite(np.asarray(model.kernel[...])))


@pytest.mark.parametrize(
    "axis_type,logical",
    [(AxisType.Auto, False), (AxisType.Explicit, False), (AxisType.Auto, True)],
    ids=["auto", "explicit", "auto-logical"],
)
def test_nnx_scales_of_blocks_that_straddle_devices(axis_type, logical):
    # A 64 x 320 kernel split (data, model): 80 elements of a row on each "model" device, so
    # blocks straddle devices. The scales' variables name no mesh axis for the last axis (NNX
    # would otherwise split its 5 blocks 4 ways and fail); the codes keep the kernel's names.
    # The names may also be logical ones, with the variable's sharding rules.
    tx = optim_zoo.adan(1e-2, dtype_momentum=jnp.int8, dtype_second_moment=jnp.uint8)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    names, rules = ("data", "model"), None
    if logical:
        names, rules = ("embed", "mlp"), (("embed", "data"), ("mlp", "model"))

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            initializer = nnx.initializers.lecun_normal()
            init = nnx.with_partitioning(initializer, names, sharding_rules=rules)
            self.kernel = nnx.Param(init(rngs.params(), (64, 320)))

        def __call__(self, x):
            return x @ self.kernel[...]

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    with jax.set_mesh(mesh):
        model = Model(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        x = jnp.sin(jnp.arange(8 * 64.0).reshape(8, 64))
        y = jnp.cos(x[:, :1]) * jnp.ones((8, 320))
        losses = [float(train_step(model, optimizer, x, y)) for _ in range(5)]
        state = nnx.to_pure_dict(nnx.state(optimizer))
    arrays = [x for x in jax.tree.leaves(state) if x.ndim == 2]
    codes = [x for x in arrays if x.dtype in (jnp.int8, jnp.uint8)]
    scales = [x for x in arrays if x.shape == (64, 5)]
    assert len(codes) == len(scales) == 4
    for x in codes:
        assert tuple(x.sharding.spec) == ("data", "model"), x.sharding.spec
    for x in scales:
        assert tuple(x.sharding.spec)[:2] in (("data", None), ("data",)), x.sharding.spec
    assert losses[-1] < losses[0] and np.all(np.isfinite(np.asarray(model.kernel[...])))


class _LogicalModel(nn.Module):
    """Two kernels with Linen logical names: "a" 64 x 320 (80 elements of a row on each "model"
    device: blocks straddle devices) and "w" 64 x 256 (64 on each: whole blocks)."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        names = ("embed", "mlp")
        a = self.param("a", nn.with_logical_partitioning(init, names), (64, 320))
        w = self.param("w", nn.with_logical_partitioning(init, names), (64, 256))
        return jnp.tanh(x @ a).sum(-1) + jnp.tanh(x @ w).sum(-1)


def test_linen_logical_names_of_blocks_that_straddle_devices():
    # Linen's logical recipe: the state traced under the rules and the mesh, its logical specs
    # mapped to the mesh by the rules, built and trained under jax.jit with those shardings.
    # The straddling kernel's scales name no axis for the last one (the rules would split its
    # 5 blocks 4 ways, which jax.jit refuses); the other kernel's keep the kernel's names. The
    # run equals the single-device one, a code apart at most.
    model = _LogicalModel()
    tx = optim_zoo.adan(1e-2, dtype_momentum=jnp.int8, dtype_second_moment=jnp.uint8)
    rules = (("embed", "data"), ("mlp", "model"))
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    x = jnp.sin(jnp.arange(8 * 64.0).reshape(8, 64))

    def create(key):
        params = model.init(key, x)["params"]
        return params, tx.init(params)

    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(create, jax.random.key(0))
        scales = {
            k: v.scales.names
            for k, v in abstract[1][0].m.items()  # Adan's momentum
        }
        assert scales == {"a": ("embed", None), "w": ("embed", "mlp")}, scales
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
        params, state = jax.jit(create, out_shardings=shardings)(jax.random.key(0))
        bare = nn.unbox(jax.device_get(params))
        train = jax.jit(step, in_shardings=shardings, out_shardings=shardings)
        for _ in range(3):
            params, state = train(params, state)
    sharded = nn.unbox((params, state))
    coded = [c for c in jax.tree.leaves(sharded[1], is_leaf=_is_coded) if _is_coded(c)]
    assert len(coded) == 2 * 4  # m, v, n and the previous gradient of each kernel
    for c in coded:
        assert tuple(c.codes.sharding.spec) == ("data", "model"), c.codes.sharding.spec
    single = (bare, tx.init(bare))
    for _ in range(3):
        single = jax.jit(step)(*single)
    _assert_like_single_device(sharded, single, scales_rtol=1e-4)


def test_shard_map_needs_whole_blocks_in_each_shard():
    # Inside shard_map a transform sees each device's shard: 320 / 8 = 40 elements of a row,
    # with the scales whole. Refused with the reason, not decoded with another block's scales.
    tx = optim_zoo.adan(1e-2, dtype_momentum=jnp.int8, dtype_second_moment=jnp.uint8)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    split = P(None, ("data", "model"))
    with jax.set_mesh(mesh):
        params = jax.device_put(np.ones((64, 320), np.float32), NamedSharding(mesh, split))
        state = tx.init(params)
        specs = jax.tree.map(lambda x: x.sharding.spec, state)
        step = jax.shard_map(
            lambda g, s, p: tx.update(g, s, p),
            in_specs=(split, specs, split),
            out_specs=(split, specs),
            check_vma=False,
        )
        with pytest.raises(ValueError, match="must hold whole blocks"):
            jax.jit(step)(0.1 * params, state, params)
