"""Every optimizer trained with `nnx.Optimizer` on a mesh, in one process or in two.

Run by `tests/test_multiprocess.py`, never collected by pytest itself. Two layouts of the same
8 host CPU devices, started together:

* ``processes``: two processes of 4 devices each, joined by `jax.distributed.initialize` (a
  local coordinator, gloo collectives), on a (2, 4) mesh whose "data" axis crosses the
  processes and whose "model" axis stays within each. Each process checks that it holds only
  its half of every leaf sharded over "data". Every optimizer trains `NUM_STEPS` steps; after
  `SAVE_AFTER`, all their states go into one Orbax checkpoint, each process writing its own
  shards. The checkpoint is then restored into the same layout and training resumed, both
  compared with the uninterrupted run shard by shard, bit for bit, in each process. Then
  ZeRO-1: the parameters replicated over "data" and the optimizer state split over it
  (`zero1_shardings`, as `tx.init`'s `out_shardings`), against the state laid out like the
  parameters: the bytes of state each process holds, and the step's collectives, go to
  `<out>/zero1.json`. Then, Adai's update inside `jax.shard_map` with `axis_name` against the
  jitted one: its collectives, and the difference, go to `<out>/adai_shard_map.json`.
* ``single``: one process of 8 devices. The reference run on the same (2, 4) mesh; then, once
  the two processes have saved, their checkpoint restored onto a (4, 2) mesh (the state
  resharded by the restore target) and training resumed there.

Last, in both layouts, 8-bit state (`EIGHT_BIT_LAYOUT`): kernels large enough for codes, one of them
split so that blocks of 64 elements straddle devices and the two processes, trained with plain
`jax.jit` (the shared model's leaves are too small to code).

Process 0 of each layout writes `<out>/<layout>.npz` (whole arrays, gathered, under
`<optimizer>/<stage>/<leaf path>`) and `<out>/<layout>.json` (the collectives of each compiled
update). Each update is compiled on its own, apart from the gradient, so that its HLO holds the
optimizer's collectives only (the model's sharded matmuls add their own).

    python -m tests.on_devices.multiprocess_nnx OUT single
    python -m tests.on_devices.multiprocess_nnx OUT processes \
        --coordinator 127.0.0.1:PORT --process-id I
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optim_zoo
from fixtures import registry
from fixtures.mesh import (
    NUM_HOST_DEVICES,
    NUM_PROCESSES,
    all_reduce_group_sizes,
    hlo_collectives,
    opt_state_shardings,
    shard_mapped_update,
    update_step,
)
from fixtures.sharded_nnx import MLP, SPECS, assert_sharded_like_params, batch

MESH_AXES = ("data", "model")
MESH_SHAPE = (NUM_PROCESSES, NUM_HOST_DEVICES // NUM_PROCESSES)  # "data" across processes.
RESHARDED_MESH_SHAPE = (4, 2)
NUM_STEPS = 4
SAVE_AFTER = 2
# Written by process 0 once the checkpoint is complete: the single process waits for it.
SAVED = "checkpoint_saved"
WAIT_FOR_CHECKPOINT = 600.0
# ZeRO-1 is shown on the optimizer with the most full-size state.
ZERO1_OPTIMIZER = "adan"
# 8-bit state, stochastically rounded, on (shape, spec): "a" splits its rows 8 ways, 40 elements
# on each device, so the block of elements 128 to 191 spans a device of each process; "w" keeps
# whole blocks (64 elements of a row on each "model" device).
EIGHT_BIT_LAYOUT = {
    "a": ((64, 320), P(None, ("data", "model"))),
    "w": ((64, 512), P("data", "model")),
}
EIGHT_BIT_OPTIMIZERS = {"adan": optim_zoo.adan, "came": optim_zoo.came}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("layout", choices=("processes", "single"))
    parser.add_argument("--coordinator")
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()
    cases = registry.select("multiprocess")
    if args.layout == "processes":
        # Before the backend starts: without gloo the CPU client has no cross-process collectives
        # and this must fail, not fall back.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            args.coordinator, num_processes=NUM_PROCESSES, process_id=args.process_id
        )
        assert jax.process_count() == NUM_PROCESSES, jax.process_count()
        arrays, collectives = _train_save_and_resume(cases, args.out)
        zero1 = _zero1(registry.get("multiprocess", ZERO1_OPTIMIZER))
        shard_map = _adai_in_shard_map()
        if jax.process_index() == 0:
            (args.out / "zero1.json").write_text(json.dumps(zero1, indent=1))
            (args.out / "adai_shard_map.json").write_text(json.dumps(shard_map, indent=1))
    else:
        assert jax.process_count() == 1, jax.process_count()
        arrays, collectives = _train_then_reshard(cases, args.out)
    arrays.update(_eight_bit())
    if jax.process_index() == 0:
        flat = {
            f"{name}/{stage}/{leaf}": value
            for name, stages in arrays.items()
            for stage, leaves in stages.items()
            for leaf, value in leaves.items()
        }
        np.savez(args.out / f"{args.layout}.npz", **flat)
        (args.out / f"{args.layout}.json").write_text(json.dumps(collectives, indent=1))


def _train_save_and_resume(cases, out: Path):
    """The two-process layout; returns its gathered states and its collectives."""
    mesh = _make_mesh(MESH_SHAPE)
    assert mesh.devices.size == jax.device_count() == NUM_HOST_DEVICES, jax.devices()
    for row, devices in enumerate(mesh.devices):  # Each row is one process's devices.
        assert {d.process_index for d in devices} == {row}, mesh.devices
    trainers = {case.name: _Trainer(case, mesh) for case in cases}
    _assert_each_process_holds_its_part(_states(trainers), mesh)
    for t in range(NUM_STEPS):
        if t == SAVE_AFTER:
            saved = _states(trainers)
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(out / "checkpoint", saved)
            multihost_utils.sync_global_devices("checkpoint saved")
            if jax.process_index() == 0:
                (out / SAVED).touch()
        for trainer in trainers.values():
            trainer.step(t)
    final = _states(trainers)
    for trainer in trainers.values():
        trainer.check_sharding()
    _assert_each_process_holds_its_part(final, mesh)

    # (a) Restored into the layout that saved it: bit for bit, and so is the resumed run.
    target = {name: trainer.restore_target() for name, trainer in trainers.items()}
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(out / "checkpoint", target)
    _assert_local_shards_equal(restored, saved)
    for name, trainer in trainers.items():
        trainer.load(restored[name])
        for t in range(SAVE_AFTER, NUM_STEPS):
            trainer.step(t)
    _assert_local_shards_equal(_states(trainers), final)

    arrays = {
        name: {"saved": _gathered(saved[name]), "final": _gathered(final[name])}
        for name in trainers
    }
    arrays["model"] = {"first_gradient": _first_gradient(trainers)}
    return arrays, {name: trainer.collectives for name, trainer in trainers.items()}


def _train_then_reshard(cases, out: Path):
    """The single-process layout; returns its gathered states and its collectives."""
    mesh = _make_mesh(MESH_SHAPE)
    assert mesh.devices.size == jax.device_count() == NUM_HOST_DEVICES, jax.devices()
    trainers = {case.name: _Trainer(case, mesh) for case in cases}
    for t in range(NUM_STEPS):
        for trainer in trainers.values():
            trainer.step(t)
    for trainer in trainers.values():
        trainer.check_sharding()
    arrays = {name: {"final": _gathered(trainer.state())} for name, trainer in trainers.items()}
    arrays["model"] = {"first_gradient": _first_gradient(trainers)}
    collectives = {name: trainer.collectives for name, trainer in trainers.items()}

    # (b) The two processes' checkpoint, restored onto another mesh shape and resumed there.
    # The updates compile while the two processes still train.
    resharded = _make_mesh(RESHARDED_MESH_SHAPE)
    trainers = {case.name: _Trainer(case, resharded) for case in cases}
    target = {name: trainer.restore_target() for name, trainer in trainers.items()}
    deadline = time.monotonic() + WAIT_FOR_CHECKPOINT
    while not (out / SAVED).exists():
        assert time.monotonic() < deadline, "the two processes saved no checkpoint"
        time.sleep(0.1)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(out / "checkpoint", target)
    for name, trainer in trainers.items():
        trainer.load(restored[name])
        trainer.check_sharding()
        arrays[name]["restored"] = _gathered(trainer.state())
        for t in range(SAVE_AFTER, NUM_STEPS):
            trainer.step(t)
        trainer.check_sharding()
        arrays[name]["resumed"] = _gathered(trainer.state())
    return arrays, collectives


def _make_mesh(shape) -> jax.sharding.Mesh:
    # Auto axes: XLA decides how the sharded matmuls and the optimizers' reductions communicate.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _create(case):
    """The sharded model and its optimizer, on the mesh in context."""
    model = MLP(nnx.Rngs(0))
    return model, nnx.Optimizer(model, case.make(), wrt=nnx.Param)


def _batch(t: int, mesh):
    """Step `t`'s batch, split over "data": each process makes only its own rows."""
    sharding = NamedSharding(mesh, P("data"))
    return tuple(
        jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
        for a in map(np.asarray, batch(t))
    )


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@functools.partial(jax.jit, static_argnums=0)
def _grads(model_def, params, x, y):
    return nnx.grad(_loss)(nnx.merge(model_def, params), x, y)


