"""Beyond the papers: factored Adan and Adai, and bfloat16 optimizer state, on the study's tasks.

Three pieces of evidence for options of optim_zoo that no paper tested, all on the problems and
under the protocol of the study (`benchmarks/claims/protocol.py`, results in `results/study/`):

1. Factored variants under the study's full protocol (a learning-rate grid on seed 0, the chosen
   rate on seeds 1, 2 and 3) on all six tasks: `optim_zoo.factored_adan`,
   `optim_zoo.factored_adai`, and `optim_zoo.factored_adai(decoupled=True)` (factored AdaiW),
   each with its original's main-job hyperparameters and grid, and `min_dim_size_to_factor=8`
   like the Adafactor contender, so that every weight matrix is factored. Compared with the
   originals and AdamW of the committed study (`results/study/study.json`).
2. bfloat16 state storage: each of the six optimizers with its moments stored in bfloat16
   (float32 params), rounded to nearest and with stochastic rounding
   (``state_rounding="stochastic"``), at the original's chosen learning rate in the committed
   study and the same four seeds, against the same runs with float32 state: an A/B of the
   storage alone.
3. The public golden problem (`fixtures/goldens.py`, every package configuration) for 5 and
   200 steps with float32 params: bfloat16 against float32 state, and float32 against float64
   for scale.

The variants themselves are the contender registry's (`benchmarks/common/contenders.py`).

    python benchmarks/claims/beyond.py          # full: results/beyond/ (~20 min, 2 shared cores)
    python benchmarks/claims/beyond.py --quick  # every code path at tiny sizes (the tests')
    python benchmarks/claims/beyond.py --parts storage --out-dir benchmarks/results/beyond_rounding
                                           # part 2 alone (~1 h on 2 shared cores)
    python benchmarks/claims/beyond.py --parts storage --methods optim_zoo.came --out-dir ...
                                           # part 2 for some of the optimizers only
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np

import optim_zoo
from benchmarks.claims import protocol
from benchmarks.claims import tasks as tasks_lib
from benchmarks.claims.protocol import BASELINE, SEEDS, Method
from benchmarks.common import contenders, report
from benchmarks.common.environment import (
    COMPILER_OPTIONS,
    RESULTS_DIR,
    display_path,
    environment,
    git_state,
)
from benchmarks.common.traffic import find_states, second_moment_floats, tree_bytes
from fixtures import goldens
from fixtures.trajectories import run_golden

DEFAULT_OUT_DIR = RESULTS_DIR / "beyond"
QUICK_OUT_DIR = RESULTS_DIR / "beyond_quick"
STUDY_JSON = RESULTS_DIR / "study" / "study.json"

# As the Adafactor contender: every weight matrix of the study's models has both axes >= 8.
MIN_DIM_SIZE_TO_FACTOR = 8
GOLDEN_STEPS = {"full": (5, 200), "quick": (5, 20)}
# Quick mode runs every code path once: one neural task (with the Hessian, factored matrices) and
# one landscape (nothing to factor), and the first golden configuration of each optimizer.
QUICK_TASKS = ("digits_mlp", "quadratic")

# Each factored variant's name -> the study's optimizer whose factored combination it is.
FACTORED = {
    "optim_zoo.factored_adan": "optim_zoo.adan",
    "optim_zoo.factored_adai": "optim_zoo.adai",
    "optim_zoo.factored_adai(decoupled=True)": "optim_zoo.adaiw",
}
BF16_SUFFIX = " [bf16 state]"
BF16_SR_SUFFIX = " [bf16 state, stochastic rounding]"
PARTS = ("factored", "storage", "golden")


def _study_method(name: str) -> Method:
    return next(m for m in protocol.METHODS if m.name == name)


def factored_methods() -> tuple[Method, ...]:
    """The factored variants: the original's main-job arguments, its grid centre, factoring."""
    methods = []
    for name, original in FACTORED.items():
        base = _study_method(original)
        variant = contenders.factored(base.contender, name, MIN_DIM_SIZE_TO_FACTOR)
        methods.append(Method(variant, base.center_lr))
    return tuple(methods)


# The optim_zoo optimizers of the committed study, whose best rates this study reuses.
ORIGINALS = (
    "optim_zoo.adan",
    "optim_zoo.adafactor",
    "optim_zoo.apollo",
    "optim_zoo.adai",
    "optim_zoo.adaiw",
    "optim_zoo.came",
)


