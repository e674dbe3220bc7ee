"""8-bit optimizer state (``dtype_momentum=jnp.int8``, ``dtype_second_moment=jnp.uint8``).

Three parts, on the beyond study's tasks and protocol (`benchmarks/claims/beyond.py`):

1. ``bytes``: state bytes per parameter of every optimizer, float32 state against 8-bit state,
   on the 30M tree of the step-time benchmark and on the study's transformer (shapes only),
   and the temporary bytes of one compiled step with each (XLA's memory analysis). With more
   than one device (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), the 30M tree
   sharded over a mesh of them instead.
2. ``ablation``: the code and the block size. Adan (the most state) with stochastic rounding,
   at the study's chosen rate and its four seeds, on the tasks given, for each code
   (``linear``, ``sqrt`` companded, ``float8``: an e4m3 float relative to the block's scale,
   a dynamic exponent per element) and block size (32, 64, 128, 256), against the committed
   float32 runs. The candidates are the codec's private switches (``optim_zoo._codes.CODE``,
   ``BLOCK_SIZE``), set before each run is traced.
3. ``quality``: each of the six optimizers with 8-bit state and stochastic rounding (or, with
   ``--rounding nearest``, rounded to nearest), at the rate and seeds of the committed bfloat16
   study (`results/beyond_rounding*`), against its float32 and its bfloat16 + stochastic
   rounding runs there, by the study's rule (`beyond.compare_finals`: level unless the means
   differ by more than the larger seed std).

    python benchmarks/claims/eight_bit.py --parts bytes
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/claims/eight_bit.py \
        --parts bytes --out-dir benchmarks/results/eight_bit/mesh
    python benchmarks/claims/eight_bit.py --parts ablation --tasks digits_mlp
    python benchmarks/claims/eight_bit.py --parts ablation --tasks digits_cnn --blocks 32,128
    python benchmarks/claims/eight_bit.py --parts quality --tasks digits_mlp,digits_cnn
    python benchmarks/claims/eight_bit.py --parts quality --tasks digits_mlp --rounding nearest
    python benchmarks/claims/eight_bit.py --quick     # every code path at tiny sizes

Results go to ``results/eight_bit/<part>[_nearest][_<tasks>].json`` and ``.md`` (``--out-dir``
elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optim_zoo
from benchmarks.claims import beyond, protocol
from benchmarks.claims import tasks as tasks_lib
from benchmarks.claims.protocol import Method
from benchmarks.common import contenders
from benchmarks.common.environment import RESULTS_DIR, environment, git_state
from benchmarks.common.traffic import tree_bytes
from benchmarks.speed import step_time
from optim_zoo import _codes

OUT_DIR = RESULTS_DIR / "eight_bit"
EIGHT_BIT = {"dtype_momentum": jnp.int8, "dtype_second_moment": jnp.uint8}
SUFFIX = {"stochastic": " [8-bit state, stochastic rounding]", "nearest": " [8-bit state]"}
# The committed bfloat16 study's results: float32 and bfloat16 + stochastic rounding runs.
COMMITTED = ("beyond_rounding", "beyond_rounding_came", "beyond_rounding_char_transformer")
CODES = ("linear", "sqrt", "float8")
BLOCK_SIZES = (32, 64, 128, 256)
PARTS = ("bytes", "fidelity", "ablation", "quality")

# Every optimizer, as the main job builds it (Adafactor also with momentum, which 8-bit stores).
BYTES_OPTIMIZERS = {
    "adan": lambda **kw: optim_zoo.adan(1e-3, **kw),
    "factored_adan": lambda **kw: optim_zoo.factored_adan(1e-3, **kw),
    "adafactor": lambda **kw: optim_zoo.adafactor(1e-3, **kw),
    "adafactor(momentum=0.9)": lambda **kw: optim_zoo.adafactor(1e-3, momentum=0.9, **kw),
    "apollo": lambda **kw: optim_zoo.apollo(1e-3, **kw),
    "adai": lambda **kw: optim_zoo.adai(0.1, **kw),
    "adaiw": lambda **kw: optim_zoo.adaiw(0.1, **kw),
    "factored_adai": lambda **kw: optim_zoo.factored_adai(0.1, **kw),
    "came": lambda **kw: optim_zoo.came(1e-3, **kw),
}


def eight_bit_method(
    method: Method, name: str | None = None, rounding: str = "stochastic"
) -> Method:
    """`method` with 8-bit state and `rounding` (`contenders.eight_bit_state`)."""
    name = name or method.contender.name + SUFFIX[rounding]
    variant = contenders.eight_bit_state(method.contender, name, rounding)
    return Method(variant, method.center_lr)


# --- Part 1: bytes --------------------------------------------------------------------------


def step_temporaries(tx: optax.GradientTransformation, params: Any) -> int | None:
    """The temporary bytes XLA allocates for one jitted, donated update + apply_updates step
    (its memory analysis; None where the backend reports none): what a step needs beyond the
    parameters, gradients and state."""
    compiled, _ = step_time.compile_step(tx, params, jax.eval_shape(tx.init, params), params)
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def bytes_per_parameter(params: Any, devices: int = 1) -> dict[str, Any]:
    """State bytes per parameter of every optimizer, float32 and 8-bit state, from shapes; and
    the temporary bytes per parameter of one compiled step with each, summed over `devices`
    (params sharded over them: XLA's analysis is of one device's program)."""
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    rows = {}
    for name, make in BYTES_OPTIMIZERS.items():
        row = {}
        for arm, kwargs in (("float32", {}), ("8-bit", EIGHT_BIT)):
            row[arm] = tree_bytes(jax.eval_shape(make(**kwargs).init, params)) / count
            temporaries = step_temporaries(make(**kwargs), params)
            per_param = None if temporaries is None else temporaries * devices / count
            row[f"{arm} step temporaries"] = per_param
        rows[name] = row
    return {"parameters": count, "devices": devices, "optimizers": rows}


def over_devices(shapes: Any, axis_type: jax.sharding.AxisType) -> Any:
    """`shapes` sharded over a (2, n / 2) mesh of all n devices with axes of `axis_type`: a
    leaf's first axis over the first mesh axis and its last over the second, each where the
    mesh axis divides it."""
    count = jax.device_count()
    if count % 2:
        raise SystemExit(f"the mesh takes an even number of devices, not {count}")
    mesh = jax.make_mesh((2, count // 2), ("data", "model"), axis_types=(axis_type,) * 2)

    def sharded(s: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        spec: list[str | None] = [None] * len(s.shape)
        if len(s.shape) >= 2 and s.shape[0] % 2 == 0:
            spec[0] = "data"
        if s.shape and s.shape[-1] % (count // 2) == 0:
            spec[-1] = "model"
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)

    return jax.tree.map(sharded, shapes)


def part_bytes(mode: str) -> dict[str, Any]:
    trees = {}
    tree = step_time.TREES["30M"]() if mode == "full" else step_time.QUICK_TREES["tiny"]()
    shapes = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32), tree, is_leaf=step_time._is_shape
    )
    name = "30M tree" if mode == "full" else "tiny tree"
    devices = jax.device_count()
    if devices > 1:  # the tree sharded over them, and nothing else
        for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
            mesh = f"a 2 x {devices // 2} mesh of {devices} devices, {axis_type.name.lower()} axes"
            sharded = over_devices(shapes, axis_type)
            trees[f"{name}, sharded over {mesh}"] = bytes_per_parameter(sharded, devices)
        return {"trees": trees}
    trees[name] = bytes_per_parameter(shapes)
    sizes = tasks_lib.FULL if mode == "full" else tasks_lib.QUICK
    task = tasks_lib.TASK_BUILDERS["char_transformer"](sizes)
    params = jax.eval_shape(task.init_params, jax.random.key(0))
    trees[f"study's transformer ({task.title})"] = bytes_per_parameter(params)
    return {"trees": trees}


def bytes_markdown(result: dict[str, Any]) -> str:
    lines = []
    for tree, entry in result["trees"].items():
        lines += [
            f"### {tree}: {entry['parameters']:,} parameters",
            "",
            "| optimizer | float32 state, bytes/param | 8-bit state, bytes/param | ratio "
            "| step temporaries f32 → 8-bit, bytes/param "
            "| state + temporaries f32 → 8-bit, bytes/param |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in entry["optimizers"].items():
            f32, eight = row["float32"], row["8-bit"]
            temps = row.get("float32 step temporaries"), row.get("8-bit step temporaries")
            if None in temps:
                step_cells = "n/a | n/a"
            else:
                step_cells = (
                    f"{temps[0]:.3f} → {temps[1]:.3f} "
                    f"| {f32 + temps[0]:.3f} → {eight + temps[1]:.3f}"
                )
            lines.append(f"| {name} | {f32:.3f} | {eight:.3f} | {eight / f32:.2f} | {step_cells} |")
        lines += [
            "",
            "Step temporaries: XLA's memory analysis of one jitted, donated update + "
            "apply_updates step on this backend (compiled, not run)"
            + (f", one device's times {entry['devices']}." if entry.get("devices", 1) > 1 else "."),
            "",
        ]
    return "\n".join(lines)


# --- The committed bfloat16 study -----------------------------------------------------------


def committed_runs() -> dict[str, dict[str, Any]]:
    """task -> optimizer -> the committed entry (lr, float32, bfloat16_stochastic runs)."""
    runs: dict[str, dict[str, Any]] = {}
    for folder in COMMITTED:
        path = RESULTS_DIR / folder / "beyond.json"
        for task, entry in json.loads(path.read_text())["tasks"].items():
            runs.setdefault(task, {}).update(entry["bf16_state"])
    return runs


def _runner(name: str, mode: str) -> protocol.TaskRunner:
    sizes = tasks_lib.FULL if mode == "full" else tasks_lib.QUICK
    return protocol.TaskRunner(tasks_lib.TASK_BUILDERS[name](sizes), mode)


def _task_description(runner: protocol.TaskRunner) -> dict[str, Any]:
    task = runner.task
    return {
        "title": task.title,
        "metric_labels": task.metric_labels,
        "higher_is_better": list(task.higher_is_better),
    }


def _verdicts(comparison: dict[str, Any]) -> dict[str, str]:
    return {metric: entry["verdict"] for metric, entry in comparison.items()}


# --- Part 2: the ablation -------------------------------------------------------------------


def part_ablation(
    tasks: list[str],
    mode: str,
    progress: bool,
    codes: tuple[str, ...] = CODES,
    blocks: tuple[int, ...] = BLOCK_SIZES,
) -> dict[str, Any]:
    committed = committed_runs()
    method = next(m for m in beyond.original_methods(("optim_zoo.adan",)))
    result = {}
    for name in tasks:
        runner = _runner(name, mode)
        description = _task_description(runner)
        reference = committed[name]["optim_zoo.adan"]
        lr = reference["lr"]
        float32 = (
            reference["float32"]
            if mode == "full"
            else beyond.run_fixed_rate(runner, method, lr, progress)
        )
        rows = {}
        for code in codes:
            for block in blocks:
                _codes.CODE, _codes.BLOCK_SIZE = code, block
                variant = eight_bit_method(method, f"optim_zoo.adan [{code}, block {block}]")
                run = beyond.run_fixed_rate(runner, variant, lr, progress)
                comparison = beyond._compare_all(run, float32, description)
                rows[f"{code}/{block}"] = {
                    "code": code,
                    "block": block,
                    "final": run["final"],
                    "state_bytes": run["state_bytes"],
                    "vs_f32": comparison,
                    "seconds": run["seconds"],
                }
        _codes.CODE, _codes.BLOCK_SIZE = "sqrt", 64
        result[name] = {**description, "lr": lr, "float32": float32["final"], "rows": rows}
    return {"tasks": result}


def _mean_std(summary: dict[str, Any]) -> str:
    if not summary["finite"]:
        return "diverged"
    return f"{summary['mean']:.4g} ± {summary['std']:.2g}"


def ablation_markdown(result: dict[str, Any]) -> str:
    lines = []
    for name, task in result["tasks"].items():
        metrics = task["metric_labels"]
        lines += [
            f"### {name}: Adan, lr {task['lr']:g}, 8-bit state with stochastic rounding",
            "",
            "| code / block | state bytes | "
            + " | ".join(f"{m} (vs float32 {_mean_std(task['float32'][m])})" for m in metrics)
            + " |",
            "|---|---|" + "---|" * len(metrics),
        ]
        for key, row in task["rows"].items():
            cells = [f"{_mean_std(row['final'][m])} {row['vs_f32'][m]['verdict']}" for m in metrics]
            lines.append(f"| {key} | {row['state_bytes']:,} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# --- Part 2b: fidelity of the codes on real state -------------------------------------------

FIDELITY_STEPS = (10, 100, 1000)
FIDELITY_BLOCKS = (32, 64, 128)


def part_fidelity(mode: str) -> dict[str, Any]:
    """Adan's float32 state while it trains the main job's digits MLP (lr 5e-3, batch 64): at
    each of `FIDELITY_STEPS`, every coded leaf's m, v, n and previous gradient through each code
    and block size (rounded to nearest), and the error that makes in Adan's direction
    ``(m / (1 - b1**t) + b2 v / (1 - b2**t)) / (sqrt(n / (1 - b3**t)) + eps)``: the relative
    L2 error of each field and of the direction, and the largest error of one element of the
    direction relative to the RMS of the direction."""
    from benchmarks.common import digits

    data = digits.load_digits_dataset()
    params = digits.init_mlp(jax.random.key(0), digits.mlp_sizes(data.x_train.shape[1]))
    steps = FIDELITY_STEPS if mode == "full" else (2, 5)
    batches = digits.minibatch_order(data.x_train.shape[0], 64, max(steps), 0)
    tx = optim_zoo.adan(5e-3)

    def loss(p, i):
        return digits.cross_entropy(digits.mlp_logits(p, data.x_train[i]), data.y_train[i])

    @jax.jit
    def step(p, s, i):
        updates, s = tx.update(jax.grad(loss)(p, i), s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    result: dict[str, Any] = {}
    for t in range(1, max(steps) + 1):
        params, state = step(params, state, batches[t - 1])
        if t not in steps:
            continue
        inner = state[0]
        fields = {f: jax.tree.leaves(getattr(inner, f)) for f in ("m", "v", "n", "prev_grad")}
        coded = [i for i, x in enumerate(fields["m"]) if x.size >= _codes.MIN_CODED_SIZE]
        rows = {}
        for code in CODES:
            for block in FIDELITY_BLOCKS:
                _codes.CODE, _codes.BLOCK_SIZE = code, block
                errors = {f: [] for f in (*fields, "direction", "direction_max")}
                for i in coded:
                    exact = {f: fields[f][i] for f in fields}
                    rounded = {
                        f: _codes.decode(_codes.encode(x, f != "n", jnp.float32))
                        for f, x in exact.items()
                    }
                    for f in fields:
                        errors[f].append(_relative(rounded[f], exact[f]))

                    d, d_hat = _direction(exact, t), _direction(rounded, t)
                    errors["direction"].append(_relative(d_hat, d))
                    rms = float(jnp.sqrt(jnp.mean(d * d)))
                    errors["direction_max"].append(float(jnp.max(jnp.abs(d_hat - d))) / rms)
                rows[f"{code}/{block}"] = {f: max(e) for f, e in errors.items()}
        result[f"step {t}"] = rows
    _codes.CODE, _codes.BLOCK_SIZE = "sqrt", 64
    return {"steps": result}


def _direction(s: dict[str, jax.Array], t: int) -> jax.Array:
    """Adan's direction from its fields `s` at step `t` (the default betas and eps)."""
    b1, b2, b3, eps = 0.98, 0.92, 0.99, 1e-8
    numerator = s["m"] / (1 - b1**t) + b2 * s["v"] / (1 - b2**t)
    return numerator / (jnp.sqrt(s["n"] / (1 - b3**t)) + eps)


