"""Time per optimizer step of every optim_zoo optimizer and its peers, next to the memory floor.

An optimizer step reads every parameter, gradient and state leaf and writes back the parameters
and the state. Its floor on any device is those bytes over the memory bandwidth. This script
measures that bandwidth first (a jitted, donated in-place update of one large buffer), then times
one jitted, donated ``update`` + ``apply_updates`` step of each JAX optimizer and one
``optimizer.step()`` of each PyTorch peer. Each row is timed in ten short rounds over
the rows of its group (an algorithm family with its variants and peers: median of repeated runs
after warm-up in each round; the row keeps its best round), so that load elsewhere on the
machine does not single out one row, and rows that are compared run side by side: an option
is compared with its original round by round (the median of the rounds' ratios), and then
again step by step: the two rows' steps interleaved, one each per pair in a random order, the
median of the pairs' ratios with its 95% interval (``benchmarks/speed/paired.py``; ``--pairs``,
default 100, at most ``--pair-budget`` 10 s a comparison: by the step times above, some 8
more minutes on 2 CPU cores, not yet measured; none in the quick run unless asked). The trees
(on the CPU the first three, on a GPU ``185M`` and ``30M``; ``--trees`` chooses):

* ``30M``: a transformer-shaped tree of 29.4M parameters (d_model 512, 8 layers, vocab 8192);
* ``5M``: a transformer-shaped tree of 5.8M parameters (d_model 256, 6 layers, vocab 4096);
* ``1000x1k``: 1,000 leaves of 1,000 parameters each (per-leaf overhead);
* ``185M``: a transformer-shaped tree of 184.7M parameters (d_model 1024, 12 layers, vocab
  32768), whose arrays no GPU cache holds.

When JAX's default backend is a GPU, the PyTorch peers run on it too (CUDA), and each of their
steps is waited for like a JAX step.

Per row it reports ms per step, the bytes a single pass moves, the single-pass floor, the floor
of the fewest passes the algorithm's reductions force (``traffic.ALGORITHMS``;
docs/performance.md derives them), time over floor, optimizer state bytes per parameter byte,
compile time and, for JAX rows, what XLA made of the step (fused kernels per leaf, temporary
buffer bytes).

Besides the published algorithms (each with its peers in optax and PyTorch), the same run times
optim_zoo's own combinations with a factored second moment, ``factored_adan`` and
``factored_adai`` (``Factored AdaiW``: ``decoupled=True``), at the hyperparameters of Adan,
Adai and AdaiW, and every optim_zoo optimizer again with its state in bfloat16
(``optim_zoo [bf16 state]``: ``dtype_momentum`` and ``dtype_second_moment`` bfloat16, float32
parameters). Their bytes come from the state they allocate. They have no peers and no targets.

    python benchmarks/speed/step_time.py             # full run: 13 minutes on 2 CPU cores when
                                                     # rows had two long rounds (the 30M tree's
                                                     # rows take 7% longer in ten short ones)
    python benchmarks/speed/step_time.py --quick     # smoke run, 2.5 minutes on 2 cores (tests')
    python benchmarks/speed/step_time.py --no-torch  # JAX rows only
    python benchmarks/speed/step_time.py --only adan # rows whose algorithm (or a word of it),
                                                     # library or variant matches: adan,
                                                     # factored, bf16, optax

Three modes time every optim_zoo optimizer (and its bf16-state row, unless ``--no-bf16``) step
by step against another arm and write ``<mode>.{json,md}`` instead of the run above (on the
CPU the 30M tree, on a GPU the 185M one, unless ``--trees``):

    python benchmarks/speed/step_time.py --against-ref main  # today's package against the one
                                                             # at a git ref (speed/reference.py)
    python benchmarks/speed/step_time.py --steering both     # compiler steering on / off
    python benchmarks/speed/step_time.py --noise-check       # a step, and a same-bytes pass,
                                                             # each against itself: the
                                                             # method's own noise

PyTorch peers (``pip install -e '.[torch]'``, plus ``pip install --no-deps timm==1.0.31``) are
optional: a peer that cannot be imported is recorded with the reason and skipped. Results go to
``benchmarks/results/step_time.{json,md,png}``. What is timed, at which hyperparameters, is
``contenders.implementations``; the bytes each step moves are counted by
``benchmarks/common/traffic.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optim_zoo
from benchmarks.common import report
from benchmarks.common.contenders import (
    BF16_STATE,
    COMPARISONS,
    DECAY_OF_VARIANT,
    TIMING_FAMILY,
    Implementation,
    implementations,
    import_error,
)
from benchmarks.common.environment import (
    COMPILER_OPTIONS,
    RESULTS_DIR,
    git_state,
    load_average,
    machine_info,
)
from benchmarks.common.traffic import (
    ALGORITHMS,
    StateItemsizes,
    single_pass_bytes,
    state_itemsizes,
    traffic,
    tree_bytes,
)
from benchmarks.speed import paired
from benchmarks.speed.reference import package_at
from benchmarks.speed.step_report import (
    check_targets,
    comparisons_table,
    markdown_report,
    markdown_table,
    paired_markdown,
    paired_table,
    plot,
    row_name,
    variant_comparisons,
)

DEFAULT_OUT_DIR = RESULTS_DIR

# --- Trees -------------------------------------------------------------------------------------


def transformer_shapes(d_model: int, layers: int, vocab: int, ff_mult: int = 4) -> dict:
    """Leaf shapes of a pre-LayerNorm transformer: embedding, then per layer attention and MLP."""
    ff = ff_mult * d_model

    def dense(n_in, n_out):
        return {"w": (n_in, n_out), "b": (n_out,)}

    def norm():
        return {"scale": (d_model,), "bias": (d_model,)}

    tree: dict[str, Any] = {"embed": (vocab, d_model), "final_norm": norm()}
    for i in range(layers):
        tree[f"layer_{i}"] = {
            "attn_norm": norm(),
            "qkv": dense(d_model, 3 * d_model),
            "attn_out": dense(d_model, d_model),
            "mlp_norm": norm(),
            "mlp_in": dense(d_model, ff),
            "mlp_out": dense(ff, d_model),
        }
    return tree


def many_leaves_shapes(num_leaves: int, leaf_size: int) -> dict:
    return {f"leaf_{i:04d}": (leaf_size,) for i in range(num_leaves)}


TREES: dict[str, Callable[[], dict]] = {
    "30M": lambda: transformer_shapes(512, 8, 8192),
    "5M": lambda: transformer_shapes(256, 6, 4096),
    "1000x1k": lambda: many_leaves_shapes(1000, 1000),
    # A GPU's last-level cache (60 MB on an H200) holds half of one of the 30M tree's arrays;
    # this tree's (740 MB each) it does not, so device memory alone sets its floor.
    "185M": lambda: transformer_shapes(1024, 12, 32768),
}
# The trees a run times unless `--trees` says otherwise, by JAX's default backend. A GPU run
# leaves out the 1,000-leaf tree: compiling its 40 JAX programs for the GPU takes most of the
# run, and per-leaf overhead is measured on the CPU.
DEFAULT_TREES = {"cpu": ("30M", "5M", "1000x1k"), "gpu": ("185M", "30M")}
QUICK_TREES: dict[str, Callable[[], dict]] = {
    # A 128 x 128 head: the one factored leaf (traffic.MIN_DIM_SIZE_TO_FACTOR), still small enough
    # that PyTorch keeps every tensor op on one thread.
    "tiny": lambda: {**transformer_shapes(32, 1, 64), "head": (128, 128)},
    "10x100": lambda: many_leaves_shapes(10, 100),
}
HEADLINE_TREE = {"cpu": "30M", "gpu": "185M"}
MANY_LEAVES_TREES = ("1000x1k", "10x100")  # the full run's and the quick run's


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple)


def leaf_shapes(shapes: dict) -> list[tuple[int, ...]]:
    return jax.tree.leaves(shapes, is_leaf=_is_shape)


def make_arrays(shapes: dict, dtype: Any, seed: int = 0) -> tuple[Any, Any]:
    """Parameters ~ N(0, 0.02^2) and gradients ~ N(0, 1e-3^2), as NumPy trees."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    params = [(0.02 * rng.standard_normal(s, np.float32)).astype(dtype) for s in leaves]
    grads = [(1e-3 * rng.standard_normal(s, np.float32)).astype(dtype) for s in leaves]
    return treedef.unflatten(params), treedef.unflatten(grads)