def _update(model_def, optimizer_def, params, opt_state, grads):
    model = nnx.merge(model_def, params)
    optimizer = nnx.merge(optimizer_def, opt_state)
    optimizer.update(model, grads)
    return nnx.state(model), nnx.state(optimizer)


class _Trainer:
    """One optimizer's model and optimizer state on one mesh, and its compiled update."""

    def __init__(self, case, mesh):
        self.case, self.mesh = case, mesh
        with jax.set_mesh(mesh):
            model, optimizer = _create(case)
            assert_sharded_like_params(case.name, model, optimizer)
            self.model_def, self.params = nnx.split(model)
            self.optimizer_def, self.opt_state = nnx.split(optimizer)
            # The gradient at the initial parameters, for the update's input types (and as a
            # record of what the model alone computes: no optimizer yet).
            self.first_grads = _grads(self.model_def, self.params, *_batch(0, mesh))
            update = functools.partial(_update, self.model_def, self.optimizer_def)
            self.update = (
                jax.jit(update).lower(self.params, self.opt_state, self.first_grads).compile()
            )
        self.collectives = hlo_collectives(self.update.as_text())

    def step(self, t: int) -> None:
        with jax.set_mesh(self.mesh):
            grads = _grads(self.model_def, self.params, *_batch(t, self.mesh))
            self.params, self.opt_state = self.update(self.params, self.opt_state, grads)

    def state(self) -> dict:
        return {"model": self.params, "optimizer": self.opt_state}

    def load(self, state) -> None:
        self.params, self.opt_state = state["model"], state["optimizer"]

    def restore_target(self):
        return _restore_target(self.case, self.mesh)

    def check_sharding(self) -> None:
        model = nnx.merge(self.model_def, self.params)
        optimizer = nnx.merge(self.optimizer_def, self.opt_state)
        assert_sharded_like_params(self.case.name, model, optimizer)


