"""One short GPU check of every optim_zoo optimizer's step, with the package's compiler steering on
and off, against optax, PyTorch's fused AdamW and a pass that only moves the same bytes.

On one NVIDIA H100 or H200 it finishes within 8 minutes, compiles included (`--deadline`, 400 s
from the start by default, skips the rows it would not reach in time and still writes its
report). For each row it prints and writes:

- ms per step: the median of interleaved samples (`benchmarks/speed/paired.py`), each step jitted,
  parameters and state donated, warmed up and waited for (`block_until_ready`);
- XLA MB: the bytes XLA's cost model says the compiled step reads and writes
  (``compiled.cost_analysis()["bytes accessed"]``);
- floor MB: the bytes a single pass must move, read p, g and the state once and write p and the
  state once (`benchmarks/common/traffic.py`), and the fewest passes' bytes its reductions force;
- time/floor: ms over (single-pass bytes / reachable bandwidth), the bandwidth a donated
  in-place update of a 1 GiB buffer reaches (`step_time.stream_bandwidth`, best of a measure at
  the start and one at the end);
- time / same-bytes pass: ms over the time of a donated elementwise pass, without reductions,
  over arrays of the parameters' shapes that moves the row's single-pass bytes with its state
  rounded to whole arrays (`step_time.same_bytes_pass`);
- kernels per leaf: the kernels of the optimized HLO (`step_time.count_kernels`: fusions,
  custom calls, copies and unfused ops, inside command buffers too) over the number of leaves;
- for the optim_zoo rows timed with steering on and off, the ratio on / off, the median of the
  rounds' ratios with its 95% interval.

The tree is `step_time.py`'s ``185M`` (184.7M float32 parameters in 147 leaves, every array
larger than a GPU's last-level cache). The peers: optax's AdamW, Adan and Adafactor, and
``torch.optim.AdamW(fused=True)`` on CUDA when torch with CUDA imports (otherwise the row is
recorded as skipped, with the reason).

    python benchmarks/speed/gpu_check.py              # on the GPU: writes results/step_time_gpu/
    python benchmarks/speed/gpu_check.py --dry-run --out-dir /tmp/gpu-check  # the logic, on a CPU

``--steering`` picks the settings (``both``, the default; ``on``, ``off`` or ``default``: the
backend's choice, off on a GPU).
``--bf16-state`` adds every optimizer with its state in bfloat16, ``--eight-bit-state`` with
8-bit state (``dtype_momentum=jnp.int8``, ``dtype_second_moment=jnp.uint8``, stochastic
rounding; docs/eight_bit_state.md); ``--only`` keeps the rows
whose algorithm, library or variant matches, as in `step_time.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# JAX and PyTorch share the card: JAX takes memory as it needs it rather than most of it upfront.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if __package__ in (None, ""):  # run as a file: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import numpy as np

from benchmarks.common import report
from benchmarks.common.contenders import (
    BF16_STATE,
    EIGHT_BIT_STATE,
    Implementation,
    eight_bit_state,
    implementations,
)
from benchmarks.common.environment import (
    COMPILER_OPTIONS,
    RESULTS_DIR,
    git_state,
    load_average,
    machine_info,
)
from benchmarks.common.traffic import ALGORITHMS, StateItemsizes, traffic, tree_bytes
from benchmarks.speed import paired, step_time

# When the script started (after its imports, a few seconds): the deadline counts from here.
_IMPORTED = time.perf_counter()
DEFAULT_OUT_DIR = RESULTS_DIR / "step_time_gpu"
DEADLINE_S = 400.0
# A row is started only with this much time left before the deadline: its compiles and pairs.
ROW_RESERVE_S = 30.0
MB = 1e6


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=None, help="a tree of step_time.py (default 185M)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the logic on a tiny tree: few pairs, XLA's quick options; timings mean nothing",
    )
    parser.add_argument(
        "--steering", choices=["both", *step_time.STEERING], default="both", help="see above"
    )
    parser.add_argument("--only", nargs="*", default=None, help="algorithm or library names")
    parser.add_argument("--bf16-state", action="store_true", help="add the bf16-state rows")
    parser.add_argument(
        "--eight-bit-state", action="store_true", help="add the 8-bit-state rows (see above)"
    )
    parser.add_argument("--no-torch", action="store_true", help="leave out PyTorch's AdamW")
    parser.add_argument("--pairs", type=int, default=None, help="rounds per row (default 100)")
    parser.add_argument(
        "--row-budget", type=float, default=None, help="seconds of rounds per row (default 4)"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help=f"seconds from the start after which no row starts (default {DEADLINE_S:.0f})",
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    return parser.parse_args(argv)


def _selected(args: argparse.Namespace) -> list[Implementation]:
    """The JAX rows: every optim_zoo optimizer (bf16-state rows with `--bf16-state`), then
    optax's AdamW, Adan and Adafactor; `--only` keeps the matching ones."""
    variants = ("", BF16_STATE) if args.bf16_state else ("",)
    rows = [
        c
        for c in implementations(with_torch=False)
        if (c.library == "optim_zoo" and c.variant in variants)
        or (c.library == "optax" and c.algorithm in ("AdamW", "Adan", "Adafactor"))
    ]
    if args.only:
        wanted = {w.lower() for w in args.only}
        rows = [c for c in rows if c.matches(wanted)]
        if not rows:
            raise SystemExit(f"no row matches {args.only}")
    if args.eight_bit_state:  # after each plain optim_zoo row, the same with 8-bit state
        rows = [
            variant
            for c in rows
            for variant in (
                (c, _eight_bit_row(c)) if c.library == "optim_zoo" and not c.variant else (c,)
            )
        ]
    return rows


