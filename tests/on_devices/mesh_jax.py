"""Every optimizer on a (2, 4) mesh of 8 host CPU devices, with JAX's own sharding.

Run by `tests/test_mesh.py` in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (see `fixtures/mesh.py` for why); run it
directly with that variable set. For both auto and explicit mesh axes and every optimizer:

* the sharded jitted run equals the single-device run;
* every full-size state leaf has its parameter's sharding, factored statistics have it minus the
  reduced axis (CAME's second moment and instability alike, over the last two axes), and no
  state leaf larger than a shard is replicated (after `init` and after jitted updates);
* the compiled update gathers no whole parameter; Adai's global mean and Apollo's per-tensor
  reductions are scalar all-reduces, Adan's update has no collective at all, and Adafactor's and
  CAME's only non-scalar all-reduces are their factored statistics;
* `tx.init` under `jax.jit` with `out_shardings` taken from `jax.eval_shape` gives that state;
* an Orbax checkpoint of the sharded state restores into a target with those shardings.

And Adai's update computed inside `jax.shard_map` with `axis_name`: equal to the jitted run,
its global mean one scalar all-reduce over all 8 devices; without `axis_name` it refuses. The
other per-tensor reductions (Apollo's, the factored means, the clips and the parameter scale)
refuse split leaves inside `shard_map` and run on replicated ones as under jit.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optim_zoo
from fixtures import registry
from fixtures.mesh import (
    NUM_HOST_DEVICES,
    all_reduce_group_sizes,
    hlo_collectives,
    opt_state_shardings,
    shard_mapped_update,
    update_step,
)

# The six paper optimizers and the sharded runs' additions: the "mesh_jax" family of
# fixtures/registry.py.
OPTIMIZER_IDS = registry.names("mesh_jax")


def make_optimizer(name):
    return registry.make("mesh_jax", name)


if jax.device_count() != NUM_HOST_DEVICES:
    pytest.skip(
        f"needs {NUM_HOST_DEVICES} devices: run through tests/test_mesh.py, or set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={NUM_HOST_DEVICES}",
        allow_module_level=True,
    )

MESH_SHAPE = (2, 4)
MESH_AXES = ("data", "model")
AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}

# A small model's parameters, every one sharded; `w3` is a stack of three matrices (a batch axis
# for Adafactor). Dimensions divide the mesh axes they are sharded over.
SHAPES = {"b1": (16,), "b2": (8,), "w1": (8, 16), "w2": (16, 8), "w3": (3, 8, 16)}
SPECS = {
    "b1": P("model"),
    "b2": P("data"),
    "w1": P("data", "model"),
    "w2": P("model", "data"),
    "w3": P(None, "data", "model"),
}
PARAM_NAMES = sorted(SHAPES)  # jax.tree.leaves order of a dict.
# Adafactor's (small_axis, large_axis) for each factored leaf: `v_row` drops the large axis,
# `v_col` the small one. Written out rather than computed, so the test checks the package.
FACTORED_AXES = {"w1": (0, 1), "w2": (1, 0), "w3": (1, 2)}
# CAME factors every leaf of rank >= 2 over its last two axes, whatever their sizes, both its
# second moment and its instability: `v_row` drops the last axis, `v_col` the second-to-last.
# For `w2` (16, 8) these are not the two largest axes' roles above.
LAST_TWO_AXES = {"w1": (0, 1), "w2": (0, 1), "w3": (1, 2)}
# The factored statistics CAME keeps, as (field names on the path, parameter): its second
# moment's and its instability's row and column of every matrix, each of which must be found.
CAME_STATISTICS = {
    (fields, k)
    for fields in (("v_row",), ("v_col",), ("instability", "v_row"), ("instability", "v_col"))
    for k in LAST_TWO_AXES
}
NUM_STEPS = 4


def _make_mesh(axis_type: str) -> jax.sharding.Mesh:
    return jax.make_mesh(MESH_SHAPE, MESH_AXES, axis_types=(AXIS_TYPES[axis_type],) * 2)


def _padded(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _initial_values() -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(0)
    params = {k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    noise = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(NUM_STEPS)
    ]
    return params, noise


def _step_fn(tx):
    def step(params, state, noise):
        # A gradient that depends on the parameters; elementwise, so any collective in the
        # compiled step comes from the optimizer.
        grads = jax.tree.map(lambda p, n: 0.5 * p + n, params, noise)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _factored_axes(name: str) -> dict[str, tuple[int, int]]:
    """The axes each factored leaf of optimizer `name` is factored over."""
    return LAST_TWO_AXES if name == "came" else FACTORED_AXES


def _expected_spec(path, leaf, factored_axes: dict[str, tuple[int, int]]) -> tuple:
    """The sharding a state leaf must have, from its path in the state tree."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if keys and keys[-1] in SPECS:  # A full-size leaf in a params-like subtree.
        return _padded(SPECS[keys[-1]], leaf.ndim)
    attrs = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    if attrs and attrs[-1] in ("v_row", "v_col", "v"):  # Per-leaf tuples of statistics.
        name = PARAM_NAMES[path[-1].idx]
        spec = list(_padded(SPECS[name], len(SHAPES[name])))
        if attrs[-1] != "v":
            small_axis, large_axis = factored_axes[name]
            del spec[large_axis if attrs[-1] == "v_row" else small_axis]
        return tuple(spec)
    assert leaf.ndim == 0, f"unexpected state leaf {jax.tree_util.keystr(path)} {leaf.shape}"
    return ()