# --- Measurement -------------------------------------------------------------------------------


def _median_time(fn: Callable[[], Any], warmup: int, min_reps: int, budget_s: float) -> dict:
    """Runs `fn` `warmup` times, then at least `min_reps` times or until `budget_s` is spent."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "reps": len(times),
    }


def stream_bandwidth(num_elements: int, warmup: int, reps: int) -> float:
    """Bytes per second of a jitted, donated in-place update x <- a*x + b of a large buffer."""
    update = jax.jit(lambda x: x * 0.999 + 0.001, donate_argnums=0)
    box = [jnp.ones((num_elements,), jnp.float32)]

    def run():
        box[0] = update(box[0])
        box[0].block_until_ready()

    timing = _median_time(run, warmup, reps, 0.0)
    return 2 * box[0].nbytes / timing["median_s"]


# Opcodes that launch no kernel of their own: structure, aliasing, and the calls whose bodies
# are counted instead.
_NO_KERNEL = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "opt-barrier",
    "after-all",
    "add-dependency",
    "domain",
    "partition-id",
    "replica-id",
    "call",
    "while",
    "conditional",
    "async-start",
    "async-update",
    "async-done",
    "copy-done",
}
_CALLERS = {"call", "while", "conditional", "async-start"}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9_\-]*)\((.*)$")
_CALLEE = re.compile(
    r"(?:to_apply|body|condition|calls|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def count_kernels(hlo_text: str) -> dict[str, int]:
    """Kernels of an optimized HLO module, by opcode: the instructions that run as kernels of
    their own (fusions, custom calls, copies, unfused ops) in the entry computation and in
    the computations it runs in sequence (calls, such as a GPU command buffer; loops;
    branches). Fusion bodies and reducers are not sequences: a fusion is one kernel."""
    computations: dict[str, list[tuple[str, str]]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        if not line[:1].isspace():
            header = _HEADER.match(line)
            current = header.group(2) if header else None
            if header:
                computations[current] = []
                if header.group(1):
                    entry = current
            continue
        instruction = _INSTRUCTION.match(line) if current is not None else None
        if instruction:
            computations[current].append((instruction.group(1), instruction.group(2)))
    counts: dict[str, int] = {}
    seen: set[str] = set()
    stack = [entry] if entry is not None else []
    while stack:
        name = stack.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for opcode, rest in computations[name]:
            if opcode in _CALLERS:
                stack += _CALLEE.findall(rest)
                for branches in _BRANCHES.findall(rest):
                    stack += [b.strip().lstrip("%") for b in branches.split(",") if b.strip()]
            if opcode not in _NO_KERNEL:
                counts[opcode] = counts.get(opcode, 0) + 1
    return counts


def hlo_digest(hlo_text: str) -> str:
    """A hash of the optimized program without its source locations: two steps with the same
    digest run the same kernels on the same buffers, whichever Python code traced them."""
    lines = []
    started = False
    for line in hlo_text.splitlines():
        started = started or bool(_HEADER.match(line))
        if started:
            lines.append(re.sub(r",? metadata=\{[^{}]*\}", "", line))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _hlo_stats(compiled: Any, num_leaves: int) -> dict:
    """Kernels per leaf (fusions and copies in the entry computation, and every kernel
    `count_kernels` finds), temporary bytes, and the bytes XLA's cost model says the compiled
    step reads and writes (each kernel's operands and outputs; a kernel that re-reads an
    array counts it again)."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY") :]
    fusions = len(re.findall(r" fusion\(", entry))
    copies = len(re.findall(r" copy\(", entry))
    kernels = count_kernels(text)
    try:
        temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # memory_analysis is best effort on some backends
        temp_bytes = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        xla_bytes = float(cost["bytes accessed"])
    except Exception:  # so is the cost model
        xla_bytes = None
    return {
        "fusions_per_leaf": fusions / num_leaves,
        "copies": copies,
        "kernels_per_leaf": sum(kernels.values()) / num_leaves,
        "kernels": kernels,
        "hlo_digest": hlo_digest(text),
        "temp_bytes": temp_bytes,
        "xla_bytes": xla_bytes,
    }