def _relative(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def fidelity_markdown(result: dict[str, Any]) -> str:
    lines = [
        "Relative L2 error of each field and of Adan's direction (the larger over the two "
        "coded weight matrices), and the largest error of one element of the direction over the "
        "direction's RMS; rounded to nearest.",
        "",
    ]
    for step, rows in result["steps"].items():
        lines += [
            f"### {step}",
            "",
            "| code / block | m | v | n | prev_grad | direction | worst element / RMS |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, e in rows.items():
            lines.append(
                f"| {key} | {e['m']:.2e} | {e['v']:.2e} | {e['n']:.2e} | {e['prev_grad']:.2e} "
                f"| {e['direction']:.2e} | {e['direction_max']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


# --- Part 3: quality ------------------------------------------------------------------------


def part_quality(
    tasks: list[str], methods: list[str], mode: str, progress: bool, rounding: str = "stochastic"
) -> dict:
    committed = committed_runs()
    result = {}
    for name in tasks:
        runner = _runner(name, mode)
        description = _task_description(runner)
        rows = {}
        for method in beyond.original_methods(methods):
            reference = committed[name][method.name]
            lr = reference["lr"]
            if mode == "full":
                float32, bf16 = reference["float32"], reference["bfloat16_stochastic"]
            else:
                float32 = beyond.run_fixed_rate(runner, method, lr, progress)
                bf16 = float32
            eight_bit = eight_bit_method(method, rounding=rounding)
            eight = beyond.run_fixed_rate(runner, eight_bit, lr, progress)
            rows[method.name] = {
                "lr": lr,
                "eight_bit": eight,
                "float32_final": float32["final"],
                "bf16_sr_final": bf16["final"],
                "bytes": {
                    "float32": float32["state_bytes"],
                    "bf16": bf16["state_bytes"],
                    "8-bit": eight["state_bytes"],
                },
                "vs_f32": beyond._compare_all(eight, float32, description),
                "vs_bf16_sr": beyond._compare_all(eight, bf16, description),
            }
        result[name] = {**description, "rows": rows}
    return {"rounding": rounding, "tasks": result}


def quality_markdown(result: dict[str, Any]) -> str:
    lines = []
    eight_bit = "8-bit, nearest" if result.get("rounding") == "nearest" else "8-bit + SR"
    for name, task in result["tasks"].items():
        lines += [
            f"### {name}: {task['title']}",
            "",
            f"| optimizer | lr | metric | float32 | bf16 + SR | {eight_bit} | vs float32 "
            "| vs bf16 + SR | state bytes f32 → 8-bit |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for optimizer, row in task["rows"].items():
            for metric in task["metric_labels"]:
                lines.append(
                    f"| {optimizer} | {row['lr']:g} | {metric} "
                    f"| {_mean_std(row['float32_final'][metric])} "
                    f"| {_mean_std(row['bf16_sr_final'][metric])} "
                    f"| {_mean_std(row['eight_bit']['final'][metric])} "
                    f"| {row['vs_f32'][metric]['verdict']} "
                    f"| {row['vs_bf16_sr'][metric]['verdict']} "
                    f"| {row['bytes']['float32']:,} → {row['bytes']['8-bit']:,} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every code path")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--tasks", default="digits_mlp")
    parser.add_argument("--methods", default=",".join(beyond.ORIGINALS))
    parser.add_argument("--codes", default=",".join(CODES), help="the ablation's codes")
    parser.add_argument(
        "--blocks", default=",".join(map(str, BLOCK_SIZES)), help="the ablation's block sizes"
    )
    parser.add_argument("--rounding", default="stochastic", choices=("stochastic", "nearest"))
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    tasks = args.tasks.split(",")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for part in args.parts.split(","):
        started = time.perf_counter()
        if part == "bytes":
            result, markdown = part_bytes(mode), bytes_markdown
        elif part == "ablation":
            codes = tuple(args.codes.split(","))
            blocks = tuple(int(b) for b in args.blocks.split(","))
            result = part_ablation(tasks, mode, args.progress, codes, blocks)
            markdown = ablation_markdown
        elif part == "fidelity":
            result, markdown = part_fidelity(mode), fidelity_markdown
        elif part == "quality":
            methods = args.methods.split(",")
            result = part_quality(tasks, methods, mode, args.progress, args.rounding)
            markdown = quality_markdown
        else:
            raise SystemExit(f"unknown part {part!r}; choose from {PARTS}")
        result = {
            "mode": mode,
            "part": part,
            "command": " ".join(sys.argv),
            "environment": environment(),
            "git": git_state(),
            **result,
            "runtime_seconds": time.perf_counter() - started,
        }
        nearest = "_nearest" if part == "quality" and args.rounding == "nearest" else ""
        stem = part if part in ("bytes", "fidelity") else f"{part}{nearest}_{'_'.join(tasks)}"
        (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out_dir / f"{stem}.md").write_text(
            f"# 8-bit state: {part}\n\n`{result['command']}` ({mode} mode, "
            f"{result['runtime_seconds']:.0f} s)\n\n" + markdown(result) + "\n"
        )
        print(markdown(result))


if __name__ == "__main__":
    main()