def _shard_shape(name: str) -> tuple[int, ...]:
    """The per-device shape of parameter `name`."""
    sizes = dict(zip(MESH_AXES, MESH_SHAPE, strict=True))
    spec = _padded(SPECS[name], len(SHAPES[name]))
    return tuple(d // sizes[a] if a else d for d, a in zip(SHAPES[name], spec, strict=True))


def _smallest_shard_size() -> int:
    return min(math.prod(_shard_shape(k)) for k in SHAPES)


def _factored_statistics(state) -> set[tuple[tuple[str, ...], str]]:
    """(field names on the path, parameter) of every factored statistic in `state`."""
    found = set()
    for path, _ in jax.tree.leaves_with_path(state):
        attrs = tuple(k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey))
        if attrs and attrs[-1] in ("v_row", "v_col"):
            found.add((attrs, PARAM_NAMES[path[-1].idx]))
    return found


def _assert_state_sharded_like_params(name: str, state, mesh) -> None:
    smallest_shard = _smallest_shard_size()
    factored_axes = _factored_axes(name)
    for path, leaf in jax.tree.leaves_with_path(state):
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf.sharding, NamedSharding), (where, leaf.sharding)
        assert leaf.sharding.mesh.axis_names == mesh.axis_names, where
        actual = _padded(leaf.sharding.spec, leaf.ndim)
        assert actual == _expected_spec(path, leaf, factored_axes), (where, actual)
        if leaf.sharding.is_fully_replicated:
            assert leaf.size <= smallest_shard, f"{where} {leaf.shape} is replicated"
    if name == "came":
        # Both factored statistics of every matrix were among the leaves checked above.
        assert _factored_statistics(state) == CAME_STATISTICS, _factored_statistics(state)


def _largest_statistic_shard(factored_axes: dict[str, tuple[int, int]]) -> int:
    """The size of the largest per-device shard of a factored statistic."""
    return max(
        math.prod(d for i, d in enumerate(_shard_shape(k)) if i != axis)
        for k, axes in factored_axes.items()
        for axis in axes
    )