# --- The package's compiler steering -------------------------------------------------------------

STEERING = {"on": True, "off": False, "default": None}


def compiler_steering(setting: str | None) -> contextlib.AbstractContextManager:
    """The package's switch set to `setting` (``on``, ``off``, ``default``: the backend's
    choice); nothing for None. It acts when an update is traced, so a step must be built,
    traced and compiled inside it."""
    if setting is None:
        return contextlib.nullcontext()
    return optim_zoo.compiler_steering(STEERING[setting])


# --- Compiled steps ------------------------------------------------------------------------------


def compile_step(
    tx: optax.GradientTransformation,
    params: Any,
    state: Any,
    grads: Any,
    compiler_options: dict[str, Any] | None = None,
) -> tuple[Any, float]:
    """`tx`'s update and `apply_updates` as one jitted step, parameters and state donated,
    compiled (with XLA's `compiler_options`); and its compile time. The step is a new function
    on every call, so that it is traced anew (jit caches traces per function)."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads)
    compiled = lowered.compile(compiler_options)
    return compiled, time.perf_counter() - t0


def step_runner(compiled: Any, box: list, grads: Any) -> Callable[[], None]:
    """One step of `compiled` on `box` ([params, state], replaced by the outputs), waited for."""

    def run():
        box[0], box[1] = compiled(box[0], box[1], grads)
        jax.block_until_ready(box)

    return run


def prepare_jax_copies(
    contender: Implementation,
    params_np: Any,
    grads_np: Any,
    compiler_options: dict[str, Any] | None = None,
    steering: str | None = None,
    copies: int = 1,
) -> tuple[list[Callable], Callable]:
    """Compiles the donated step (built, traced and compiled under the package's `steering`
    setting, `compiler_steering`); returns a `run` (one step) for each of `copies` sets of
    parameters and state, all running the one compiled program, and `finish` (the row's
    facts, from the first set)."""
    grads = jax.tree.map(jnp.asarray, grads_np)
    with compiler_steering(steering):
        tx = contender.make()
        boxes = []
        for _ in range(copies):
            params = jax.tree.map(jnp.asarray, params_np)
            boxes.append([params, tx.init(params)])
        compiled, compile_s = compile_step(tx, *boxes[0], grads, compiler_options)
    params, state = boxes[0]
    hlo = _hlo_stats(compiled, len(jax.tree.leaves(params)))
    state_bytes = tree_bytes(state)
    itemsize = jax.tree.leaves(params)[0].dtype.itemsize
    itemsizes = dataclasses.asdict(state_itemsizes(state, itemsize))
    runs = [step_runner(compiled, box, grads) for box in boxes]
    del params, state

    def finish():
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(boxes[0][0]))
        return {
            "compile_s": compile_s,
            "state_bytes": state_bytes,
            "state_itemsizes": itemsizes,
            "finite": finite,
            **hlo,
        }

    return runs, finish


def prepare_jax(
    contender: Implementation,
    params_np: Any,
    grads_np: Any,
    compiler_options: dict[str, Any] | None = None,
    steering: str | None = None,
) -> tuple[Callable, Callable]:
    """Compiles the donated step (with XLA's `compiler_options`, default none; under the
    package's `steering` setting); returns `run` (one step) and `finish` (the row's facts)."""
    runs, finish = prepare_jax_copies(contender, params_np, grads_np, compiler_options, steering)
    return runs[0], finish


def same_bytes_pass(
    shapes: Sequence[tuple[int, ...]],
    dtype: Any,
    state_arrays: int,
    compiler_options: dict[str, Any] | None = None,
    copies: int = 1,
) -> tuple[list[Callable], int, Any]:
    """A donated elementwise pass that moves the single-pass bytes of an optimizer whose state
    is `state_arrays` arrays of the parameters' shapes: per leaf it reads a gradient and
    1 + `state_arrays` arrays and writes the latter in place, (3 + 2 k) parameter bytes in
    all, with no reduction. Returns a `run` for each of `copies` sets of arrays (one compiled
    program), the bytes a step moves, and the compiled program."""
    writes = 1 + state_arrays

    def step(xs, grads):
        out = []
        for leaf, g in zip(xs, grads, strict=True):
            out.append([leaf[0] * 0.999 + 0.001 * g] + [x * 0.999 + 0.001 for x in leaf[1:]])
        return out

    grads = [jnp.full(shape, 0.5, dtype) for shape in shapes]
    # Every array its own buffer: the donated outputs are written in place into them.
    boxes = [
        [[[jnp.ones(shape, dtype) for _ in range(writes)] for shape in shapes]]
        for _ in range(copies)
    ]
    compiled = jax.jit(step, donate_argnums=0).lower(boxes[0][0], grads).compile(compiler_options)

    def runner(box):
        def run():
            box[0] = compiled(box[0], grads)
            jax.block_until_ready(box[0])

        return run

    itemsize = jnp.dtype(dtype).itemsize
    moved = sum(math.prod(shape) for shape in shapes) * itemsize * (2 * writes + 1)
    return [runner(box) for box in boxes], moved, compiled


def torch_device() -> str:
    """Where the PyTorch peers run: on the GPU when JAX's rows run on one, else on the CPU."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def prepare_torch(
    contender: Implementation, params_np: Any, grads_np: Any
) -> tuple[Callable, Callable]:
    """Builds the optimizer on float32 copies on `torch_device()`; returns `run` (one step,
    waited for) and `finish`."""
    import torch

    device = torch_device()
    torch.set_num_threads(os.cpu_count() or 1)
    params = []
    for p, g in zip(jax.tree.leaves(params_np), jax.tree.leaves(grads_np), strict=True):
        tensor = torch.nn.Parameter(torch.from_numpy(np.array(p, np.float32)).to(device))
        tensor.grad = torch.from_numpy(np.array(g, np.float32)).to(device)
        params.append(tensor)
    optimizer = contender.make(params)

    def run():
        with torch.no_grad():
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    def finish():
        state_bytes = sum(
            v.numel() * v.element_size()
            for state in optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v)
        )
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        return {"compile_s": None, "state_bytes": state_bytes, "finite": finite}

    return run, finish