def _zero1(case) -> dict:
    """ZeRO-1: parameters replicated over "data", the optimizer state split over it.

    Plain optax on the model's parameter shapes, with a gradient that is elementwise in the
    parameters; trains `NUM_STEPS` steps with the state laid out like the parameters and with
    `zero1_shardings`. Returns the state's bytes this process holds in each layout, and the
    collectives of the ZeRO-1 step.
    """
    mesh = _make_mesh(MESH_SHAPE)
    tx = case.make()
    specs = {
        key: P(*(None if axis == "data" else axis for axis in spec))
        for key, spec in _plain_specs().items()
    }
    with jax.set_mesh(mesh):
        shardings = {k: NamedSharding(mesh, spec) for k, spec in specs.items()}
        params, *noise = _plain_values(shardings)
        like_params = opt_state_shardings(tx, params)
        split = zero1_shardings(tx, params, "data")

        def step(params, state, noise):
            grads = jax.tree.map(lambda p, n: 0.5 * p + n, params, noise)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        results, held, collectives = {}, {}, None
        for layout, state_shardings in (("like_params", like_params), ("zero1", split)):
            state = jax.jit(tx.init, out_shardings=state_shardings)(params)
            compiled = (
                jax.jit(step, out_shardings=(shardings, state_shardings))
                .lower(params, state, noise[0])
                .compile()
            )
            trained = params
            for n in noise:
                trained, state = compiled(trained, state, n)
            held[layout] = sum(
                shard.data.nbytes
                for leaf in jax.tree.leaves(state)
                for shard in leaf.addressable_shards
            )
            results[layout] = {"params": trained, "opt_state": state}
            collectives = hlo_collectives(compiled.as_text())
    # The same elementwise arithmetic in either layout, but on other per-device shapes, for
    # which XLA generates other code: equal up to float32 rounding (the trained parameters,
    # on the shards this process holds).
    difference = _max_local_difference(results["zero1"]["params"], results["like_params"]["params"])
    return {
        "optimizer": case.name,
        "state_bytes_held": held,
        "max_difference": difference,
        "collectives": collectives,
    }