def original_methods(names: Sequence[str] = ORIGINALS) -> tuple[Method, ...]:
    """The committed study's optim_zoo optimizers `names` (of `ORIGINALS`), unchanged (float32
    state), in the study's order."""
    unknown = set(names) - set(ORIGINALS)
    if unknown:
        raise ValueError(f"methods {sorted(unknown)} are not among {ORIGINALS}")
    return tuple(m for m in protocol.METHODS if m.name in names)


def bf16_state_method(method: Method, *, stochastic: bool = False) -> Method:
    """`method` with its moments stored in bfloat16 (`contenders.bf16_state`), rounded to
    nearest or, with `stochastic`, with ``state_rounding="stochastic"``."""
    name = method.contender.name + (BF16_SR_SUFFIX if stochastic else BF16_SUFFIX)
    variant = contenders.bf16_state(method.contender, name, stochastic=stochastic)
    return Method(variant, method.center_lr)


# --- Which leaves are factored ------------------------------------------------------------------


def factored_leaves(task: tasks_lib.Task, method: Method) -> dict[str, Any]:
    """The parameter leaves whose second moment the method keeps as a row and a column."""
    params, state = protocol.state_shapes(task, method)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    kinds = (optim_zoo.FactoredSecondMoment, optim_zoo.ScaleByFactoredRmsState)
    factored = []
    for stats in find_states(state, kinds):
        for i, (path, leaf) in enumerate(leaves):
            if stats.v_row[i] is not None:
                factored.append(
                    {
                        "param": jax.tree_util.keystr(path),
                        "shape": [int(d) for d in leaf.shape],
                        "second_moment_floats": second_moment_floats(stats, i),
                        "full_floats": int(math.prod(leaf.shape)),
                    }
                )
    return {
        "factored": len(factored),
        "leaves": len(leaves),
        "matrices": sum(len(leaf.shape) == 2 for _, leaf in leaves),
        "details": factored,
    }


# --- Comparing final metrics over seeds ---------------------------------------------------------


def compare_finals(variant: dict[str, Any], reference: dict[str, Any], higher: bool) -> dict:
    """Variant against reference on one final metric, each a `protocol.seed_summary`.

    "worse" (or "better") when the means differ by more than the larger of the two seed
    standard deviations in the worse (better) direction, as in the study's Apollo claim;
    otherwise "level". A diverged run is worse than any finite one. `paired` is the mean and
    standard deviation of the per-seed differences (variant - reference) when both ran the same
    seeds.
    """
    v_finite, r_finite = variant["finite"], reference["finite"]
    result: dict[str, Any] = {"difference": None, "tolerance": None, "paired": None}
    if not (v_finite and r_finite):
        if v_finite == r_finite:
            result["verdict"] = "both diverged"
        else:
            result["verdict"] = "worse" if not v_finite else "better"
        return result
    difference = variant["mean"] - reference["mean"]
    gain = difference if higher else -difference
    tolerance = max(variant["std"], reference["std"])
    result["difference"] = difference
    result["tolerance"] = tolerance
    result["verdict"] = "worse" if gain < -tolerance else "better" if gain > tolerance else "level"
    pairs = np.asarray(variant["per_seed"], np.float64) - np.asarray(
        reference["per_seed"], np.float64
    )
    result["paired"] = {
        "mean": float(pairs.mean()),
        "std": float(pairs.std(ddof=1)) if len(pairs) > 1 else 0.0,
    }
    return result


def _compare_all(variant: dict, reference: dict, task: dict[str, Any]) -> dict[str, Any]:
    higher = set(task["higher_is_better"])
    return {
        metric: compare_finals(
            variant["final"][metric], reference["final"][metric], metric in higher
        )
        for metric in task["metric_labels"]
    }


def _max_seed_difference(row: dict, reference: dict, metrics: Sequence[str]) -> float | None:
    """Largest |row - reference| over seeds and metrics (None if either diverged anywhere)."""
    worst = 0.0
    for metric in metrics:
        a = np.asarray(row["final"][metric]["per_seed"], np.float64)
        b = np.asarray(reference["final"][metric]["per_seed"], np.float64)
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            return None
        worst = max(worst, float(np.max(np.abs(a - b))))
    return worst


# --- Training at one fixed learning rate --------------------------------------------------------