def paced_overhead(row: dict, bandwidth: float) -> dict:
    """The row's overhead over its single-pass floor against the pace's (AdamW's) in the same
    round: the median of the rounds' ratios and its quartiles."""
    pace = row["pace"]
    pace_floor_s = single_pass_bytes(row["param_bytes"], pace["state_bytes"]) / bandwidth
    floor_s = row["bytes_single"] / bandwidth
    ratios = [
        max(t - floor_s, 0.0) / max(p - pace_floor_s, 1e-9)
        for t, p in zip(row["round_medians_s"], pace["round_medians_s"], strict=True)
    ]
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return {"ratio": float(median), "quartiles": [float(q1), float(q3)]}


def timing_groups(contenders: Sequence[Implementation]) -> list[list[Implementation]]:
    """The contenders in groups timed together: each algorithm family (`TIMING_FAMILY`) with
    its variants and peers, in the order of `contenders`.

    Rows compared with each other (a variant and its original, an implementation and its peers)
    share a group, so they are timed side by side; only one group's arrays and compiled steps
    are alive at a time, which bounds the memory of a run with many variant rows.
    """
    groups: dict[str, list[Implementation]] = {}
    for contender in contenders:
        family = TIMING_FAMILY.get(contender.algorithm, contender.algorithm)
        groups.setdefault(family, []).append(contender)
    return list(groups.values())