def _adai_in_shard_map() -> dict:
    """Adai's update inside `jax.shard_map` with `axis_name`, against the jitted update.

    The model's shapes and shardings, as plain arrays, with a gradient that is elementwise in
    the parameters (as in `_zero1`). Returns the collectives of the shard_map'd update, the
    number of devices each of its all-reduces spans, and the largest difference of the trained
    parameters (on this process's shards) from the jitted run's.
    """
    mesh = _make_mesh(MESH_SHAPE)
    specs = _plain_specs()
    plain, manual = optim_zoo.adai(0.1), optim_zoo.adai(0.1, axis_name=MESH_AXES)
    with jax.set_mesh(mesh):
        params, *noise = _plain_values({k: NamedSharding(mesh, s) for k, s in specs.items()})
        runs = {}
        for name, tx in (("jit", plain), ("shard_map", manual)):
            state = tx.init(params)
            if name == "jit":
                update = jax.jit(update_step(tx))
            else:
                update = shard_mapped_update(tx, mesh, specs, state)
            grads = jax.tree.map(lambda p, n: 0.5 * p + n, params, noise[0])
            compiled = update.lower(grads, state, params).compile()
            trained = params
            for n in noise:
                grads = jax.tree.map(lambda p, n: 0.5 * p + n, trained, n)
                trained, state = compiled(grads, state, trained)
            runs[name] = (trained, compiled.as_text())
    difference = _max_local_difference(runs["shard_map"][0], runs["jit"][0])
    hlo = runs["shard_map"][1]
    return {
        "collectives": hlo_collectives(hlo),
        "group_sizes": all_reduce_group_sizes(hlo),
        "jit_collectives": hlo_collectives(runs["jit"][1]),
        "max_difference": difference,
    }


def _eight_bit() -> dict:
    """{"<optimizer>_8bit": {"final": leaves}}: the parameters and the state after
    `NUM_STEPS` jitted steps of each `EIGHT_BIT_OPTIMIZERS` with `registry.EIGHT_BIT` state
    on `EIGHT_BIT_LAYOUT`,
    gathered; the gradient is elementwise in the parameters (as in `_zero1`)."""
    mesh = _make_mesh(MESH_SHAPE)
    rng = np.random.default_rng(0)
    arrays = {}
    with jax.set_mesh(mesh):
        values = {
            k: rng.standard_normal(shape).astype(np.float32)
            for k, (shape, _) in EIGHT_BIT_LAYOUT.items()
        }
        initial = {
            k: jax.make_array_from_callback(
                v.shape, NamedSharding(mesh, EIGHT_BIT_LAYOUT[k][1]), v.__getitem__
            )
            for k, v in values.items()
        }
        for name, make in EIGHT_BIT_OPTIMIZERS.items():
            tx = make(1e-2, **registry.EIGHT_BIT)
            step = jax.jit(update_step(tx))
            params, state = initial, tx.init(initial)
            for _ in range(NUM_STEPS):
                params, state = step(jax.tree.map(lambda p: 0.5 * p + 0.1, params), state, params)
            leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optim_zoo.CodedState))
            assert any(isinstance(x, optim_zoo.CodedState) for x in leaves), name
            arrays[f"{name}_8bit"] = {"final": _gathered({"params": params, "state": state})}
    return arrays


def _max_local_difference(actual: dict, expected: dict) -> float:
    """Max |difference| of two dicts of arrays on this process's shards, each pair asserted
    equal up to float32 rounding (1e-6)."""
    difference = 0.0
    for key, leaf in actual.items():
        for mine, theirs in zip(
            leaf.addressable_shards, expected[key].addressable_shards, strict=True
        ):
            np.testing.assert_allclose(mine.data, theirs.data, rtol=1e-6, atol=1e-6)
            difference = max(difference, float(np.max(np.abs(mine.data - theirs.data))))
    return difference


def _plain_specs() -> dict:
    """The model's parameter shardings, keyed "layer/name"."""
    return {"/".join(key): spec for key, spec in SPECS.items()}


def _plain_values(shardings) -> list[dict]:
    """Parameters then `NUM_STEPS` noise trees of the model's shapes, as `shardings` says.

    The same in every process; each makes only the shards it holds.
    """
    shapes = {"l1/bias": (16,), "l1/kernel": (8, 16), "l2/bias": (8,), "l2/kernel": (16, 8)}
    rng = np.random.default_rng(0)
    values = [
        {k: rng.standard_normal(shape).astype(np.float32) for k, shape in shapes.items()}
        for _ in range(NUM_STEPS + 1)
    ]
    return [
        {
            k: jax.make_array_from_callback(v.shape, shardings[k], v.__getitem__)
            for k, v in d.items()
        }
        for d in values
    ]