def _eight_bit_row(row: Implementation) -> Implementation:
    """`row` with 8-bit state and stochastic rounding (`contenders.eight_bit_state`)."""
    contender = eight_bit_state(row.contender, row.contender.name)
    return dataclasses.replace(
        row, make=contender.build, variant=EIGHT_BIT_STATE, contender=contender
    )


def _torch_adamw() -> Implementation | None:
    return next(
        (
            c
            for c in implementations(with_torch=True)
            if (c.library, c.algorithm) == ("torch", "AdamW")
        ),
        None,
    )


def torch_skip_reason() -> str | None:
    """None when PyTorch with a CUDA device imports and JAX runs on a GPU, else why not."""
    try:
        import torch
    except Exception as e:  # ImportError, or anything a broken install raises
        return f"{type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    if jax.default_backend() != "gpu":
        return "JAX does not run on the GPU"
    return None


def _row(
    name: str, library: str, algorithm: str, variant: str, steering: str | None, **extra: Any
) -> dict:
    return {
        "name": name,
        "library": library,
        "algorithm": algorithm,
        "variant": variant,
        "steering": steering,
        **extra,
    }


def _add_floors(row: dict, shapes: list, itemsize: int) -> None:
    """The single-pass and fewest-pass bytes of the row's algorithm (`traffic.py`)."""
    sizes = row.get("state_itemsizes")
    state_sizes = None if sizes is None else StateItemsizes(**sizes)
    row.update(
        traffic(shapes, itemsize, row["state_bytes"], ALGORITHMS[row["algorithm"]], state_sizes)
    )
    row["state_arrays"] = round(row["state_bytes"] / row["param_bytes"])