def time_group(
    group: Sequence[Implementation],
    tree: tuple[str, int, int, Any, Any],
    dtype: Any,
    rounds: int,
    timing: dict[str, Any],
    compiler_options: dict[str, Any] | None = None,
    pace: Implementation | None = None,
    steering: str | None = None,
    pairs: int = 0,
    pair_budget_s: float | None = None,
) -> list[dict]:
    """Builds and times every contender of `group` on `tree` (JAX's compiled with
    `compiler_options`, under the package's `steering` setting); returns their rows.

    `pace`, a JAX implementation, is timed in every round too, before the group's rows; each
    row keeps its round medians and state bytes under ``"pace"``, so that a row can be compared
    with it round by round (the per-leaf overhead against optax's AdamW).

    With `pairs`, every comparison of `contenders.COMPARISONS` whose two rows are in the group
    is timed again step by step, the two interleaved (`paired.interleave`, at most
    `pair_budget_s` seconds each): the row keeps the ratio and its interval under
    ``"paired"``, by the name of the row it was compared with.
    """
    tree_name, num_params, num_leaves, params_np, grads_np = tree
    rows = []
    prepared = []  # (row, name, run, finish) for every contender that could be built
    for contender in group:
        row: dict[str, Any] = {
            "tree": tree_name,
            "algorithm": contender.algorithm,
            "library": contender.library,
            "variant": contender.variant,
            "note": contender.note,
            "num_params": num_params,
            "num_leaves": num_leaves,
        }
        rows.append(row)
        reason = import_error(contender)
        if reason is None and contender.framework == "torch" and dtype != np.float32:
            reason = "float32 only"
        if reason is None:
            try:
                if contender.framework == "jax":
                    run, finish = prepare_jax(
                        contender, params_np, grads_np, compiler_options, steering
                    )
                else:
                    run, finish = prepare_torch(contender, params_np, grads_np)
                run()  # A peer that fails at run time is recorded, not fatal.
            except Exception as e:
                if contender.framework == "jax":
                    raise
                reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            row["skipped"] = reason
            print(f"  {contender.name:40s} skipped: {reason}", flush=True)
            continue
        prepared.append((row, contender.name, run, finish))
    paced = None
    if pace is not None:
        pace_run, pace_finish = prepare_jax(pace, params_np, grads_np, compiler_options, steering)
        pace_run()
        paced = {"round_medians_s": []}
    # Rounds over the group's rows, so that a burst of load elsewhere on the machine hits one
    # round of every row rather than every round of one row; each row keeps its best round's
    # median, and rows compared with each other are compared round by round.
    for round_index in range(rounds):
        if paced is not None:
            paced["round_medians_s"].append(_median_time(pace_run, **timing)["median_s"])
        for row, name, run, _ in prepared:
            result = _median_time(run, **timing)
            row.setdefault("round_medians_s", []).append(result["median_s"])
            row["reps"] = row.get("reps", 0) + result["reps"]
            row["min_s"] = min(row.get("min_s", np.inf), result["min_s"])
            row["max_s"] = max(row.get("max_s", 0.0), result["max_s"])
            if round_index == rounds - 1:
                row["median_s"] = min(row["round_medians_s"])
                row["ms_per_step"] = 1e3 * row["median_s"]
                print(f"  {name:40s} {row['ms_per_step']:9.2f} ms", flush=True)
    if pairs:
        _time_pairs(prepared, pairs, pair_budget_s)
    for row, _, _, finish in prepared:
        row.update(finish())
    if paced is not None:
        paced["state_bytes"] = pace_finish()["state_bytes"]
        for row, _, _, _ in prepared:
            row["pace"] = paced
    return rows


def _time_pairs(prepared: list, pairs: int, budget_s: float | None) -> None:
    """Each comparison (`COMPARISONS`) among the prepared optim_zoo rows, step by step."""
    by_key = {
        (row["algorithm"], row["variant"]): (row, run)
        for row, _, run, _ in prepared
        if row["library"] == "optim_zoo"
    }
    for subject, reference_key, _ in COMPARISONS:
        if subject not in by_key or reference_key not in by_key:
            continue
        (row, run), (_, reference_run) = by_key[subject], by_key[reference_key]
        runs = {"row": run, "reference": reference_run}
        reps = paired.calibrate_reps(runs, PAIR_SAMPLE_S)
        times = paired.interleave(runs, samples=pairs, reps=reps, budget_s=budget_s)
        found = paired.compare(times["row"], times["reference"])
        found["reps"] = reps
        row.setdefault("paired", {})[row_name(reference_key)] = found
        ratio = paired.format_ratio(found)
        print(f"  {row_name(subject):40s} / {row_name(reference_key)}: {ratio}")


# A paired sample lasts at least this long: steps much shorter are timed in batches.
PAIR_SAMPLE_S = 0.005


# --- Paired modes: new code against a git ref, steering on against off, the method's noise ---

PAIRED_MODES = {
    "against_ref": "against_ref",
    "steering": "steering",
    "noise": "noise",
}


def paired_rows(args: argparse.Namespace, mode: str) -> list[Implementation]:
    """The optim_zoo rows a paired mode times: every optimizer (and its bf16-state row unless
    `--no-bf16`), filtered by `--only`; the noise check times Adan unless told otherwise."""
    rows = [
        c
        for c in implementations(with_torch=False)
        if c.library == "optim_zoo"
        and (c.variant == "" or (c.variant == BF16_STATE and not args.no_bf16))
    ]
    wanted = {w.lower() for w in args.only} if args.only else None
    if wanted is None and mode == "noise":
        wanted = {"adan"}
        rows = [c for c in rows if c.algorithm == "Adan" and not c.variant]
    if wanted is not None:
        rows = [c for c in rows if c.matches(wanted)]
    if not rows:
        raise SystemExit(f"no optim_zoo row matches {args.only}")
    return rows