def _assert_collectives(name: str, hlo: str, mesh) -> None:
    collectives = hlo_collectives(hlo)
    smallest_param = min(math.prod(s) for s in SHAPES.values())
    for op, shapes in collectives:
        if op in ("all-gather", "all-to-all", "collective-permute"):
            for shape in shapes:  # Anything this large would be (most of) a whole parameter.
                assert math.prod(shape) < smallest_param, (op, shape, hlo)
    reduced = [shape for op, shapes in collectives if op == "all-reduce" for shape in shapes]
    if name == "adan":
        assert not collectives, collectives  # Every step of Adan is elementwise.
    elif name in ("adai", "adaiw", "apollo"):
        # Adai's global mean, Apollo's per-tensor sums, max and mean: scalars only.
        assert reduced, "expected the cross-device reductions to be all-reduces"
        assert all(shape == () for shape in reduced), reduced
        assert [op for op, _ in collectives if op != "all-reduce"] == [], collectives
    elif name == "adafactor":
        # Factored means of a sharded axis all-reduce one statistic's shard; the rest (clip,
        # parameter scale) are per-tensor scalars.
        largest_statistic_shard = _largest_statistic_shard(FACTORED_AXES)
        assert all(math.prod(shape) <= largest_statistic_shard for shape in reduced), reduced
    elif name == "came":
        # Factored means of a sharded axis (of the second moment and of the instability, both
        # over the last two axes) all-reduce one statistic's shard; the clip's RMS is a
        # per-tensor scalar. Nothing else crosses devices.
        largest_statistic_shard = _largest_statistic_shard(LAST_TWO_AXES)
        assert [op for op, _ in collectives if op != "all-reduce"] == [], collectives
        assert any(shape == () for shape in reduced), reduced
        assert any(shape != () for shape in reduced), reduced
        assert all(math.prod(shape) <= largest_statistic_shard for shape in reduced), reduced


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
@pytest.mark.parametrize("axis_type", sorted(AXIS_TYPES))
def test_sharded_run_matches_single_device(axis_type, name):
    tx = make_optimizer(name)
    values, noise = _initial_values()
    step = _step_fn(tx)

    single_params = jax.tree.map(jnp.asarray, values)
    single_state = tx.init(single_params)
    single_step = jax.jit(step)
    for n in noise:
        single_params, single_state = single_step(single_params, single_state, n)

    mesh = _make_mesh(axis_type)
    with jax.set_mesh(mesh):
        shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
        params = jax.device_put(values, shardings)
        state = tx.init(params)
        _assert_state_sharded_like_params(name, state, mesh)
        noise = [jax.device_put(n, shardings) for n in noise]
        compiled = jax.jit(step).lower(params, state, noise[0]).compile()
        _assert_collectives(name, compiled.as_text(), mesh)
        for n in noise:
            params, state = compiled(params, state, n)
        _assert_state_sharded_like_params(name, state, mesh)
        for k, p in params.items():
            assert _padded(p.sharding.spec, p.ndim) == _padded(SPECS[k], p.ndim), k

    chex.assert_trees_all_equal_dtypes(params, single_params)
    chex.assert_trees_all_equal_dtypes(state, single_state)
    # Sharded reductions add in another order: equal up to float32 rounding.
    chex.assert_trees_all_close(
        jax.device_get(params), jax.device_get(single_params), rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_close(
        jax.device_get(state), jax.device_get(single_state), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
@pytest.mark.parametrize("axis_type", sorted(AXIS_TYPES))
def test_jit_init_with_out_shardings_from_eval_shape(axis_type, name):
    tx = make_optimizer(name)
    values, _ = _initial_values()
    mesh = _make_mesh(axis_type)
    with jax.set_mesh(mesh):
        params = jax.device_put(values, {k: NamedSharding(mesh, s) for k, s in SPECS.items()})
        eager_state = tx.init(params)
        candidates = {"recipe": opt_state_shardings(tx, params)}
        if axis_type == "explicit":
            # Explicit axes are part of the types: `jax.eval_shape` gives the shardings directly.
            abstract_state = jax.eval_shape(tx.init, params)
            candidates["eval_shape"] = jax.tree.map(lambda s: s.sharding, abstract_state)
        for how, shardings in candidates.items():
            state = jax.jit(tx.init, out_shardings=shardings)(params)
            _assert_state_sharded_like_params(name, state, mesh)
            chex.assert_trees_all_equal(state, eager_state, custom_message=how)


@pytest.mark.parametrize("name", OPTIMIZER_IDS)
@pytest.mark.parametrize("axis_type", sorted(AXIS_TYPES))
def test_sharded_checkpoint_restores_with_its_shardings(tmp_path, axis_type, name):
    tx = make_optimizer(name)
    values, noise = _initial_values()
    mesh = _make_mesh(axis_type)
    with jax.set_mesh(mesh):
        shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
        params = jax.device_put(values, shardings)
        state = tx.init(params)
        params, state = jax.jit(_step_fn(tx))(params, state, jax.device_put(noise[0], shardings))
        saved = {"params": params, "opt_state": state}
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp_path / "ckpt", saved)

        # Targets with every sharding spelled out, as on another mesh one would give them.
        abstract_params = jax.tree.map(
            lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params
        )
        target = {
            "params": abstract_params,
            "opt_state": jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                jax.eval_shape(tx.init, params),
                opt_state_shardings(tx, params),
            ),
        }
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(tmp_path / "ckpt", target)
        _assert_state_sharded_like_params(name, restored["opt_state"], mesh)
        assert jax.tree.structure(restored) == jax.tree.structure(saved)
        jax.tree.map(np.testing.assert_array_equal, restored, saved)