def _state_arrays(contender: Implementation, params_np: Any) -> int:
    """The optimizer's state bytes in parameter-sized arrays, rounded: from the shapes that
    `init` gives, without allocating them."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params_np)
    state = jax.eval_shape(contender.make().init, params)
    return round(tree_bytes(state) / sum(x.nbytes for x in jax.tree.leaves(params_np)))


def _time(
    runs: dict[str, Callable], pairs: int, budget: float | None, seed: int
) -> dict[str, list[float]]:
    reps = paired.calibrate_reps(runs, step_time.PAIR_SAMPLE_S)
    return paired.interleave(runs, samples=pairs, reps=reps, budget_s=budget, seed=seed)


def main(argv: Sequence[str] | None = None, started: float | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter() if started is None else started

    def _elapsed() -> float:
        return time.perf_counter() - started

    backend = jax.default_backend()
    tree_name = args.tree or ("tiny" if args.dry_run else "185M")
    trees = {**step_time.TREES, **step_time.QUICK_TREES}
    if tree_name not in trees:
        raise SystemExit(f"unknown tree {tree_name}; choose from {list(trees)}")
    pairs = args.pairs or (4 if args.dry_run else 100)
    budget = args.row_budget if args.row_budget is not None else (None if args.dry_run else 4.0)
    deadline = args.deadline if args.deadline is not None else DEADLINE_S
    compiler_options = COMPILER_OPTIONS["quick" if args.dry_run else "full"]
    stream_elements = 2**20 if args.dry_run else 2**28  # 4 MB, or 1 GiB: no cache holds it
    settings = ["on", "off"] if args.steering == "both" else [args.steering]
    print(f"backend {backend}: {', '.join(str(d) for d in jax.devices())}", flush=True)
    if backend != "gpu" and not args.dry_run:
        print("not a GPU: these numbers are not the GPU check's", flush=True)

    shapes_tree = trees[tree_name]()
    shapes = step_time.leaf_shapes(shapes_tree)
    dtype = np.float32
    itemsize = np.dtype(dtype).itemsize
    params_np, grads_np = step_time.make_arrays(shapes_tree, dtype)
    num_leaves = len(shapes)
    num_params = sum(int(np.prod(s)) for s in shapes)
    print(f"{tree_name}: {num_params / 1e6:.2f}M parameters in {num_leaves} leaves", flush=True)

    load_start = load_average()
    bandwidths = [step_time.stream_bandwidth(stream_elements, 3, 5 if args.dry_run else 20)]
    print(f"stream bandwidth: {bandwidths[0] / 1e9:.1f} GB/s", flush=True)

    rows: list[dict] = []
    comparisons: list[dict] = []

    def out_of_time(row: dict) -> bool:
        if _elapsed() + ROW_RESERVE_S > deadline:
            row["skipped"] = f"deadline: {_elapsed():.0f} s of {deadline:.0f} s spent"
            print(f"  {row['name']:48s} skipped: {row['skipped']}", flush=True)
            return True
        return False

    def row_budget() -> float | None:
        left = deadline - _elapsed() - ROW_RESERVE_S
        return budget if budget is None else max(0.0, min(budget, left))

    # First the references, so that a deadline can only cut optimizer rows. A pass of the
    # same bytes for every whole number of state arrays a row has (from its state's shapes).
    selected = _selected(args)
    adamw = next((c for c in selected if (c.library, c.algorithm) == ("optax", "AdamW")), None)
    reason = "--no-torch" if args.no_torch else torch_skip_reason()
    if adamw is None:
        reason = reason or "optax's AdamW is not among the rows (--only)"
    arrays = {_state_arrays(c, params_np) for c in selected}
    probes: dict[int, dict] = {}
    for k in sorted(arrays):
        row = _row(f"same-bytes pass ({k} state arrays)", "jax", "", "", None, state_arrays=k)
        rows.append(row)
        if out_of_time(row):
            continue
        runs, moved, compiled = step_time.same_bytes_pass(shapes, dtype, k, compiler_options)
        times = _time({"pass": runs[0]}, pairs, row_budget(), 1000 + k)
        row.update(paired.summary(times["pass"]))
        row.update(step_time._hlo_stats(compiled, num_leaves))
        row["bytes_moved"] = moved
        row["gbs"] = moved / (row["median_ms"] / 1e3) / 1e9
        probes[k] = row
        print(f"  {row['name']:48s} {row['median_ms']:9.3f} ms", flush=True)
        del runs, compiled
        gc.collect()

    # PyTorch's fused AdamW, timed in turns with optax's AdamW.
    torch_row = _row("torch AdamW (fused=True)", "torch", "AdamW", "", None)
    if reason is None and not out_of_time(torch_row):
        contender = _torch_adamw()
        run, finish = step_time.prepare_torch(contender, params_np, grads_np)
        optax_run, _ = step_time.prepare_jax(adamw, params_np, grads_np, compiler_options)
        times = _time({"torch": run, "optax": optax_run}, pairs, row_budget(), len(selected))
        torch_row.update(paired.summary(times["torch"]))
        torch_row.update(finish())
        _add_floors(torch_row, shapes, itemsize)
        found = paired.compare(times["optax"], times["torch"])
        comparisons.append({"row": "AdamW", "arm": "optax", "against": "torch fused", **found})
        print(f"  {torch_row['name']:48s} {torch_row['median_ms']:9.3f} ms", flush=True)
        print(f"  {'AdamW':48s} optax / torch: {paired.format_ratio(found)}", flush=True)
        del run, optax_run
        gc.collect()
        _empty_torch_cache()
    elif reason is not None:
        torch_row["skipped"] = reason
        print(f"  {torch_row['name']:48s} skipped: {reason}", flush=True)
    rows.append(torch_row)

    for index, contender in enumerate(selected):
        ours = contender.library == "optim_zoo"
        label = contender.name
        arm_settings = settings if ours else [None]
        group = [
            _row(
                label + ("" if s is None else f" (steering {s})"),
                contender.library,
                contender.algorithm,
                contender.variant,
                s,
            )
            for s in arm_settings
        ]
        rows += group
        if out_of_time(group[0]):
            for row in group[1:]:
                row["skipped"] = group[0]["skipped"]
            continue
        arms = {}
        for row, setting in zip(group, arm_settings, strict=True):
            arms[row["name"]] = step_time.prepare_jax(
                contender, params_np, grads_np, compiler_options, setting
            )
        times = _time({n: run for n, (run, _) in arms.items()}, pairs, row_budget(), index)
        for row in group:
            row.update(paired.summary(times[row["name"]]))
            row.update(arms[row["name"]][1]())
            _add_floors(row, shapes, itemsize)
            print(f"  {row['name']:48s} {row['median_ms']:9.3f} ms", flush=True)
        if len(group) == 2:
            on, off = group
            found = paired.compare(times[on["name"]], times[off["name"]])
            comparisons.append({"row": label, "arm": "on", "against": "off", **found})
            print(f"  {label:48s} on / off: {paired.format_ratio(found)}", flush=True)
        del arms
        gc.collect()

    bandwidths.append(step_time.stream_bandwidth(stream_elements, 3, 5 if args.dry_run else 20))
    bandwidth = max(bandwidths)
    for row in rows:
        if "skipped" in row or "bytes_single" not in row:
            continue
        row["floor_ms"] = 1e3 * row["bytes_single"] / bandwidth
        row["floor_min_ms"] = 1e3 * row["bytes_min"] / bandwidth
        row["time_over_floor"] = row["median_ms"] / row["floor_ms"]
        row["time_over_min_floor"] = row["median_ms"] / row["floor_min_ms"]
        probe = probes.get(row["state_arrays"])
        row["time_over_same_bytes_pass"] = (
            None if probe is None else row["median_ms"] / probe["median_ms"]
        )
    result = {
        "config": {
            "tree": tree_name,
            "num_params": num_params,
            "num_leaves": num_leaves,
            "dry_run": args.dry_run,
            "steering": args.steering,
            "pairs": pairs,
            "row_budget_s": budget,
            "deadline_s": deadline,
            "compiler_options": compiler_options,
            "stream_elements": stream_elements,
            "preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
            "command": "python benchmarks/speed/gpu_check.py " + " ".join(argv or sys.argv[1:]),
        },
        "backend": backend,
        "machine": machine_info(),
        "git": git_state(),
        "load_average": {"start": load_start, "end": load_average()},
        "bandwidth_gbs": {"runs": [b / 1e9 for b in bandwidths], "used": bandwidth / 1e9},
        "rows": rows,
        "comparisons": comparisons,
        "wall_s": _elapsed(),
    }
    result["table"] = table(rows, comparisons)
    print(f"\nreachable bandwidth {bandwidth / 1e9:.1f} GB/s; {result['wall_s']:.0f} s\n")
    print(result["table"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_check.json").write_text(
        json.dumps(report.json_safe(result), indent=2) + "\n"
    )
    (args.out_dir / "gpu_check.md").write_text(markdown(result), encoding="utf-8")
    return result


def _empty_torch_cache() -> None:
    import torch

    torch.cuda.empty_cache()


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _mb(value: float) -> str:
    """Megabytes, to the unit from 100 MB up and to three figures below."""
    return f"{value / MB:.0f}" if value >= 100 * MB else f"{value / MB:.3g}"


def table(rows: list[dict], comparisons: list[dict]) -> str:
    on_off = {c["row"]: c for c in comparisons if c["arm"] == "on"}
    header = (
        "| row | ms/step | XLA MB/step | floor MB (1 pass / min) | time/floor (1 pass) "
        "| time / same-bytes pass | kernels/leaf | compile s | on / off [95% interval] |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['name']} | skipped: {row['skipped']} | | | | | | | |")
            continue
        xla = row.get("xla_bytes")
        floors = (
            f"{_mb(row['bytes_single'])} / {_mb(row['bytes_min'])}"
            if "bytes_single" in row
            else f"moves {_mb(row['bytes_moved'])} ({row['gbs']:.0f} GB/s)"
        )
        base = row["name"].split(" (steering")[0]
        ratio = on_off.get(base) if row.get("steering") == "on" else None
        lines.append(
            f"| {row['name']} | {row['median_ms']:.3f} "
            f"| {'n/a' if xla is None else _mb(xla)} | {floors} "
            f"| {_fmt(row.get('time_over_floor'), '.2f')} "
            f"| {_fmt(row.get('time_over_same_bytes_pass'), '.2f')} "
            f"| {_fmt(row.get('kernels_per_leaf'), '.1f')} "
            f"| {_fmt(row.get('compile_s'), '.1f')} "
            f"| {'' if ratio is None else paired.format_ratio(ratio)} |"
        )
    return header + "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    config, machine = result["config"], result["machine"]
    others = [c for c in result["comparisons"] if c["arm"] != "on"]
    lines = [
        "# GPU check: optimizer steps against the memory-traffic floor",
        "",
        f"Command: `{config['command'].strip()}` ({result['wall_s']:.0f} s)",
        "",
        f"Machine: {machine['gpu']}; {machine['cpu']}, {machine['cores']} cores; JAX "
        f"{machine['jax']} on {', '.join(machine['jax_devices'])}; optax {machine['optax']}"
        + (f"; torch {machine['torch']}" if "torch" in machine else "")
        + f". Git: {result['git']}.",
        "",
        f"Tree `{config['tree']}`: {config['num_params'] / 1e6:.1f}M float32 parameters in"
        f" {config['num_leaves']} leaves. Reachable bandwidth (donated in-place update of"
        f" {4 * config['stream_elements'] / 2**20:.0f} MiB, best of"
        f" {', '.join(f'{b:.0f}' for b in result['bandwidth_gbs']['runs'])} GB/s):"
        f" {result['bandwidth_gbs']['used']:.0f} GB/s.",
        "",
        "ms/step: median of interleaved samples (up to"
        f" {config['pairs']} per row, {config['row_budget_s']} s at most). XLA MB: the cost"
        " model's bytes accessed. Floor MB: a single pass (read p, g and the state, write p and"
        " the state) and the fewest passes the algorithm's reductions force"
        " (benchmarks/common/traffic.py). time/floor: ms over (single-pass bytes / reachable"
        " bandwidth). time / same-bytes pass: ms over a donated elementwise pass that moves the"
        " single-pass bytes (state rounded to whole arrays). kernels/leaf: kernels in the"
        " optimized HLO over the leaves. on / off: steering on over off, the median of the"
        " rounds' ratios with its 95% order-statistics interval.",
        "",
        result["table"],
    ]
    for c in others:
        lines.append(f"- {c['row']}: {c['arm']} / {c['against']} = {paired.format_ratio(c)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(started=_IMPORTED)