def _arms(
    mode: str,
    contender: Implementation,
    package: Any,
    params_np: Any,
    grads_np: Any,
    compiler_options: dict[str, Any] | None,
) -> tuple[dict[str, tuple[Callable, Callable]], list[tuple[str, str]]]:
    """The arms a mode times for one optimizer, as {name: (run, facts)}, and the pairs of arms
    it compares (first over second)."""
    if mode == "against_ref":
        assert contender.contender is not None
        old = dataclasses.replace(contender, make=contender.contender.rebound(package).build)
        arms = {
            "new": prepare_jax(contender, params_np, grads_np, compiler_options),
            "ref": prepare_jax(old, params_np, grads_np, compiler_options),
        }
        return arms, [("new", "ref")]
    if mode == "steering":
        arms = {
            setting: prepare_jax(contender, params_np, grads_np, compiler_options, setting)
            for setting in ("on", "off")
        }
        return arms, [("on", "off")]
    # The noise check: the one compiled step on two sets of buffers, and a pass of the same
    # bytes without reductions, also twice.
    runs, finish = prepare_jax_copies(contender, params_np, grads_np, compiler_options, copies=2)
    facts = finish()
    shapes = [x.shape for x in jax.tree.leaves(params_np)]
    dtype = jax.tree.leaves(params_np)[0].dtype
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params_np))
    state_arrays = round(facts["state_bytes"] / param_bytes)
    probes, moved, compiled = same_bytes_pass(
        shapes, dtype, state_arrays, compiler_options, copies=2
    )
    probe_facts = {
        "bytes_moved": moved,
        "state_arrays": state_arrays,
        **_hlo_stats(compiled, len(shapes)),
    }
    arms = {
        "step": (runs[0], finish),
        "step again": (runs[1], lambda: {}),
        "same-bytes pass": (probes[0], lambda: probe_facts),
        "same-bytes pass again": (probes[1], lambda: {}),
    }
    pairs = [
        ("step", "step again"),
        ("same-bytes pass", "same-bytes pass again"),
        ("step", "same-bytes pass"),
    ]
    return arms, pairs


def _verdict(comparison: dict, limit: float) -> str:
    low, high = comparison["interval"]
    if high <= limit:
        return "met"
    return "missed" if low > limit else "undecided"