# Adai inside jax.shard_map, with `axis_name`: the model's leaves plus one replicated on every
# device, so that leaves held by 1, 2, 4 and 8 devices each meet in the global mean.
SHARD_MAP_SHAPES = {**SHAPES, "r": (5,)}
SHARD_MAP_SPECS = {**SPECS, "r": P()}
ADAI_SHARD_MAP = {
    "adai": lambda **kw: optim_zoo.adai(0.1, weight_decay=1e-2, **kw),
    "adaiw": lambda **kw: optim_zoo.adaiw(0.1, weight_decay=1e-2, **kw),
}


def _shard_map_values(mesh) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(1)
    shardings = {k: NamedSharding(mesh, s) for k, s in SHARD_MAP_SPECS.items()}

    def put(scale):
        return {
            k: jax.device_put((scale * rng.standard_normal(s)).astype(np.float32), shardings[k])
            for k, s in SHARD_MAP_SHAPES.items()
        }

    return put(0.5), [put(1.0) for _ in range(NUM_STEPS)]


def _trained(update, tx, params, grads):
    state = tx.init(params)
    for g in grads:
        params, state = update(g, state, params)
    return params, state


@pytest.mark.parametrize("name", sorted(ADAI_SHARD_MAP))
def test_adai_in_shard_map_takes_its_mean_with_one_scalar_all_reduce(name):
    """The same run as under plain jit, its global mean one f32[] all-reduce over all 8."""
    mesh = _make_mesh("auto")
    params, grads = _shard_map_values(mesh)
    plain, manual = ADAI_SHARD_MAP[name](), ADAI_SHARD_MAP[name](axis_name=MESH_AXES)
    with jax.set_mesh(mesh):
        expected = _trained(jax.jit(update_step(plain)), plain, params, grads)
        update = shard_mapped_update(manual, mesh, SHARD_MAP_SPECS, manual.init(params))
        actual = _trained(update, manual, params, grads)
        hlo = update.lower(grads[0], manual.init(params), params).compile().as_text()
    assert hlo_collectives(hlo) == [("all-reduce", [()])], hlo_collectives(hlo)
    assert all_reduce_group_sizes(hlo) == [NUM_HOST_DEVICES]
    # The same sums, added in another order (per device, then across): float32 rounding, at
    # the tolerance of the sharded runs above.
    chex.assert_trees_all_close(
        jax.device_get(actual), jax.device_get(expected), rtol=1e-5, atol=1e-6
    )


def test_adai_in_shard_map_without_axis_name_refuses_a_per_device_mean():
    mesh = _make_mesh("auto")
    params, grads = _shard_map_values(mesh)
    tx = optim_zoo.adai(0.1)
    with jax.set_mesh(mesh):
        update = shard_mapped_update(tx, mesh, SHARD_MAP_SPECS, tx.init(params))
        with pytest.raises(ValueError, match=r"split over the shard_map axes \['data', 'model'\]"):
            update(grads[0], tx.init(params), params)


def test_adai_in_shard_map_with_an_unknown_axis_name():
    mesh = _make_mesh("auto")
    params, grads = _shard_map_values(mesh)
    tx = optim_zoo.adai(0.1, axis_name=("data", "batch"))
    with jax.set_mesh(mesh):
        update = shard_mapped_update(tx, mesh, SHARD_MAP_SPECS, tx.init(params))
        with pytest.raises(ValueError, match="axis_name 'batch' is not an axis"):
            update(grads[0], tx.init(params), params)