def run_fixed_rate(
    runner: protocol.TaskRunner, method: Method, learning_rate: float, progress: bool
) -> dict[str, Any]:
    """The four seeds side by side at one learning rate (no selection); a study-like row."""
    started = time.perf_counter()
    task = runner.task
    curves, _ = runner.trainer(method).run(
        [learning_rate] * len(SEEDS),
        SEEDS,
        f"{task.name} {method.name.split('.')[-1]} lr {learning_rate:g}",
        progress,
    )
    _, state = protocol.state_shapes(task, method)
    return {
        "optimizer": method.name,
        "fixed_hyperparameters": method.fixed_hyperparameters(task.steps),
        "lr": learning_rate,
        "seeds": list(SEEDS),
        **protocol.summarise_curves(task, curves, per_seed=False),
        "state_bytes": tree_bytes(state),
        "seconds": time.perf_counter() - started,
    }


# --- One task -----------------------------------------------------------------------------------


def run_task(
    name: str,
    mode: str,
    originals: dict[str, Any],
    progress: bool,
    parts: Sequence[str] = PARTS,
    stored: Sequence[str] = ORIGINALS,
) -> dict[str, Any]:
    """Parts 1 and 2 (those in `parts`) on one task, part 2 for the optimizers `stored`;
    `originals` is the committed study's entry for the task."""
    sizes = tasks_lib.FULL if mode == "full" else tasks_lib.QUICK
    task = tasks_lib.TASK_BUILDERS[name](sizes)
    runner = protocol.TaskRunner(task, mode)

    methods = factored_methods() if "factored" in parts else ()
    if methods:
        result = protocol.run_task(task, methods, mode, progress, runner=runner)
    else:  # part 2 alone: the task's description, no protocol run
        result = {
            "name": task.name,
            "title": task.title,
            "family": task.family,
            "steps": task.steps,
            "metric_labels": task.metric_labels,
            "higher_is_better": list(task.higher_is_better),
            "results": {},
        }
    for method in methods:
        row = result["results"][method.name]
        original = FACTORED[method.name]
        row["original"] = original
        row["factored_leaves"] = factored_leaves(task, method)
        row["vs_original"] = _compare_all(row, originals["results"][original], result)
        row["vs_adamw"] = _compare_all(row, originals["results"][BASELINE], result)
        # On the landscapes nothing is factored: the variant must repeat its original's runs.
        row["max_difference_from_original"] = _max_seed_difference(
            row, originals["results"][original], task.metric_labels
        )
    result["factored"] = result.pop("results")

    storage = {}
    for method in original_methods(stored) if "storage" in parts else ():
        learning_rate = originals["results"][method.name]["best_lr"]
        float32 = run_fixed_rate(runner, method, learning_rate, progress)
        bfloat16 = run_fixed_rate(runner, bf16_state_method(method), learning_rate, progress)
        rounded = bf16_state_method(method, stochastic=True)
        stochastic = run_fixed_rate(runner, rounded, learning_rate, progress)
        storage[method.name] = {
            "lr": learning_rate,
            "float32": float32,
            "bfloat16": bfloat16,
            "bfloat16_stochastic": stochastic,
            "bf16_vs_f32": _compare_all(bfloat16, float32, result),
            "bf16_sr_vs_f32": _compare_all(stochastic, float32, result),
            "bf16_sr_vs_bf16": _compare_all(stochastic, bfloat16, result),
            "bytes_saved": float32["state_bytes"] - bfloat16["state_bytes"],
            # The float32 rerun against the committed study's four runs (meaningful in full
            # mode only): its seed 0 ran in a batch of four rather than in the grid's batch.
            "f32_max_difference_from_study": _max_seed_difference(
                float32, originals["results"][method.name], task.metric_labels
            ),
        }
    result["bf16_state"] = storage
    return result


# --- Part 3: the golden problem -----------------------------------------------------------------


def _golden_run(
    case: str, variant: str, state_dtype: Any, dtype: Any, steps: int, options: dict | None
) -> list[dict[str, np.ndarray]]:
    """Params after each step of a golden configuration, every state dtype forced."""
    make_tx = functools.partial(
        goldens.make_package_tx,
        case,
        variant,
        dtype_momentum=state_dtype,
        dtype_second_moment=state_dtype,
    )
    return run_golden(make_tx, goldens.CASES[case][0], dtype, steps, options)


def _max_abs(tree: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(v))) for v in tree.values())


def _max_abs_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[n] - b[n]))) for n in a)