def paired_main(
    args: argparse.Namespace, argv: Sequence[str] | None, started: float
) -> dict[str, Any]:
    """`--against-ref`, `--steering both` or `--noise-check`: every selected optim_zoo optimizer
    timed step by step against its other arm(s), ratios with their intervals; writes
    ``<mode>.json`` and ``<mode>.md`` to the out dir."""
    chosen = [
        name
        for name, on in (
            ("against_ref", bool(args.against_ref)),
            ("steering", args.steering == "both"),
            ("noise", args.noise_check),
        )
        if on
    ]
    if len(chosen) > 1:
        raise SystemExit("--against-ref, --steering both and --noise-check run one at a time")
    mode = chosen[0]
    if mode == "against_ref" and args.steering is not None:
        raise SystemExit("--against-ref compares both versions as they compile by default")
    backend = "gpu" if jax.default_backend() == "gpu" else "cpu"
    available = {**TREES, **QUICK_TREES}
    names = args.trees or (["tiny"] if args.quick else [HEADLINE_TREE[backend]])
    unknown = set(names) - set(available)
    if unknown:
        raise SystemExit(f"unknown trees {sorted(unknown)}; choose from {list(available)}")
    rows = paired_rows(args, mode)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else np.float32
    compiler_options = COMPILER_OPTIONS["quick" if args.quick else "full"]
    pairs = args.pairs if args.pairs is not None else (10 if args.quick else 200)
    budget = args.pair_budget if args.pair_budget is not None else (None if args.quick else 60.0)
    load_start = load_average()
    entries: list[dict] = []
    package_context = (
        package_at(args.against_ref) if mode == "against_ref" else contextlib.nullcontext()
    )
    with package_context as package:
        if package is not None:
            print(f"reference: {package.__name__} (git {args.against_ref})", flush=True)
        for tree_name in names:
            shapes = available[tree_name]()
            params_np, grads_np = make_arrays(shapes, dtype)
            num_params = sum(int(np.prod(s)) for s in leaf_shapes(shapes))
            print(f"\n{tree_name}: {num_params / 1e6:.2f}M parameters", flush=True)
            for contender in rows:
                entry: dict[str, Any] = {
                    "tree": tree_name,
                    "algorithm": contender.algorithm,
                    "variant": contender.variant,
                    "name": row_name((contender.algorithm, contender.variant)),
                }
                entries.append(entry)
                try:
                    arms, compared = _arms(
                        mode, contender, package, params_np, grads_np, compiler_options
                    )
                except (AttributeError, TypeError, ValueError) as e:
                    if mode != "against_ref":
                        raise
                    # The reference may lack an optimizer or an argument of today's.
                    entry["skipped"] = f"{type(e).__name__}: {e}"
                    print(f"  {entry['name']:40s} skipped: {entry['skipped']}", flush=True)
                    continue
                runs = {name: run for name, (run, _) in arms.items()}
                reps = paired.calibrate_reps(runs, PAIR_SAMPLE_S)
                times = paired.interleave(runs, samples=pairs, reps=reps, budget_s=budget)
                entry["reps"] = reps
                entry["arms"] = {
                    name: {**paired.summary(times[name]), **facts()}
                    for name, (_, facts) in arms.items()
                }
                entry["comparisons"] = [
                    {"arm": a, "against": b, **paired.compare(times[a], times[b])}
                    for a, b in compared
                ]
                if mode == "against_ref":
                    new, old = entry["arms"]["new"], entry["arms"]["ref"]
                    entry["same_program"] = new["hlo_digest"] == old["hlo_digest"]
                    entry["verdict"] = _verdict(entry["comparisons"][0], args.limit)
                for c in entry["comparisons"]:
                    print(
                        f"  {entry['name']:32s} {c['arm']} / {c['against']}: "
                        f"{paired.format_ratio(c)} ({c['pairs']} pairs)",
                        flush=True,
                    )
                del arms, runs
                gc.collect()
    result = {
        "mode": mode,
        "config": {
            "quick": args.quick,
            "dtype": args.dtype,
            "trees": names,
            "pairs": pairs,
            "pair_budget_s": budget,
            "pair_sample_s": PAIR_SAMPLE_S,
            "confidence": paired.CONFIDENCE,
            "compiler_options": compiler_options,
            "against_ref": args.against_ref,
            "reference_commit": None if package is None else package.__reference_commit__,
            "limit": args.limit if mode == "against_ref" else None,
            "package": str(Path(optim_zoo.__file__).resolve().parent),
            "git": git_state(),
            "command": "python benchmarks/speed/step_time.py " + " ".join(argv or sys.argv[1:]),
        },
        "machine": machine_info(),
        "load_average": {"start": load_start, "end": load_average()},
        "rows": entries,
        "wall_s": time.perf_counter() - started,
    }
    result["table"] = paired_table(result)
    print()
    print(result["table"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = PAIRED_MODES[mode]
    (args.out_dir / f"{stem}.json").write_text(
        json.dumps(report.json_safe(result), indent=2) + "\n"
    )
    (args.out_dir / f"{stem}.md").write_text(paired_markdown(result), encoding="utf-8")
    return result


# --- Main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny trees, few repeats")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="algorithm or library names")
    parser.add_argument("--trees", nargs="*", default=None, help="subset of the trees")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of timing per row and round"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 10)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="interleaved pairs per comparison (default: 100 in a full run, 0 in a quick one;"
        " 200 and 10 in --against-ref, --steering both and --noise-check)",
    )
    parser.add_argument(
        "--pair-budget",
        type=float,
        default=None,
        help="seconds at most per comparison's pairs, once 10 are done (default 10 in a full"
        " run, 60 in the paired modes; none in a quick one)",
    )
    parser.add_argument(
        "--steering",
        choices=[*STEERING, "both"],
        default=None,
        help="the package's compiler steering for every step (on, off, default: the backend's"
        " choice); 'both' times every optim_zoo optimizer with it on against off, step by step",
    )
    parser.add_argument(
        "--against-ref",
        default=None,
        metavar="REF",
        help="time every optim_zoo optimizer against the package at this git ref, step by step",
    )
    parser.add_argument(
        "--noise-check",
        action="store_true",
        help="the method's own noise: a step against itself, and a same-bytes pass against itself",
    )
    parser.add_argument(
        "--limit",
        type=float,
        default=1.05,
        help="--against-ref: the ratio new / reference each optimizer should stay within",
    )
    parser.add_argument(
        "--no-bf16", action="store_true", help="paired modes: leave out the bf16-state rows"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.against_ref or args.steering == "both" or args.noise_check:
        return paired_main(args, argv, started)
    available = QUICK_TREES if args.quick else TREES
    backend = "gpu" if jax.default_backend() == "gpu" else "cpu"
    names = args.trees or (list(QUICK_TREES) if args.quick else DEFAULT_TREES[backend])
    unknown = set(names) - set(available)
    if unknown:
        raise SystemExit(f"unknown trees {sorted(unknown)}; choose from {list(available)}")
    trees = {name: available[name] for name in names}
    timing = (
        {"warmup": 1, "min_reps": 3, "budget_s": 0.0}
        if args.quick
        else {"warmup": 1, "min_reps": 3, "budget_s": 0.4 if args.budget is None else args.budget}
    )
    contenders = implementations(with_torch=not args.no_torch)
    adamw = next(c for c in contenders if (c.library, c.algorithm) == ("optax", "AdamW"))
    if args.only:
        wanted = {w.lower() for w in args.only}
        contenders = [c for c in contenders if c.matches(wanted)]
        if not contenders:
            raise SystemExit(f"no contender matches {args.only}")
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else np.float32
    itemsize = np.dtype(dtype).itemsize
    # The stream buffer is 4x (CPU) or 16x (GPU) the largest cache it could stay in.
    stream_elements = 2**20 if args.quick else (2**28 if backend == "gpu" else 2**26)
    rounds = args.rounds or (1 if args.quick else 10)
    # The quick run checks that every row builds and runs, as the study's quick mode does: its
    # timings mean nothing, and XLA's backend optimisations would take most of its time.
    compiler_options = COMPILER_OPTIONS["quick" if args.quick else "full"]
    pairs = args.pairs if args.pairs is not None else (0 if args.quick else 100)
    pair_budget = (
        args.pair_budget if args.pair_budget is not None else (None if args.quick else 10.0)
    )

    load_start = load_average()
    bandwidths = [stream_bandwidth(stream_elements, 3, 5 if args.quick else 20)]
    print(f"stream bandwidth: {bandwidths[0] / 1e9:.1f} GB/s", flush=True)
    rows: list[dict] = []
    for tree_name, make_shapes in trees.items():
        shapes = make_shapes()
        params_np, grads_np = make_arrays(shapes, dtype)
        num_leaves = len(leaf_shapes(shapes))
        num_params = sum(int(np.prod(s)) for s in leaf_shapes(shapes))
        print(f"\n{tree_name}: {num_params / 1e6:.2f}M parameters in {num_leaves} leaves")
        # On a tree of many small leaves, every group is timed with optax's AdamW alongside, the
        # per-leaf overhead target's reference.
        pace = adamw if tree_name in MANY_LEAVES_TREES else None
        for group in timing_groups(contenders):
            tree = (tree_name, num_params, num_leaves, params_np, grads_np)
            rows += time_group(
                group,
                tree,
                dtype,
                rounds,
                timing,
                compiler_options,
                pace,
                args.steering,
                pairs,
                pair_budget,
            )
            gc.collect()
        for row in rows:
            if row["tree"] != tree_name or "skipped" in row:
                continue
            algorithm = ALGORITHMS[row["algorithm"]]
            sizes = row.get("state_itemsizes")
            state_sizes = None if sizes is None else StateItemsizes(**sizes)
            decay = DECAY_OF_VARIANT.get(row.get("variant", ""))  # peers have no variant
            row.update(
                traffic(
                    leaf_shapes(shapes), itemsize, row["state_bytes"], algorithm, state_sizes, decay
                )
            )
        gc.collect()
    bandwidths.append(stream_bandwidth(stream_elements, 3, 5 if args.quick else 20))
    bandwidth = max(bandwidths)
    for row in rows:
        if "skipped" in row:
            continue
        row["floor_ms"] = 1e3 * row["bytes_single"] / bandwidth
        row["floor_min_ms"] = 1e3 * row["bytes_min"] / bandwidth
        row["time_over_floor"] = row["ms_per_step"] / row["floor_ms"]
        row["time_over_min_floor"] = row["ms_per_step"] / row["floor_min_ms"]
        row["state_per_param"] = row["state_bytes"] / row["param_bytes"]
        row["overhead_us_per_leaf"] = (
            1e3 * max(row["ms_per_step"] - row["floor_ms"], 0.0) / row["num_leaves"]
        )
        if "pace" in row:
            row["overhead_over_adamw"] = paced_overhead(row, bandwidth)

    tree_names = list(trees)
    table = markdown_table(rows, tree_names)
    headline = HEADLINE_TREE[backend] if HEADLINE_TREE[backend] in trees else tree_names[0]
    many = next((t for t in MANY_LEAVES_TREES if t in trees), None)
    checks = check_targets(rows, headline, many)
    # Each option against its original: printed and reported apart from the targets.
    comparisons = variant_comparisons(rows, tree_names)
    result = {
        "config": {
            "quick": args.quick,
            "dtype": args.dtype,
            "trees": tree_names,
            "timing": timing,
            "rounds": rounds,
            "compiler_options": compiler_options,
            "steering": args.steering,
            "pairs": pairs,
            "pair_budget_s": pair_budget,
            "stream_elements": stream_elements,
            "command": "python benchmarks/speed/step_time.py " + " ".join(argv or sys.argv[1:]),
        },
        "machine": machine_info(),
        "load_average": {"start": load_start, "end": load_average()},
        "bandwidth_gbs": {"runs": [b / 1e9 for b in bandwidths], "used": bandwidth / 1e9},
        "algorithms": {name: a.passes for name, a in ALGORITHMS.items()},
        "rows": rows,
        "targets": checks,
        "comparisons": comparisons,
        "table": table,
        "wall_s": time.perf_counter() - started,
    }
    print(f"\nbandwidth {bandwidth / 1e9:.1f} GB/s; load average {result['load_average']}\n")
    print(table)
    for check in checks:
        print(f"{'met   ' if check['met'] else 'MISSED'} {check['target']}: {check['value']}")
    print()
    print(comparisons_table(comparisons))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "step_time.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "step_time.md").write_text(
        markdown_report(result, rows, tree_names, checks), encoding="utf-8"
    )
    if not args.no_plot:
        bar_trees = [t for t in tree_names if t not in MANY_LEAVES_TREES] or list(tree_names)
        plot(rows, bar_trees, args.out_dir / "step_time.png")
    return result


if __name__ == "__main__":
    main()
