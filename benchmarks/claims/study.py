"""The study: each paper's claim tested on small problems anyone can rerun offline.

Six tasks (`benchmarks/claims/tasks.py`): scikit-learn's digits with the main job's MLP and with a
small CNN, a character-level transformer on CPython's offline language reference, an
ill-conditioned quadratic, Rosenbrock, and a noisy quadratic. Every optimizer of the main job
runs on every task under one protocol (`benchmarks/claims/protocol.py`): a learning-rate grid on
seed 0, then the chosen rate on seeds 1, 2 and 3. The claims
(`benchmarks/claims/paper_claims.py` states each test and its threshold) are evaluated on the
results and reported PASS or FAIL with their numbers, whichever way they go. This
module runs it all and writes the tables and figures.

    python benchmarks/claims/study.py --mode full   # the committed results, < 30 min on 2 cores
    python benchmarks/claims/study.py --mode quick  # every code path in seconds (the tests')
    python benchmarks/compare.py --study full       # the same, through the main job's script
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from benchmarks.claims import tasks as tasks_lib
from benchmarks.claims.paper_claims import (
    ADAI_EARLY_FRACTION,
    ADAN_STEP_FRACTION,
    SGD,
    evaluate_claims,
    factored_matrix_report,
    need,
)
from benchmarks.claims.protocol import (
    APOLLO_WARMUP_FRACTION,
    BASELINE,
    HESSIAN_ITERATIONS,
    METHODS,
    NEURAL_LR_FACTORS,
    SCHEDULES,
    SEEDS,
    SELECTION_SEED,
    WARMUP_FRACTION,
    TaskRunner,
    landscape_lr_grid,
    run_task,
)
from benchmarks.common import report
from benchmarks.common.environment import RESULTS_DIR, environment

DEFAULT_OUT_DIR = RESULTS_DIR / "study"
QUICK_OUT_DIR = RESULTS_DIR / "study_quick"


# --- Tables ------------------------------------------------------------------------------------


def shared_grid(task: dict[str, Any]) -> list[float] | None:
    grids = [r["lr_grid"] for r in task["results"].values()]
    return grids[0] if len(grids) > 1 and all(g == grids[0] for g in grids) else None


def task_table(task: dict[str, Any]) -> str:
    metrics = list(task["metric_labels"])
    results = task["results"].values()
    has_hessian = any("hessian_top_eigenvalue" in r for r in results)
    # A grid shared by every optimizer is stated once, above the table (`shared_grid`).
    per_method_grid = shared_grid(task) is None
    header = ["optimizer", *(["lr grid"] if per_method_grid else []), "chosen lr"]
    header += [f"final {m}" for m in metrics]
    if has_hessian:
        header.append("top Hessian eig.")
    header += ["state bytes", "seconds"]
    rows = []
    for r in results:
        cells = [r["optimizer"]]
        if per_method_grid:
            cells.append(", ".join(f"{lr:g}" for lr in r["lr_grid"]))
        cells.append(f"{r['best_lr']:g}" + (" (edge)" if r["best_lr_at_grid_edge"] else ""))
        cells += [report.fmt_summary(r["final"][m], m) for m in metrics]
        if has_hessian:
            cells.append(report.fmt_summary(r["hessian_top_eigenvalue"], "eig"))
        cells += [f"{r['state_bytes']:,}", f"{r['seconds']:.1f}"]
        rows.append(cells)
    return report.markdown_table(header, rows, left=2 + per_method_grid)


def claims_table(claims: dict[str, Any]) -> str:
    lines = ["| claim | task | check | value | threshold | result |", "|---|---|---|--:|--:|---|"]
    for name, claim in claims.items():
        if not claim["checks"]:
            lines.append(f"| {name} | | not run | | | NOT RUN |")
        for c in claim["checks"]:
            value = c["value"]
            if value is None or not math.isfinite(value):  # null in JSON: never reached
                value = "n/a"
            else:
                value = f"{value:.4g}"
            threshold = "" if c["threshold"] is None else f"{c['threshold']:.4g}"
            verdict = "pass" if c["pass"] else "fail"
            lines.append(
                f"| {name} | {c['task']} | {c['check']} | {value} | {threshold} | {verdict} |"
            )
    return "\n".join(lines)


SCHEDULE_TITLES = {
    "constant": "constant learning rate",
    "warmup_cosine": (
        f"the papers' schedule (linear warmup over the first {WARMUP_FRACTION:.0%} of the steps, "
        "then cosine decay to zero)"
    ),
}


def protocols(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each schedule's tasks, claims and claims table: "constant", then `results["schedules"]`."""
    constant = {key: results[key] for key in ("tasks", "claims", "claims_table")}
    return {"constant": constant, **results.get("schedules", {})}