def golden_deviations(mode: str, progress: bool) -> dict[str, Any]:
    """Every package configuration of the golden tests: bf16 vs float32 state, float32 params."""
    steps = GOLDEN_STEPS[mode]
    options = COMPILER_OPTIONS[mode]
    golden_cases = goldens.load_golden()["cases"]
    f32, f64 = jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)
    configurations = list(goldens.PACKAGE_CASES)
    if mode == "quick":
        # The first configuration of each optimizer: a case name's first word names it.
        firsts: dict[str, tuple[str, str]] = {}
        for case, variant in configurations:
            firsts.setdefault(case.split("_")[0], (case, variant))
        configurations = list(firsts.values())
    rows = []
    for case, variant in configurations:
        names = goldens.CASES[case][0]
        run = functools.partial(_golden_run, case, variant, steps=max(steps), options=options)
        with jax.enable_x64(True):
            # Built inside the x64 context, or the float64 dtypes would become float32.
            exact = run(f64, f64)
        single = run(f32, f32)
        half = run(contenders.BF16, f32)
        expected = goldens.golden_values(golden_cases[case], names)
        row = {
            "case": case,
            "variant": variant,
            # The float64 run is the golden configuration: it must reproduce the 5-step golden.
            "float64_vs_golden_5_steps": _max_abs_difference(
                exact[goldens.NUM_STEPS - 1], expected
            ),
            "steps": {},
        }
        for count in steps:
            scale = _max_abs(exact[count - 1])
            f32_dev = _max_abs_difference(single[count - 1], exact[count - 1])
            bf16_dev = _max_abs_difference(half[count - 1], single[count - 1])
            row["steps"][str(count)] = {
                "max_abs_p": scale,
                "f32_vs_f64": f32_dev,
                "f32_vs_f64_relative": f32_dev / scale,
                "bf16_vs_f32": bf16_dev,
                "bf16_vs_f32_relative": bf16_dev / scale,
            }
        rows.append(row)
        if progress:
            print(f"golden {case} {variant}: done", file=sys.stderr, flush=True)
    return {"steps": list(steps), "cases": rows}


# --- Reports ------------------------------------------------------------------------------------


def _headline(task: dict[str, Any]) -> str:
    """The metric each task is judged by here: test accuracy, validation loss, or f."""
    return next(m for m in ("test_accuracy", "val_loss", "loss") if m in task["metric_labels"])


def _fmt_range(summary: dict[str, Any], metric: str) -> str:
    text = report.fmt_summary(summary, metric)
    if not summary["finite"]:
        return text
    if metric.endswith("accuracy"):
        return f"{text} [{summary['min']:.2%}, {summary['max']:.2%}]"
    return f"{text} [{summary['min']:.3g}, {summary['max']:.3g}]"


def _fmt_delta(value: float | None, metric: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2%}" if metric.endswith("accuracy") else f"{value:+.3g}"


def factored_table(task: dict[str, Any], originals: dict[str, Any]) -> str:
    metrics = list(task["metric_labels"])
    rows = [(BASELINE, originals["results"][BASELINE], "study")]
    for name, row in task["factored"].items():
        original = row["original"]
        rows.append((original, originals["results"][original], "study"))
        rows.append((name, row, "here"))
    has_hessian = "hessian_top_eigenvalue" in rows[-1][1]
    header = ["optimizer", "run", "chosen lr", *(f"final {m}" for m in metrics)]
    header += ["top Hessian eig."] if has_hessian else []
    header += ["state bytes", "factored leaves"]
    table = []
    for name, row, source in rows:
        cells = [name, source]
        cells.append(f"{row['best_lr']:g}" + (" (edge)" if row["best_lr_at_grid_edge"] else ""))
        cells += [_fmt_range(row["final"][m], m) for m in metrics]
        if has_hessian:
            cells.append(report.fmt_summary(row["hessian_top_eigenvalue"], "eig"))
        cells.append(f"{row['state_bytes']:,}")
        leaves = row.get("factored_leaves")
        cells.append(
            "" if leaves is None else f"{leaves['factored']} of {leaves['matrices']} matrices"
        )
        table.append(cells)
    return report.markdown_table(header, table, left=2)


def _metrics_judged(comparison: dict[str, Any], verdict: str) -> list[str]:
    """The metrics of a `_compare_all` result with the given verdict."""
    return [metric for metric, c in comparison.items() if c["verdict"] == verdict]