def test_adai_in_shard_map_with_no_axes_averages_each_device_own_shards():
    """`axis_name=()`: each device's update is Adai on its own shards alone.

    Only the leaves split over both axes: the others' results now differ between the devices
    that hold the same shard, which no out_specs can describe.
    """
    mesh = _make_mesh("auto")
    split = {k: s for k, s in SHARD_MAP_SPECS.items() if {"data", "model"} <= set(s)}
    params, grads = _shard_map_values(mesh)
    params, *grads = ({k: tree[k] for k in split} for tree in (params, *grads))
    tx = optim_zoo.adai(0.1, axis_name=())
    with jax.set_mesh(mesh):
        update = shard_mapped_update(tx, mesh, split, tx.init(params))
        trained, _ = _trained(update, tx, params, grads)
    device = mesh.devices.flat[0]

    def shard(x):
        return next(s.data for s in x.addressable_shards if s.device == device)

    local = jax.tree.map(lambda x: jnp.asarray(np.asarray(shard(x))), params)
    local_grads = [jax.tree.map(lambda x: jnp.asarray(np.asarray(shard(x))), g) for g in grads]
    plain = optim_zoo.adai(0.1)
    expected, _ = _trained(jax.jit(update_step(plain)), plain, local, local_grads)
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: np.asarray(shard(x)), trained),
        jax.device_get(expected),
        rtol=1e-6,
        atol=1e-7,
    )


# The other transforms take no axis_name. Inside shard_map a reduction over a leaf split over
# the mesh axes would see this device's shard alone, so each refuses, naming the reduction;
# with every leaf replicated, or with no reduction over a split leaf (Adan, elementwise), the
# update runs as under jit.
PER_TENSOR_REDUCTIONS = {
    "apollo": (lambda: optim_zoo.apollo(0.01, warmup=0), "the per-tensor sums"),
    "adafactor": (
        lambda: optim_zoo.adafactor(min_dim_size_to_factor=8),
        "the factored row and column means",
    ),
    # Adafactor's update clip and parameter scale, also on its leaves too small to factor.
    "clip_by_block_rms": (lambda: optim_zoo.clip_by_block_rms(1.0), "each leaf's RMS"),
    "scale_by_param_rms": (lambda: optim_zoo.scale_by_param_rms(), "each parameter's RMS"),
    "came": (lambda: optim_zoo.came(1e-3), "the factored row and column means"),
    "factored_adan": (
        lambda: optim_zoo.factored_adan(1e-3, min_dim_size_to_factor=8),
        "the factored row and column means",
    ),
    "factored_adai": (
        lambda: optim_zoo.factored_adai(0.1, min_dim_size_to_factor=8),
        "the factored row and column means",
    ),
    "adan_clipped": (lambda: optim_zoo.adan(1e-3, max_grad_norm=1.0), "the global norm"),
}
# Elementwise only: nothing to refuse, split leaves or not.
ELEMENTWISE = {"adan": lambda: optim_zoo.adan(1e-3)}


@pytest.mark.parametrize("name", sorted(PER_TENSOR_REDUCTIONS))
def test_per_tensor_reductions_in_shard_map_refuse_split_leaves(name):
    make, reduction = PER_TENSOR_REDUCTIONS[name]
    mesh = _make_mesh("auto")
    params, grads = _shard_map_values(mesh)
    tx = make()
    with jax.set_mesh(mesh):
        update = shard_mapped_update(tx, mesh, SHARD_MAP_SPECS, tx.init(params))
        with pytest.raises(ValueError, match=rf"split over the shard_map axes .*{reduction}"):
            update(grads[0], tx.init(params), params)


@pytest.mark.parametrize(
    ("name", "split"),
    [
        *((name, False) for name in sorted(PER_TENSOR_REDUCTIONS)),
        *((name, True) for name in sorted(ELEMENTWISE)),
    ],
)
def test_shard_map_runs_what_needs_no_whole_leaf(name, split):
    """Replicated leaves (or Adan's elementwise update on split ones): as under jit."""
    make = ELEMENTWISE[name] if split else PER_TENSOR_REDUCTIONS[name][0]
    mesh = _make_mesh("auto")
    params, grads = _shard_map_values(mesh)
    specs = SHARD_MAP_SPECS if split else {k: P() for k in SHARD_MAP_SPECS}
    tx = make()
    with jax.set_mesh(mesh):
        replicated = NamedSharding(mesh, P())
        if not split:
            params, *grads = (jax.device_put(t, replicated) for t in (params, *grads))
        expected = _trained(jax.jit(update_step(tx)), tx, params, grads)
        actual = _trained(shard_mapped_update(tx, mesh, specs, tx.init(params)), tx, params, grads)
    chex.assert_trees_all_close(
        jax.device_get(actual), jax.device_get(expected), rtol=1e-6, atol=1e-7
    )