def _adan_supplementary(claims: dict[str, Any]) -> list[str]:
    parts = []
    for check in claims["adan"]["checks"]:
        extra = check["supplementary"]
        reached = (
            "does not reach it within the run"
            if extra["fraction"] is None
            else f"reaches it after {extra['fraction']:.2f} of the steps"
        )
        parts.append(
            f"Adan on {check['task']}, {extra['description']}: AdamW at lr {extra['adamw_lr']:g} "
            f"ends at a training loss of {extra['adamw_final_train_loss']:.4g}; Adan at lr "
            f"{extra['adan_lr']:g} {reached}."
        )
        parts.append("")
    return parts


def _task_section(task: dict[str, Any], heading: str) -> list[str]:
    grid = shared_grid(task)
    return [
        f"{heading} {task['name']}: {task['title']}",
        "",
        f"{task['steps']} steps, {task['param_count']:,} parameters; learning rate chosen by "
        f"final {' then '.join(task['select'])} on seed {SELECTION_SEED}"
        + (
            f", from the grid {', '.join(f'{lr:g}' for lr in grid)} (every optimizer)."
            if grid is not None
            else "."
        ),
        "",
        task_table(task),
        "",
    ]


def markdown_report(results: dict[str, Any]) -> str:
    runs = protocols(results)
    parts = [
        f"# optim_zoo study ({results['mode']} mode)",
        "",
        f"Total time {results['runtime_seconds']:.0f} s on {results['environment']['cpu_count']}"
        f" CPU cores (jax {results['environment']['jax']}, optax "
        f"{results['environment']['optax']}, Python {results['environment']['python']}). "
        "Values are mean ± standard deviation over seeds "
        f"{', '.join(map(str, results['config']['seeds']))} at the chosen learning rate; "
        "the seconds column (compilation included) varies between runs, nothing else does.",
        "",
        "## Claims",
        "",
        "Every claim is tested under each learning-rate schedule, with the rate chosen again from "
        "the grid under each: "
        + "; ".join(
            f"**{name}**, {SCHEDULE_TITLES[name]}, on {', '.join(run['tasks'])}"
            for name, run in runs.items()
        )
        + ".",
        "",
    ]
    for name, claim in results["claims"].items():
        verdicts = ", ".join(f"{run['claims'][name]['verdict']} ({s})" for s, run in runs.items())
        parts.append(f"- **{name}: {verdicts}.** {claim['claim']}")
    parts.append("")
    for name, run in runs.items():
        parts += [f"### Checks: {SCHEDULE_TITLES[name]}", "", run["claims_table"], ""]
        parts += _adan_supplementary(run["claims"])
    for task in results["tasks"].values():
        parts += _task_section(task, "##")
    for name, run in runs.items():
        if name == "constant":
            continue
        parts += [f"## Under {SCHEDULE_TITLES[name]}", ""]
        for task in run["tasks"].values():
            parts += _task_section(task, "###")
    return "\n".join(parts)


# --- Figures -----------------------------------------------------------------------------------


def _log_scale(metric: str, task: dict[str, Any]) -> bool:
    # Language-model losses stay within a factor of a few; everything else spans decades.
    return metric != "test_accuracy" and task["name"] != "char_transformer"


def _task_figure(task: dict[str, Any], path: Path) -> None:
    metrics = task["plot_metrics"]
    fig, axes = report.pyplot().subplots(
        1, len(metrics), figsize=(5.2 * len(metrics), 4.2), constrained_layout=True, squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        for row in task["results"].values():
            report.band(ax, row, metric)
        ax.set(xlabel="step", ylabel=task["metric_labels"][metric])
        if _log_scale(metric, task):
            ax.set_yscale("log")
        if metric == "test_accuracy":
            finals = [r["final"]["test_accuracy"]["mean"] for r in task["results"].values()]
            ax.set_ylim(report.accuracy_floor(finals), 1.0)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    fig.suptitle(
        f"{task['title']}\nmean over seeds (lines), min to max (bands), each at its chosen lr",
        fontsize="medium",
    )
    report.save_figure(fig, path)


def _lr_figure(tasks: dict[str, Any], path: Path) -> None:
    fig, axes = report.panel_grid(len(tasks), 5, 3.9)
    for ax, task in zip(axes.flat, tasks.values(), strict=False):
        metric = task["select"][0]
        for row in task["results"].values():
            scores = np.asarray(row["grid_final"][metric], np.float64)  # null: diverged
            ax.plot(
                row["lr_grid"],
                scores,
                marker="o",
                label=row["optimizer"],
                **report.style(row["optimizer"]),
            )
        start = max(r["curves"][metric]["mean"][0] for r in task["results"].values())
        if metric in task["higher_is_better"]:
            # Accuracies near the top differ by single images; failed runs sit below the frame.
            ax.set(xscale="log", ylim=(0.9, 1.0))
        elif _log_scale(metric, task):
            ax.set(xscale="log", yscale="log")
            ax.set_ylim(top=2 * start)  # worse than the start: failed, above the frame
        else:
            ax.set(xscale="log", ylim=(None, start))
        ax.set(xlabel="learning rate", ylabel=f"final {metric} (seed {SELECTION_SEED})")
        ax.set_title(task["name"])
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize="x-small")
    fig.suptitle(
        "Learning-rate grids: the selection metric at every grid point "
        "(gaps: diverged; outside the frame: failed)"
    )
    report.save_figure(fig, path)