def _judged_cells(comparison: dict[str, Any]) -> list[str]:
    """The worse and the better metrics, each joined (or '-')."""
    return [", ".join(_metrics_judged(comparison, v)) or "-" for v in ("worse", "better")]


def factored_verdicts(tasks: dict[str, Any]) -> str:
    header = [
        "task",
        "variant",
        "vs original: worse",
        "vs original: better",
        "headline vs original",
        "headline vs AdamW",
    ]
    rows = []
    for task in tasks.values():
        headline = _headline(task)
        for name, row in task["factored"].items():
            head = row["vs_original"][headline]
            vs_adamw = row["vs_adamw"][headline]
            rows.append(
                [
                    task["name"],
                    name,
                    *_judged_cells(row["vs_original"]),
                    f"{headline} {head['verdict']} ({_fmt_delta(head['difference'], headline)})",
                    f"{vs_adamw['verdict']} ({_fmt_delta(vs_adamw['difference'], headline)})",
                ]
            )
    return report.markdown_table(header, rows, left=len(header))


def _fmt_paired(comparison: dict[str, Any], metric: str) -> str:
    paired = comparison["paired"]
    if paired is None:
        return "n/a"
    std = f"{paired['std']:.2%}" if metric.endswith("accuracy") else f"{paired['std']:.2g}"
    return f"{_fmt_delta(paired['mean'], metric)} ± {std}"


def storage_table(task: dict[str, Any]) -> str:
    lines = [
        "| optimizer | lr | metric | float32 state | bf16, nearest | paired Δ (nearest - f32) "
        "| verdict | bf16, stochastic | paired Δ (stochastic - f32) | verdict "
        "| stochastic vs nearest |",
        "|---|--:|---|--:|--:|--:|---|--:|--:|---|---|",
    ]
    for name, entry in task["bf16_state"].items():
        for metric in task["metric_labels"]:
            nearest = entry["bf16_vs_f32"][metric]
            cells = [
                name,
                f"{entry['lr']:g}",
                metric,
                _fmt_range(entry["float32"]["final"][metric], metric),
                _fmt_range(entry["bfloat16"]["final"][metric], metric),
                _fmt_paired(nearest, metric),
                nearest["verdict"],
            ]
            if "bfloat16_stochastic" in entry:
                stochastic = entry["bf16_sr_vs_f32"][metric]
                cells += [
                    _fmt_range(entry["bfloat16_stochastic"]["final"][metric], metric),
                    _fmt_paired(stochastic, metric),
                    stochastic["verdict"],
                    entry["bf16_sr_vs_bf16"][metric]["verdict"],
                ]
            else:
                cells += ["not run"] * 4
            lines.append(report.markdown_row(cells))
    return "\n".join(lines)


def storage_bytes_table(tasks: dict[str, Any]) -> str:
    names = list(next(iter(tasks.values()))["bf16_state"])  # the optimizers part 2 ran
    rows = []
    for task in tasks.values():
        cells = [task["name"]]
        for name in names:
            entry = task["bf16_state"][name]
            f32, bf16 = entry["float32"]["state_bytes"], entry["bfloat16"]["state_bytes"]
            cells.append(f"{f32:,} → {bf16:,} (-{entry['bytes_saved'] / f32:.0%})")
        rows.append(cells)
    return report.markdown_table(["task", *names], rows)


def storage_verdicts(tasks: dict[str, Any]) -> str:
    header = [
        "task",
        "optimizer",
        "nearest vs f32: worse",
        "better",
        "stochastic vs f32: worse",
        "better",
        "f32 rerun vs study (max abs)",
    ]
    rows = []
    for task in tasks.values():
        for name, entry in task["bf16_state"].items():
            repro = entry["f32_max_difference_from_study"]
            stochastic = entry.get("bf16_sr_vs_f32")
            rows.append(
                [
                    task["name"],
                    name,
                    *_judged_cells(entry["bf16_vs_f32"]),
                    *(["not run"] * 2 if stochastic is None else _judged_cells(stochastic)),
                    "n/a" if repro is None else f"{repro:.2g}",
                ]
            )
    return report.markdown_table(header, rows, left=6)