def zero1_shardings(tx, params, axis: str):
    """Shardings for `tx.init(params)` that split each state leaf over mesh `axis` as well.

    The recipe of docs/ecosystem.md: a leaf not yet split over `axis` gets it on its first
    unsharded dimension that divides by the axis size.
    """
    mesh = jax.tree.leaves(params)[0].sharding.mesh

    def split(abstract, sharding):
        spec = list(sharding.spec) + [None] * (abstract.ndim - len(sharding.spec))
        if axis in jax.tree.leaves(spec):  # Already split over `axis`.
            return sharding
        for i, (dim, entry) in enumerate(zip(abstract.shape, spec, strict=True)):
            if entry is None and dim % mesh.shape[axis] == 0:
                spec[i] = axis
                return NamedSharding(mesh, P(*spec))
        return sharding  # Scalars and leaves with no divisible dimension keep their layout.

    return jax.tree.map(split, jax.eval_shape(tx.init, params), opt_state_shardings(tx, params))


def _restore_target(case, mesh):
    """Shapes, dtypes and shardings on `mesh` of the saved state: nothing is computed.

    With explicit axes the shardings are part of the abstract values `nnx.eval_shape` gives, so
    the model and the optimizer are traced over an explicit copy of `mesh`, and each leaf gets
    that sharding on `mesh` itself.
    """
    explicit = jax.sharding.Mesh(
        mesh.devices, mesh.axis_names, axis_types=(AxisType.Explicit,) * len(mesh.axis_names)
    )
    with jax.set_mesh(explicit):
        abstract_model, abstract_optimizer = nnx.eval_shape(lambda: _create(case))
    abstract = {"model": nnx.state(abstract_model), "optimizer": nnx.state(abstract_optimizer)}
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=NamedSharding(mesh, a.sharding.spec if a.sharding else P())
        ),
        abstract,
    )


def _first_gradient(trainers) -> dict:
    """The gradient every trainer started from (the same model, the same batch), gathered."""
    first, *others = trainers.values()
    for trainer in others:
        _assert_local_shards_equal(trainer.first_grads, first.first_grads)
    return _gathered(first.first_grads)


def _states(trainers) -> dict:
    return {name: trainer.state() for name, trainer in trainers.items()}


def _flat(states) -> dict:
    """{leaf path: array} of a tree of arrays and `nnx.State`s."""
    pure = jax.tree.map(
        lambda x: nnx.to_pure_dict(x) if isinstance(x, nnx.State) else x,
        states,
        is_leaf=lambda x: isinstance(x, nnx.State),
    )
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree.leaves_with_path(pure)}


def _gathered(state) -> dict:
    """Every leaf as a whole NumPy array, in every process (a collective: all must call it)."""
    flat = _flat(state)
    gathered = multihost_utils.process_allgather(list(flat.values()), tiled=True)
    return dict(zip(flat, gathered, strict=True))


def _assert_local_shards_equal(actual, expected) -> None:
    """Bit for bit, on the shards this process holds: nothing is gathered."""
    actual, expected = _flat(actual), _flat(expected)
    assert actual.keys() == expected.keys()
    for key, leaf in actual.items():
        assert leaf.sharding == expected[key].sharding, key
        for mine, theirs in zip(
            leaf.addressable_shards, expected[key].addressable_shards, strict=True
        ):
            assert mine.index == theirs.index, key
            np.testing.assert_array_equal(mine.data, theirs.data, err_msg=key)


def _assert_each_process_holds_its_part(state, mesh) -> None:
    """This process holds exactly 1/2 of every leaf sharded over "data", and no more.

    The two processes split "data"; a leaf sharded over "model" alone is split over this
    process's own 4 devices, and scalars are replicated.
    """
    for key, leaf in _flat(state).items():
        held = np.zeros(leaf.shape, bool)
        for shard in leaf.addressable_shards:
            held[shard.index] = True
        axes = {a for entry in leaf.sharding.spec for a in _as_tuple(entry)}
        expected = leaf.size // mesh.shape["data"] if "data" in axes else leaf.size
        assert held.sum() == expected, (key, leaf.sharding.spec, int(held.sum()))
        if axes:  # No device holds a whole sharded leaf.
            assert all(s.data.size < leaf.size for s in leaf.addressable_shards), key


def _as_tuple(entry) -> tuple:
    if entry is None:
        return ()
    return entry if isinstance(entry, tuple) else (entry,)


if __name__ == "__main__":
    main()