def _two_panels():
    return report.pyplot().subplots(1, 2, figsize=(11, 4.2), constrained_layout=True, squeeze=False)


def _claim_adan_figure(tasks, claims, path: Path) -> None:
    checks = {c["task"]: c for c in claims["adan"]["checks"]}
    fig, axes = _two_panels()
    for ax, name in zip(axes[0], ("digits_cnn", "char_transformer"), strict=True):
        if name not in checks:
            ax.set_axis_off()
            continue
        results = tasks[name]["results"]
        for method in ("optim_zoo.adan", BASELINE):
            report.band(ax, results[method], "train_loss")
        target = results[BASELINE]["final"]["train_loss"]["mean"]
        ax.axhline(target, color="gray", linewidth=0.8, label="AdamW's final loss")
        steps = tasks[name]["steps"]
        ax.axvline(ADAN_STEP_FRACTION * steps, color="gray", linestyle=":", label="60% of steps")
        fraction = checks[name]["value"]  # None: never reached
        if fraction is not None:
            ax.axvline(fraction * steps, color="C0", linewidth=0.8, label="Adan reaches it")
        ax.set(yscale="log", xlabel="step", ylabel="training loss")
        reached = "never" if fraction is None else f"{fraction:.2f} of the steps"
        ax.set_title(f"{name}: {reached} ({'pass' if checks[name]['pass'] else 'fail'})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"Adan vs AdamW: {claims['adan']['verdict']}")
    report.save_figure(fig, path)


def _claim_adai_figure(tasks, claims, path: Path) -> None:
    names = [
        n for n in ("digits_mlp", "digits_cnn") if need(tasks, n, "optim_zoo.adai", BASELINE, SGD)
    ]
    fig, axes = report.pyplot().subplots(
        len(names) or 1,
        3,
        figsize=(15, 3.8 * max(1, len(names))),
        constrained_layout=True,
        squeeze=False,
    )
    for ax_row, name in zip(axes, names, strict=False):
        results = tasks[name]["results"]
        early = int(tasks[name]["steps"] * 0.4)
        for method in ("optim_zoo.adai", BASELINE, SGD):
            report.band(ax_row[0], results[method], "train_loss")
        ax_row[0].axvline(ADAI_EARLY_FRACTION * tasks[name]["steps"], color="gray", linestyle=":")
        ax_row[0].set(xlim=(0, early), yscale="log", xlabel="step", ylabel="training loss")
        ax_row[0].set_title(f"{name}: early training")
        ax_row[0].legend(fontsize="small")
        rows = list(results.values())
        labels = [r["optimizer"].split(".")[-1] for r in rows]
        colors = [report.style(r["optimizer"])["color"] for r in rows]
        for ax, key, ylabel in (
            (ax_row[1], "hessian_top_eigenvalue", "top Hessian eigenvalue"),
            (ax_row[2], "test_accuracy", "test accuracy"),
        ):
            summaries = [r[key] if key in r else r["final"][key] for r in rows]
            means = np.asarray([s["mean"] for s in summaries], np.float64)
            errors = np.asarray([s["std"] for s in summaries], np.float64)
            ax.bar(labels, means, yerr=errors, color=colors, capsize=3)
            ax.set(ylabel=ylabel)
            ax.tick_params(axis="x", labelrotation=30)
            if key == "test_accuracy":
                ax.set_ylim(max(0.0, np.nanmin(means) - 0.03), min(1.0, np.nanmax(means) + 0.01))
            else:
                ax.set_yscale("log")
            ax.set_title(f"{name}: {ylabel}, mean ± std")
    fig.suptitle(
        f"Adai: early speed, flatness (top eigenvalue of the training loss's Hessian) and test "
        f"accuracy: {claims['adai']['verdict']}"
    )
    report.save_figure(fig, path)


def _claim_apollo_figure(tasks, claims, path: Path) -> None:
    fig, axes = _two_panels()
    for ax, (name, metric) in zip(
        axes[0], (("digits_cnn", "test_accuracy"), ("char_transformer", "val_loss")), strict=True
    ):
        results = need(tasks, name, "optim_zoo.apollo", BASELINE)
        if results is None:
            ax.set_axis_off()
            continue
        for method in ("optim_zoo.apollo", BASELINE):
            report.band(ax, results[method], metric)
        warmup = max(1, round(APOLLO_WARMUP_FRACTION * tasks[name]["steps"]))
        ax.axvspan(0, warmup, color="gray", alpha=0.15, label="Apollo's warmup")
        ax.set(xlabel="step", ylabel=tasks[name]["metric_labels"][metric], title=name)
        if metric == "test_accuracy":
            ax.set_ylim(0.8, 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"Apollo vs AdamW: {claims['apollo']['verdict']}")
    report.save_figure(fig, path)


def _claim_memory_figure(
    tasks, claims, claim: str, label: str, methods: Sequence[str], path: Path
) -> None:
    """A memory claim on the transformer: validation loss against AdamW's, and state bytes.

    For CAME, the dotted line at the parameters' bytes is its allowance over Adafactor's state.
    """
    results = need(tasks, "char_transformer", *methods, BASELINE)
    fig, axes = _two_panels()
    loss_ax, bytes_ax = axes[0]
    if results is not None:
        for method in (*methods, BASELINE):
            report.band(loss_ax, results[method], "val_loss")
        loss_ax.set(xlabel="step", ylabel="validation loss (nats/char)", title="char_transformer")
        loss_ax.grid(True, alpha=0.3)
        loss_ax.legend(fontsize="small")
        rows = list(results.values())
        bytes_ax.bar(
            [r["optimizer"].split(".")[-1] for r in rows],
            [r["state_bytes"] for r in rows],
            color=[report.style(r["optimizer"])["color"] for r in rows],
        )
        bytes_ax.axhline(
            tasks["char_transformer"]["param_bytes"], color="gray", linestyle=":", label="params"
        )
        bytes_ax.set(yscale="log", ylabel="optimizer state bytes", title="state size")
        bytes_ax.tick_params(axis="x", labelrotation=30)
        bytes_ax.legend(fontsize="small")
    fig.suptitle(f"{label} vs AdamW: {claims[claim]['verdict']}")
    report.save_figure(fig, path)


def _figures(tasks, claims, out_dir: Path, suffix: str) -> list[Path]:
    """One schedule's task, grid and claim figures, each file name ending in `suffix`."""
    paths = []
    for task in tasks.values():
        paths.append(out_dir / f"task_{task['name']}{suffix}.png")
        _task_figure(task, paths[-1])
    if tasks:
        paths.append(out_dir / f"lr_grids{suffix}.png")
        _lr_figure(tasks, paths[-1])
    figures = {
        "adan": lambda p: _claim_adan_figure(tasks, claims, p),
        "adai": lambda p: _claim_adai_figure(tasks, claims, p),
        "apollo": lambda p: _claim_apollo_figure(tasks, claims, p),
        "adafactor": lambda p: _claim_memory_figure(
            tasks, claims, "adafactor", "Adafactor", ("optim_zoo.adafactor",), p
        ),
        "came": lambda p: _claim_memory_figure(
            tasks, claims, "came", "CAME", ("optim_zoo.came", "optim_zoo.adafactor"), p
        ),
    }
    for name, draw in figures.items():
        if claims[name]["verdict"] != "NOT RUN":
            paths.append(out_dir / f"claim_{name}{suffix}.png")
            draw(paths[-1])
    return paths


def make_figures(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Writes the study's PNGs into out_dir; returns their paths.

    The constant-rate figures are named as before (`task_<name>.png`, `claim_<name>.png`, ...);
    another schedule's carry its name (`task_<name>_warmup_cosine.png`, ...).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, run in protocols(results).items():
        suffix = "" if name == "constant" else f"_{name}"
        paths += _figures(run["tasks"], run["claims"], out_dir, suffix)
    return paths


# --- Entry points ------------------------------------------------------------------------------


def run_study(
    mode: str = "quick",
    out_dir: Path | None = None,
    *,
    tasks: Sequence[str] | None = None,
    optimizers: Sequence[str] | None = None,
    progress: bool = True,
    figures: bool = True,
) -> dict[str, Any]:
    """Runs the study; writes study.json, study.md and (with figures) the PNGs to out_dir.

    Args:
      mode: "full" (the committed results) or "quick" (tiny sizes; every code path in seconds).
      out_dir: where to write; default benchmarks/results/study (full) or .../study_quick.
      tasks: names from `tasks.TASK_BUILDERS` to run (default all); claims whose
        tasks are missing are "NOT RUN".
      optimizers: names from `METHODS` to run (default all).
      progress: show progress bars on stderr.
      figures: also write the PNGs (`make_figures`).

    Returns:
      The JSON-serialisable results: config, environment, per-task tables and curves, claims.
    """
    if mode not in ("quick", "full"):
        raise ValueError(f"mode must be 'quick' or 'full', got {mode!r}")
    if out_dir is None:
        out_dir = DEFAULT_OUT_DIR if mode == "full" else QUICK_OUT_DIR
    out_dir = Path(out_dir)
    task_names = list(tasks_lib.TASK_BUILDERS) if tasks is None else list(tasks)
    unknown = set(task_names) - set(tasks_lib.TASK_BUILDERS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {list(tasks_lib.TASK_BUILDERS)}")
    methods = METHODS if optimizers is None else tuple(m for m in METHODS if m.name in optimizers)
    if not methods:
        raise ValueError(f"no optimizer among {optimizers}; known: {[m.name for m in METHODS]}")
    sizes = tasks_lib.FULL if mode == "full" else tasks_lib.QUICK

    started = time.perf_counter()
    # Every task at constant rates; under the papers' schedule, the tasks the claims are tested
    # on (the neural ones: the landscapes' claims-free baselines gain nothing from a second run).
    task_results: dict[str, Any] = {}
    scheduled: dict[str, dict[str, Any]] = {s: {} for s in SCHEDULES if s != "constant"}
    matrices: list[dict[str, Any]] = []
    for name in task_names:
        task = tasks_lib.TASK_BUILDERS[name](sizes)
        runner = TaskRunner(task, mode)
        runs = {"constant": task_results}
        if task.family == "neural":
            runs.update(scheduled)
        for schedule, found in runs.items():
            result = run_task(task, methods, mode, progress, runner, schedule)
            result["table"] = task_table(result)
            found[name] = result
            if progress:
                print(
                    f"\n{name} ({schedule}): {task.title}\n{result['table']}",
                    file=sys.stderr,
                    flush=True,
                )
        adafactor = [m for m in methods if m.name == "optim_zoo.adafactor"]
        if name == "char_transformer" and adafactor:
            matrices = factored_matrix_report(task, adafactor[0])
    claims = evaluate_claims(task_results, matrices)
    schedules = {}
    for schedule, found in scheduled.items():
        schedule_claims = evaluate_claims(found, matrices)
        schedules[schedule] = {
            "tasks": found,
            "claims": schedule_claims,
            "claims_table": claims_table(schedule_claims),
        }
    results = {
        "mode": mode,
        "config": {
            "seeds": list(SEEDS),
            "selection_seed": SELECTION_SEED,
            "neural_lr_factors": list(NEURAL_LR_FACTORS[mode]),
            "landscape_lr_grid": list(landscape_lr_grid(mode)),
            "hessian_iterations": HESSIAN_ITERATIONS[mode],
            "apollo_warmup_fraction": APOLLO_WARMUP_FRACTION,
            "schedules": list(SCHEDULES),
            "warmup_fraction": WARMUP_FRACTION,
            "sizes": dataclasses.asdict(sizes),
        },
        "environment": environment(),
        "tasks": task_results,
        "adafactor_matrices": matrices,
        "claims": claims,
        "claims_table": claims_table(claims),
        # Each schedule but "constant" (whose results are the keys above): its tasks and claims.
        "schedules": schedules,
    }
    results["runtime_seconds"] = time.perf_counter() - started
    # Strict JSON: a diverged value (NaN, infinity) or a target never reached becomes null.
    results = report.json_safe(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    if figures:
        results["figures"] = [p.name for p in make_figures(results, out_dir)]
    (out_dir / "study.json").write_text(json.dumps(results, allow_nan=False) + "\n")
    (out_dir / "study.md").write_text(markdown_report(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("quick", "full"), default="full")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default all)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",") if args.tasks else None
    results = run_study(args.mode, args.out_dir, tasks=tasks, progress=not args.no_progress)
    print(markdown_report(results))
    return results


if __name__ == "__main__":
    main()