def golden_table(golden: dict[str, Any]) -> str:
    steps = [str(s) for s in golden["steps"]]
    header = ["case", "variant", "f64 vs golden"]
    for s in steps:
        header += [
            f"{s} steps: max abs p",
            f"{s}: f32 vs f64",
            f"{s}: bf16 vs f32",
            f"{s}: bf16 vs f32 / max abs p",
        ]
    rows = []
    for row in golden["cases"]:
        cells = [row["case"], row["variant"], f"{row['float64_vs_golden_5_steps']:.1e}"]
        for s in steps:
            d = row["steps"][s]
            cells += [
                f"{d['max_abs_p']:.3g}",
                f"{d['f32_vs_f64']:.1e}",
                f"{d['bf16_vs_f32']:.1e}",
                f"{d['bf16_vs_f32_relative']:.1e}",
            ]
        rows.append(cells)
    return report.markdown_table(header, rows, left=2)


def _worse_list(tasks: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    factored, storage, stochastic = [], [], []
    for task in tasks.values():
        for name, row in task["factored"].items():
            for metric in _metrics_judged(row["vs_original"], "worse"):
                c = row["vs_original"][metric]
                factored.append(
                    f"{name} on {task['name']}, {metric}: "
                    f"{_fmt_delta(c['difference'], metric)} against {row['original']} "
                    f"(one std: {_fmt_delta(c['tolerance'], metric).lstrip('+')})"
                )
        for name, entry in task["bf16_state"].items():
            for metric in _metrics_judged(entry["bf16_vs_f32"], "worse"):
                difference = entry["bf16_vs_f32"][metric]["difference"]
                storage.append(
                    f"{name} on {task['name']}, {metric}: "
                    f"{_fmt_delta(difference, metric)} against float32 state"
                )
            for metric in _metrics_judged(entry.get("bf16_sr_vs_f32", {}), "worse"):
                difference = entry["bf16_sr_vs_f32"][metric]["difference"]
                stochastic.append(
                    f"{name} on {task['name']}, {metric}: "
                    f"{_fmt_delta(difference, metric)} against float32 state"
                )
    return factored, storage, stochastic


def _listed(what: str, items: list[str]) -> str:
    return f"{what}: {'; '.join(items) if items else 'none'}."


def markdown_report(results: dict[str, Any]) -> str:
    env = results["environment"]
    tasks = results["tasks"]
    factored_worse, storage_worse, stochastic_worse = _worse_list(tasks)
    parts_run = results.get("parts", list(PARTS))
    parts = [
        f"# Beyond the papers: factored Adan and Adai, bfloat16 state ({results['mode']} mode)",
        "",
        f"Total time {results['runtime_seconds']:.0f} s on {env['cpu_count']} CPU cores (jax "
        f"{env['jax']}, optax {env['optax']}, Python {env['python']}). Seeds "
        f"{', '.join(map(str, SEEDS))}; values are mean ± standard deviation [min, max] over "
        "them. Originals and AdamW are the committed study's (`results/study/study.json`).",
        "",
    ]
    if results["mode"] == "quick":
        parts += [
            "**Quick mode**: tiny models and a few dozen steps, compared with the full study's "
            "numbers; the comparisons below exercise the code and mean nothing.",
            "",
        ]
    parts += [
        "A variant is **worse** (better) on a metric when its mean is worse (better) than the "
        "reference's by more than the larger of the two seed standard deviations; otherwise "
        "level. A diverged run is worse than a finite one.",
        "",
    ]
    if "factored" in parts_run:
        parts += [
            "## 1. Factored variants, the study's full protocol",
            "",
            factored_verdicts(tasks),
            "",
            _listed("Worse than the original by more than one seed std", factored_worse),
            "",
        ]
        for task in tasks.values():
            originals = results["study_tasks"][task["name"]]
            parts += [f"### {task['name']}", "", factored_table(task, originals), ""]
    if "storage" in parts_run:
        parts += [
            "## 2. bfloat16 state storage at the original's chosen rate (A/B of storage alone)",
            "",
            "bfloat16 state rounded to nearest (the default) and with stochastic rounding "
            '(`state_rounding="stochastic"`, seed 0), each against float32 state, the same '
            "seeds and learning rate.",
            "",
            "State bytes, float32 state → bfloat16 state:",
            "",
            storage_bytes_table(tasks),
            "",
            storage_verdicts(tasks),
            "",
            _listed("Worse with bfloat16 state by more than one seed std", storage_worse),
            "",
            _listed(
                "Worse with bfloat16 state and stochastic rounding by more than one seed std",
                stochastic_worse,
            ),
            "",
        ]
        for task in tasks.values():
            parts += [f"### {task['name']}", "", storage_table(task), ""]
    if results["golden"] is not None:
        parts += [
            "## 3. The golden problem: bfloat16 against float32 state, float32 params",
            "",
            "Max |Δp| over all elements after the given number of steps; `f32 vs f64` is the "
            "float32 run (float32 params and state) against the float64 run of the same "
            "configuration, for scale. `f64 vs golden`: the float64 run against the committed "
            "5-step golden.",
            "",
            golden_table(results["golden"]),
            "",
        ]
    return "\n".join(parts)


# --- Figure -------------------------------------------------------------------------------------


def make_figure(results: dict[str, Any], path: Path) -> Path:
    """Per task, the headline final metric: original, bfloat16 state, factored; AdamW's band."""
    tasks = results["tasks"]
    fig, axes = report.panel_grid(len(tasks), 5.4, 4.0)
    names = [m.name for m in original_methods()]
    variant_of = {
        row["original"]: name for name, row in next(iter(tasks.values()))["factored"].items()
    }
    series = (
        ("original (study)", "o", "C0", -0.24),
        ("float32 state (rerun)", "D", "C7", -0.12),
        ("bfloat16 state", "s", "C3", 0.0),
        ("bfloat16 state, stochastic rounding", "v", "C1", 0.12),
        ("factored", "^", "C2", 0.24),
    )
    for ax, task in zip(axes.flat, tasks.values(), strict=False):
        metric = _headline(task)
        originals = results["study_tasks"][task["name"]]["results"]
        scale = 100.0 if metric.endswith("accuracy") else 1.0
        for label, marker, color, offset in series:
            xs, means, spans = [], [], []
            for i, name in enumerate(names):
                storage = task["bf16_state"].get(name, {})
                runs = {
                    "float32 state (rerun)": "float32",
                    "bfloat16 state": "bfloat16",
                    "bfloat16 state, stochastic rounding": "bfloat16_stochastic",
                }
                if label == "original (study)":
                    summary = originals[name]["final"][metric]
                elif label in runs:
                    if runs[label] not in storage:
                        continue
                    summary = storage[runs[label]]["final"][metric]
                elif name in variant_of:
                    summary = task["factored"][variant_of[name]]["final"][metric]
                else:
                    continue
                if summary["finite"]:  # a diverged seed leaves the point out
                    xs.append(i + offset)
                    means.append(summary["mean"] * scale)
                    # Min to max over seeds: on a log axis a mean - std can be negative.
                    spans.append(
                        (
                            (summary["mean"] - summary["min"]) * scale,
                            (summary["max"] - summary["mean"]) * scale,
                        )
                    )
            ax.errorbar(
                xs,
                means,
                yerr=np.asarray(spans, np.float64).reshape(-1, 2).T,
                fmt=marker,
                color=color,
                label=label,
                capsize=3,
                ms=5,
            )
        adamw = originals[BASELINE]["final"][metric]
        if adamw["finite"]:
            ax.axhspan(
                adamw["min"] * scale,
                adamw["max"] * scale,
                color="gray",
                alpha=0.2,
                label="AdamW (study), min to max",
            )
        if task["family"] == "landscape":
            ax.set_yscale("log")
        ax.set_xticks(range(len(names)), [n.split(".")[-1] for n in names])
        ylabel = "test accuracy (%)" if metric == "test_accuracy" else f"final {metric}"
        ax.set(ylabel=ylabel, title=task["name"])
        ax.grid(True, axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize="x-small")
    fig.suptitle(
        "Final headline metric over the 4 seeds (mean, bars min to max): originals, bfloat16 "
        "state (nearest, stochastic rounding), factored variants"
    )
    report.save_figure(fig, path)
    return path


# --- Entry points -------------------------------------------------------------------------------


def run_beyond(
    mode: str = "quick",
    out_dir: Path | None = None,
    *,
    tasks: Sequence[str] | None = None,
    golden: bool = True,
    parts: Sequence[str] = PARTS,
    methods: Sequence[str] = ORIGINALS,
    study_json: Path = STUDY_JSON,
    progress: bool = True,
    figure: bool = True,
) -> dict[str, Any]:
    """Runs the three parts; writes beyond.json, beyond.md and (with figure) finals.png.

    Args:
      mode: "full" or "quick" (the study's tiny sizes; every code path in seconds).
      out_dir: default benchmarks/results/beyond (full) or .../beyond_quick (quick).
      tasks: names from `tasks.TASK_BUILDERS`; default all of them in full mode and
        `QUICK_TASKS` in quick mode.
      golden: also run part 3, the golden problem (when "golden" is in `parts`).
      parts: which of `PARTS` to run: "factored" (1), "storage" (2), "golden" (3).
      methods: the optimizers of part 2, of `ORIGINALS` (default all of them).
      study_json: the committed study, source of the originals and their chosen rates.
      progress: progress bars and tables on stderr.
      figure: also write the PNG.
    """
    if mode not in ("quick", "full"):
        raise ValueError(f"mode must be 'quick' or 'full', got {mode!r}")
    unknown_parts = set(parts) - set(PARTS)
    if unknown_parts:
        raise ValueError(f"parts {sorted(unknown_parts)} are not among {PARTS}")
    parts = [p for p in PARTS if p in parts]
    storage_methods = original_methods(methods)
    golden = golden and "golden" in parts
    out_dir = Path(out_dir or (DEFAULT_OUT_DIR if mode == "full" else QUICK_OUT_DIR))
    committed = json.loads(Path(study_json).read_text())
    if tasks is None:
        tasks = QUICK_TASKS if mode == "quick" else tuple(tasks_lib.TASK_BUILDERS)
    task_names = list(tasks)
    unknown = set(task_names) - set(committed["tasks"])
    if unknown:
        raise ValueError(f"tasks {sorted(unknown)} are not in {study_json}")

    version = git_state()  # before the runs: the code they import
    started = time.perf_counter()
    task_results = {}
    for name in task_names:
        task_results[name] = run_task(
            name, mode, committed["tasks"][name], progress, parts, methods
        )
        if progress:
            print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    golden_results = golden_deviations(mode, progress) if golden else None
    results = {
        "mode": mode,
        "parts": parts,
        "config": {
            "seeds": list(SEEDS),
            "min_dim_size_to_factor": MIN_DIM_SIZE_TO_FACTOR,
            "factored": {
                m.name: {"original": FACTORED[m.name], "kwargs": m.fixed_hyperparameters(1)}
                for m in factored_methods()
            },
            "bf16_state": {
                m.name: bf16_state_method(m).fixed_hyperparameters(1) for m in storage_methods
            },
            "bf16_state_stochastic": {
                m.name: bf16_state_method(m, stochastic=True).fixed_hyperparameters(1)
                for m in storage_methods
            },
            "neural_lr_factors": list(protocol.NEURAL_LR_FACTORS[mode]),
            "golden_steps": list(GOLDEN_STEPS[mode]),
            "study_json": display_path(study_json),
            "study_runtime_seconds": committed.get("runtime_seconds"),
        },
        "environment": {**environment(), "git": version},
        "tasks": task_results,
        # The committed originals' rows this report cites (finals and chosen rates only).
        "study_tasks": {
            name: {
                "results": {
                    method: {
                        key: row[key]
                        for key in (
                            "best_lr",
                            "best_lr_at_grid_edge",
                            "final",
                            "state_bytes",
                            "hessian_top_eigenvalue",
                        )
                        if key in row
                    }
                    for method, row in committed["tasks"][name]["results"].items()
                }
            }
            for name in task_names
        },
        "golden": golden_results,
    }
    results["runtime_seconds"] = time.perf_counter() - started
    results = report.json_safe(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    if figure:
        results["figures"] = [make_figure(results, out_dir / "finals.png").name]
    (out_dir / "beyond.json").write_text(json.dumps(results, allow_nan=False) + "\n")
    (out_dir / "beyond.md").write_text(markdown_report(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every code path")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument(
        "--tasks", default=None, help="comma-separated task names (default: all; quick: two)"
    )
    parser.add_argument("--no-golden", action="store_true", help="skip part 3")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}"
    )
    parser.add_argument(
        "--methods",
        default=",".join(ORIGINALS),
        help="comma-separated optimizers of part 2 (default: all six)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    results = run_beyond(
        "quick" if args.quick else "full",
        args.out_dir,
        tasks=args.tasks.split(",") if args.tasks else None,
        golden=not args.no_golden,
        parts=args.parts.split(","),
        methods=args.methods.split(","),
        progress=not args.no_progress,
    )
    print(markdown_report(results))
    return results


if __name__ == "__main__":
    main()
