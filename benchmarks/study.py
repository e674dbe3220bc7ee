"""The study: each paper's claim tested on small problems anyone can rerun offline.

Six tasks (`benchmarks/_study_tasks.py`): scikit-learn's digits with the main job's MLP and with
a small CNN, a character-level transformer on CPython's offline language reference, an
ill-conditioned quadratic, Rosenbrock, and a noisy quadratic. All seven optimizers of the main
job run on every task under one protocol:

1. Selection: every learning rate of the optimizer's grid (`lr_grid`) is trained with seed 0;
   the one with the lowest final value of the task's selection metric is chosen (training loss
   on digits, validation loss on the language model, f on the landscapes; a run that diverges
   scores infinity).
2. Report: the chosen learning rate is trained again with seeds 1, 2 and 3, and everything is
   reported over the four seeds at the chosen rate (mean, standard deviation, min and max).

A seed sets the initial parameters and the minibatch order (or the gradient noise); every
optimizer sees the same ones. The runs of one optimizer on one task are batched with `jax.vmap`
(the learning rate is an argument of the training step) and whole stretches of training are
compiled as one `jax.lax.scan`.

The claims (`CLAIMS` below states each test and its threshold) are evaluated on the results and
reported PASS or FAIL with their numbers, whichever way they go.

    python benchmarks/study.py --mode full    # the committed results, < 30 min on 2 CPU cores
    python benchmarks/study.py --mode quick   # every code path in seconds (used by the tests)
    python benchmarks/compare.py --study full # the same, through the main job's script
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from tqdm import tqdm

import optim_zoo
from benchmarks import _study_tasks as tasks_lib
from benchmarks import compare

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results" / "study"
QUICK_OUT_DIR = Path(__file__).resolve().parent / "results" / "study_quick"

# Neural tasks: each method's grid is its main-job learning rate (compare.CONTENDERS, each a
# documented starting point) times these factors, half a decade apart over two decades, so that
# a method whose best rate on a task is far from its usual one is still bracketed.
NEURAL_LR_FACTORS = {"full": (0.1, 0.3, 1.0, 3.0, 10.0), "quick": (0.3, 1.0, 3.0)}
# Landscapes have no documented starting points, so every method gets the same wide grid.
LANDSCAPE_LR_GRID = tuple(float(f"{10.0**e:.3g}") for e in np.arange(-4.0, 1.25, 0.5))
QUICK_LANDSCAPE_LR_GRID = (1e-3, 1e-2, 1e-1)
SELECTION_SEED = 0
REPORT_SEEDS = (1, 2, 3)  # besides the selection seed
HESSIAN_ITERATIONS = {"quick": 5, "full": 50}  # 50: settled to 1e-4 here (see JSON)
APOLLO_WARMUP_FRACTION = 0.1  # of each run's steps; init_lr is learning_rate / 1000

BASELINE = "optax.adamw"
SGD = "optax.sgd"


@dataclasses.dataclass(frozen=True)
class Method:
    """An optimizer of the study: a main-job contender whose learning rate is an argument."""

    contender: compare.Contender
    center_lr: float  # the main job's learning rate; the grid is centred on it

    @property
    def name(self) -> str:
        return self.contender.name

    def kwargs(self, learning_rate: Any, steps: int) -> dict[str, Any]:
        kwargs = {**self.contender.kwargs, "learning_rate": learning_rate}
        if self.contender.factory is optim_zoo.apollo:
            # The warmup is part of Apollo as its authors run it; scale it with the run (also for
            # a variant of the contender under another name, as benchmarks/beyond.py runs).
            kwargs["warmup"] = max(1, round(APOLLO_WARMUP_FRACTION * steps))
            kwargs["init_lr"] = None
        return kwargs

    def build(self, learning_rate: Any, steps: int) -> optax.GradientTransformation:
        return self.contender.factory(**self.kwargs(learning_rate, steps))

    def fixed_hyperparameters(self, steps: int) -> str:
        kwargs = self.kwargs(None, steps)
        del kwargs["learning_rate"]
        return ", ".join(f"{key}={value}" for key, value in kwargs.items())

    def lr_grid(self, task: tasks_lib.Task, mode: str) -> tuple[float, ...]:
        if task.family == "landscape":
            return QUICK_LANDSCAPE_LR_GRID if mode == "quick" else LANDSCAPE_LR_GRID
        return tuple(float(f"{self.center_lr * f:.3g}") for f in NEURAL_LR_FACTORS[mode])


def _methods() -> tuple[Method, ...]:
    methods = []
    for contender in compare.CONTENDERS:
        center = contender.kwargs["learning_rate"]
        if center is None:
            # Adafactor's relative step size min(1e-2, 1/sqrt(t)) is 1e-2 for the first 10^4
            # steps, longer than any run here, so 1e-2 is that default exactly.
            center = 1e-2
        methods.append(Method(contender, center))
    return tuple(methods)


METHODS = _methods()


# --- Training ----------------------------------------------------------------------------------


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


# Quick mode compiles ~40 small programs and runs each for a few steps; XLA's backend
# optimisations would take most of its time and buy nothing there.
COMPILER_OPTIONS = {"quick": {"xla_backend_optimization_level": 0}, "full": None}


class _TaskRunner:
    """What one task compiles once for every method: initial parameters, evaluation."""

    def __init__(self, task: tasks_lib.Task, mode: str):
        self.task, self.mode = task, mode
        options = COMPILER_OPTIONS[mode]
        self.init_params = jax.jit(jax.vmap(task.init_params), compiler_options=options)
        self.evaluate = jax.jit(
            jax.vmap(task.evaluate, in_axes=(0, None)), compiler_options=options
        )
        self.hessian = None
        if task.hessian_loss is not None:
            self.hessian = jax.jit(
                jax.vmap(self._top_eigenvalue, in_axes=(0, None)), compiler_options=options
            )

    def _top_eigenvalue(self, params, data):
        return power_iteration(
            lambda p: self.task.hessian_loss(p, data),
            params,
            HESSIAN_ITERATIONS[self.mode],
            jax.random.key(tasks_lib.TASK_SEED),
        )

    def trainer(self, method: Method) -> _Trainer:
        return _Trainer(self, method)


class _Trainer:
    """One task and one method, compiled once, training any batch of (learning rate, seed)."""

    def __init__(self, runner: _TaskRunner, method: Method):
        self.runner, self.method = runner, method
        task = runner.task

        def segment(data, learning_rate, params, opt_state, batches):
            tx = method.build(learning_rate, task.steps)

            def step(carry, batch):
                params, opt_state = carry
                grads = jax.grad(task.loss)(params, data, batch)
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), batches)
            return params, opt_state

        self.segment = jax.jit(
            jax.vmap(segment, in_axes=(None, 0, 0, 0, 0)),
            compiler_options=COMPILER_OPTIONS[runner.mode],
        )

    def run(
        self, lrs: Sequence[float], seeds: Sequence[int], desc: str, progress: bool
    ) -> tuple[dict[str, np.ndarray], Any]:
        """Trains len(lrs) runs side by side; returns metric curves (runs, evals + 1), params."""
        task, runner = self.runner.task, self.runner
        lrs_array = jnp.asarray(lrs, jnp.float32)
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        batches = _stack([task.batches(seed) for seed in seeds])
        params = runner.init_params(keys)
        # Op by op: the state's zeros need no program of their own.
        opt_state = jax.vmap(lambda lr, p: self.method.build(lr, task.steps).init(p))(
            lrs_array, params
        )
        records = [runner.evaluate(params, task.data)]
        every = task.eval_every
        for start in tqdm(
            range(0, task.steps, every),
            desc=desc,
            disable=not progress,
            leave=False,
            file=sys.stderr,
        ):
            chunk = jax.tree.map(lambda b, s=start: b[:, s : s + every], batches)
            params, opt_state = self.segment(task.data, lrs_array, params, opt_state, chunk)
            records.append(runner.evaluate(params, task.data))
        curves = {
            name: np.stack([np.asarray(r[name], np.float64) for r in records], axis=1)
            for name in records[0]
        }
        return curves, params


def _final(curve: np.ndarray, window: int) -> np.ndarray:
    """Each run's final value: the mean of its last `window` evaluations (NaN stays NaN)."""
    return curve[..., -window:].mean(axis=-1)


def _score(value: float, higher_is_better: bool) -> float:
    """Lower is better; a diverged run (NaN or infinite) is worst."""
    if not math.isfinite(value):
        return math.inf
    return -value if higher_is_better else value


def summarise_curves(
    task: tasks_lib.Task, curves: dict[str, np.ndarray], *, per_seed: bool
) -> dict[str, Any]:
    """A row's "curves" (mean, min, max over seeds per evaluation) and "final" summaries.

    `curves` maps a metric to its (seeds, evaluations) array; `per_seed` also keeps each
    seed's curve.
    """

    def curve_summary(curve: np.ndarray) -> dict[str, list]:
        summary = {
            "mean": curve.mean(axis=0).tolist(),
            "min": curve.min(axis=0).tolist(),
            "max": curve.max(axis=0).tolist(),
        }
        return {**summary, "per_seed": curve.tolist()} if per_seed else summary

    return {
        "curves": {
            "step": list(range(0, task.steps + 1, task.eval_every)),
            **{name: curve_summary(curve) for name, curve in curves.items()},
        },
        "final": {
            name: _summary(_final(curve, task.final_window)) for name, curve in curves.items()
        },
    }


def _summary(values: np.ndarray) -> dict[str, Any]:
    values = np.asarray(values, np.float64)
    finite = bool(np.all(np.isfinite(values)))
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
        "per_seed": [float(v) for v in values],
        "finite": finite,
    }


# --- Flatness: the top Hessian eigenvalue by power iteration -----------------------------------


def power_iteration(
    loss_fn: Callable[[Any], jax.Array], params: Any, iterations: int, key: jax.Array
) -> jax.Array:
    """Rayleigh quotients v.Hv of power iteration on the Hessian of loss_fn, one per iteration.

    Hessian-vector products are forward-over-reverse (`jax.jvp` of `jax.grad`), so the Hessian
    is never formed. The start is a fixed random direction. Power iteration converges to the
    eigenvalue of largest magnitude, which at a minimum is the top (sharpness) eigenvalue.
    """
    flat, unravel = ravel_pytree(params)
    grad_fn = jax.grad(loss_fn)

    def hvp(v):
        return ravel_pytree(jax.jvp(grad_fn, (params,), (unravel(v),))[1])[0]

    v = jax.random.normal(key, flat.shape, flat.dtype)

    def step(v, _):
        v = v / jnp.linalg.norm(v)
        hv = hvp(v)
        return hv, jnp.vdot(v, hv)

    _, quotients = jax.lax.scan(step, v, None, length=iterations)
    return quotients


def top_hessian_eigenvalue(
    loss_fn: Callable[[Any], jax.Array], params: Any, iterations: int, key: jax.Array
) -> jax.Array:
    """The last Rayleigh quotient of `power_iteration`: the top Hessian eigenvalue's estimate."""
    return power_iteration(loss_fn, params, iterations, key)[-1]


# --- Optimizer state --------------------------------------------------------------------------


def _state_shapes(task: tasks_lib.Task, method: Method) -> tuple[Any, Any]:
    params = jax.eval_shape(task.init_params, jax.random.key(0))
    state = jax.eval_shape(lambda p: method.build(1.0, task.steps).init(p), params)
    return params, state


def _nbytes(tree: Any) -> int:
    return sum(int(math.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def _find_factored_state(state: Any) -> optim_zoo.ScaleByFactoredRmsState | None:
    if isinstance(state, optim_zoo.ScaleByFactoredRmsState):
        return state
    if isinstance(state, tuple):
        for child in state:
            found = _find_factored_state(child)
            if found is not None:
                return found
    return None


def factored_matrix_report(task: tasks_lib.Task, method: Method) -> list[dict[str, Any]]:
    """Per weight matrix: the floats of Adafactor's second-moment statistics against n + m."""
    params, state = _state_shapes(task, method)
    factored = _find_factored_state(state)
    if factored is None:
        return []
    report = []
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for i, (path, leaf) in enumerate(leaves):
        if len(leaf.shape) != 2:
            continue
        stats = [s[i] for s in (factored.v_row, factored.v_col, factored.v) if s[i] is not None]
        floats = sum(int(math.prod(s.shape)) for s in stats)
        n, m = leaf.shape
        report.append(
            {
                "param": jax.tree_util.keystr(path),
                "shape": [int(n), int(m)],
                "second_moment_floats": floats,
                "n_plus_m": int(n + m),
                "adam_floats": int(2 * n * m),
            }
        )
    return report


# --- One task ----------------------------------------------------------------------------------


def run_task(
    task: tasks_lib.Task,
    methods: Sequence[Method],
    mode: str,
    progress: bool,
    runner: _TaskRunner | None = None,
) -> dict[str, Any]:
    """Selection and report (the module's protocol) for each method on one task.

    `runner` reuses a task's compiled initialisation and evaluation; by default one is built.
    """
    if runner is None:
        runner = _TaskRunner(task, mode)
    higher = set(task.higher_is_better)
    seeds = (SELECTION_SEED, *REPORT_SEEDS)
    results: dict[str, Any] = {}
    for method in methods:
        started = time.perf_counter()
        trainer = runner.trainer(method)
        grid = method.lr_grid(task, mode)
        short = method.name.split(".")[-1]
        grid_curves, grid_params = trainer.run(
            grid,
            [SELECTION_SEED] * len(grid),
            f"{task.name} {short} lr grid",
            progress,
        )
        grid_final = {m: _final(grid_curves[m], task.final_window) for m in task.select}
        scores = [
            tuple(_score(float(grid_final[m][i]), m in higher) for m in task.select)
            for i in range(len(grid))
        ]
        # Lexicographic; exact ties (and a grid that diverged everywhere) go to the smaller rate.
        best = min(range(len(grid)), key=lambda i: (scores[i], i))
        best_lr = grid[best]
        seed_curves, seed_params = trainer.run(
            [best_lr] * len(REPORT_SEEDS), REPORT_SEEDS, f"{task.name} {short} seeds", progress
        )
        curves = {
            name: np.concatenate([grid_curves[name][best : best + 1], seed_curves[name]])
            for name in grid_curves
        }
        final_params = jax.tree.map(
            lambda g, s, b=best: jnp.concatenate([g[b : b + 1], s]), grid_params, seed_params
        )
        row: dict[str, Any] = {
            "optimizer": method.name,
            "fixed_hyperparameters": method.fixed_hyperparameters(task.steps),
            "lr_grid": list(grid),
            "grid_final": {m: [float(v) for v in values] for m, values in grid_final.items()},
            # Seed 0 at every grid point, for what-if questions about the selection rule.
            "grid_curves": {name: curve.tolist() for name, curve in grid_curves.items()},
            "best_lr": best_lr,
            "best_lr_at_grid_edge": len(grid) > 1 and best in (0, len(grid) - 1),
            "seeds": list(seeds),
            **summarise_curves(task, curves, per_seed=True),
        }
        row["train_seconds"] = time.perf_counter() - started
        if runner.hessian is not None:
            quotients = np.asarray(runner.hessian(final_params, task.data), np.float64)
            row["hessian_top_eigenvalue"] = _summary(quotients[:, -1])
            # How settled power iteration is: the change over its last tenth of iterations.
            earlier = quotients[:, -max(2, len(quotients[0]) // 10)]
            change = np.abs(quotients[:, -1] - earlier) / np.abs(quotients[:, -1])
            row["hessian_relative_change"] = float(np.max(change))
        _, state = _state_shapes(task, method)
        row["state_bytes"] = _nbytes(state)
        row["seconds"] = time.perf_counter() - started
        results[method.name] = row
    params, _ = _state_shapes(task, methods[0])
    return {
        "name": task.name,
        "title": task.title,
        "family": task.family,
        "steps": task.steps,
        "eval_every": task.eval_every,
        "select": list(task.select),
        "final_window": task.final_window,
        "metric_labels": task.metric_labels,
        "plot_metrics": list(task.plot_metrics),
        "higher_is_better": list(task.higher_is_better),
        "param_count": sum(int(math.prod(p.shape)) for p in jax.tree.leaves(params)),
        "param_bytes": _nbytes(params),
        "details": task.details,
        "results": results,
    }


# --- Claims ------------------------------------------------------------------------------------

ADAN_STEP_FRACTION = 0.6
ADAI_EARLY_FRACTION = 0.2
ADAI_EARLY_TOLERANCE = 1.10
ADAFACTOR_LOSS_TOLERANCE = 1.03

CLAIMS = {
    "adan": (
        "Adan reaches AdamW's final training loss in at most "
        f"{ADAN_STEP_FRACTION:.0%} of the steps, on the CNN and on the transformer. Measured on "
        "the seed-mean training-loss curves: the first evaluation at which Adan's is at or "
        "below AdamW's final value."
    ),
    "adai": (
        "Adai trains as fast as Adam early (seed-mean training loss at "
        f"{ADAI_EARLY_FRACTION:.0%} of the steps at most {ADAI_EARLY_TOLERANCE:.2f}x AdamW's), "
        "ends in a flatter minimum (lower mean top Hessian eigenvalue of the full training loss "
        "than AdamW), and reaches a mean test accuracy at least SGD's and above AdamW's; on the "
        "digits MLP and the digits CNN."
    ),
    "apollo": (
        "Apollo, with its warmup, at least matches AdamW: mean test accuracy on the CNN and mean "
        "validation loss on the transformer no worse than AdamW's by more than one standard "
        "deviation across seeds (the larger of the two)."
    ),
    "adafactor": (
        "Adafactor's mean final validation loss on the transformer is within "
        f"{ADAFACTOR_LOSS_TOLERANCE - 1:.0%} of AdamW's, while every weight matrix's "
        "second-moment state is n + m floats (AdamW keeps 2nm)."
    ),
}


def _check(task: str, description: str, value: Any, threshold: Any, passed: bool) -> dict:
    return {
        "task": task,
        "check": description,
        "value": value,
        "threshold": threshold,
        "pass": bool(passed),
    }


def _need(tasks: dict[str, Any], task: str, *methods: str) -> dict[str, Any] | None:
    if task not in tasks or any(m not in tasks[task]["results"] for m in methods):
        return None
    return tasks[task]["results"]


def _steps_to_reach(curve: Sequence[float], steps: Sequence[int], target: float) -> int | None:
    for step, value in zip(steps[1:], curve[1:], strict=True):
        if value is not None and math.isfinite(value) and value <= target:  # null: diverged
            return int(step)
    return None


def claim_adan(tasks: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for name in ("digits_cnn", "char_transformer"):
        results = _need(tasks, name, "optim_zoo.adan", BASELINE)
        if results is None:
            continue
        adan, adamw = results["optim_zoo.adan"], results[BASELINE]
        target = adamw["final"]["train_loss"]["mean"]
        steps = adan["curves"]["step"]
        reached = _steps_to_reach(adan["curves"]["train_loss"]["mean"], steps, target)
        fraction = reached / steps[-1] if reached is not None else math.inf
        per_seed = []
        for adan_seed, adamw_seed in zip(
            adan["curves"]["train_loss"]["per_seed"],
            adamw["curves"]["train_loss"]["per_seed"],
            strict=True,
        ):
            seed_target = float(
                np.mean(np.asarray(adamw_seed[-tasks[name]["final_window"] :], np.float64))
            )
            seed_reached = _steps_to_reach(adan_seed, steps, seed_target)
            per_seed.append(seed_reached / steps[-1] if seed_reached is not None else math.inf)
        check = _check(
            name,
            f"steps for Adan to reach AdamW's final training loss ({target:.4g}), as a fraction "
            f"of the {steps[-1]} steps (per seed, against that seed's AdamW: "
            + ", ".join(f"{f:.2f}" for f in per_seed)
            + ")",
            fraction,
            ADAN_STEP_FRACTION,
            fraction <= ADAN_STEP_FRACTION,
        )
        check["per_seed"] = per_seed
        check["supplementary"] = _adan_at_fastest_rates(tasks[name], adan, adamw)
        checks.append(check)
    return checks


def _adan_at_fastest_rates(task: dict[str, Any], adan: dict, adamw: dict) -> dict[str, Any]:
    """The same measurement on seed 0 with each method at its lowest-training-loss grid rate.

    Not part of the verdict (the protocol's rate is chosen on validation data); it shows how
    much the verdict owes to that choice.
    """
    window = task["final_window"]

    def fastest(row):
        curves = np.asarray(row["grid_curves"]["train_loss"], np.float64)  # null: NaN
        finals = np.where(np.isfinite(curves), curves, np.inf)[:, -window:].mean(axis=1)
        index = int(np.argmin(finals))
        return row["lr_grid"][index], row["grid_curves"]["train_loss"][index]

    adan_lr, adan_curve = fastest(adan)
    adamw_lr, adamw_curve = fastest(adamw)
    target = float(np.mean(np.asarray(adamw_curve[-window:], np.float64)))
    steps = adan["curves"]["step"]
    reached = _steps_to_reach(adan_curve, steps, target)
    return {
        "description": "seed 0, each at its lowest-final-training-loss grid rate (not a verdict)",
        "adan_lr": adan_lr,
        "adamw_lr": adamw_lr,
        "adamw_final_train_loss": target,
        "fraction": reached / steps[-1] if reached is not None else math.inf,
    }


def claim_adai(tasks: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for name in ("digits_mlp", "digits_cnn"):
        results = _need(tasks, name, "optim_zoo.adai", BASELINE, SGD)
        if results is None:
            continue
        adai, adamw, sgd = results["optim_zoo.adai"], results[BASELINE], results[SGD]
        steps = adai["curves"]["step"]
        index = int(np.argmin(np.abs(np.asarray(steps) - ADAI_EARLY_FRACTION * steps[-1])))
        adai_early = adai["curves"]["train_loss"]["mean"][index]
        adamw_early = adamw["curves"]["train_loss"]["mean"][index]
        ratio = adai_early / adamw_early
        checks.append(
            _check(
                name,
                f"training loss at step {steps[index]}: Adai {adai_early:.4g} / AdamW "
                f"{adamw_early:.4g}",
                ratio,
                ADAI_EARLY_TOLERANCE,
                ratio <= ADAI_EARLY_TOLERANCE,
            )
        )
        eig = {k: r["hessian_top_eigenvalue"] for k, r in (("adai", adai), ("adamw", adamw))}
        eig["sgd"] = sgd["hessian_top_eigenvalue"]
        checks.append(
            _check(
                name,
                "top Hessian eigenvalue, mean ± std: Adai "
                f"{eig['adai']['mean']:.4g} ± {eig['adai']['std']:.2g}, AdamW "
                f"{eig['adamw']['mean']:.4g} ± {eig['adamw']['std']:.2g} (SGD "
                f"{eig['sgd']['mean']:.4g} ± {eig['sgd']['std']:.2g}); Adai / AdamW",
                eig["adai"]["mean"] / eig["adamw"]["mean"],
                1.0,
                eig["adai"]["mean"] < eig["adamw"]["mean"],
            )
        )
        acc = {
            k: r["final"]["test_accuracy"]
            for k, r in (("adai", adai), ("adamw", adamw), ("sgd", sgd))
        }
        checks.append(
            _check(
                name,
                "test accuracy, mean ± std: Adai "
                f"{acc['adai']['mean']:.2%} ± {acc['adai']['std']:.2%}, SGD "
                f"{acc['sgd']['mean']:.2%} ± {acc['sgd']['std']:.2%}; Adai - SGD (>= 0)",
                acc["adai"]["mean"] - acc["sgd"]["mean"],
                0.0,
                acc["adai"]["mean"] >= acc["sgd"]["mean"],
            )
        )
        checks.append(
            _check(
                name,
                "test accuracy, mean ± std: Adai "
                f"{acc['adai']['mean']:.2%} ± {acc['adai']['std']:.2%}, AdamW "
                f"{acc['adamw']['mean']:.2%} ± {acc['adamw']['std']:.2%}; Adai - AdamW (> 0)",
                acc["adai"]["mean"] - acc["adamw"]["mean"],
                0.0,
                acc["adai"]["mean"] > acc["adamw"]["mean"],
            )
        )
    return checks


def claim_apollo(tasks: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for name, metric, higher in (
        ("digits_cnn", "test_accuracy", True),
        ("char_transformer", "val_loss", False),
    ):
        results = _need(tasks, name, "optim_zoo.apollo", BASELINE)
        if results is None:
            continue
        apollo = results["optim_zoo.apollo"]["final"][metric]
        adamw = results[BASELINE]["final"][metric]
        tolerance = max(apollo["std"], adamw["std"])
        # Positive: Apollo better than AdamW.
        margin = (apollo["mean"] - adamw["mean"]) * (1 if higher else -1)
        fmt = ".2%" if higher else ".4f"
        checks.append(
            _check(
                name,
                f"{metric}, mean ± std: Apollo {apollo['mean']:{fmt}} ± {apollo['std']:{fmt}}, "
                f"AdamW {adamw['mean']:{fmt}} ± {adamw['std']:{fmt}}; Apollo's margin over "
                f"AdamW (>= minus the larger std, {-tolerance:{fmt}})",
                margin,
                -tolerance,
                margin >= -tolerance,
            )
        )
    return checks


def claim_adafactor(tasks: dict[str, Any], matrices: list[dict[str, Any]]) -> list[dict]:
    results = _need(tasks, "char_transformer", "optim_zoo.adafactor", BASELINE)
    if results is None:
        return []
    adafactor, adamw = results["optim_zoo.adafactor"], results[BASELINE]
    ratio = adafactor["final"]["val_loss"]["mean"] / adamw["final"]["val_loss"]["mean"]
    factored = bool(matrices) and all(m["second_moment_floats"] == m["n_plus_m"] for m in matrices)
    return [
        _check(
            "char_transformer",
            f"validation loss: Adafactor {adafactor['final']['val_loss']['mean']:.4f} / AdamW "
            f"{adamw['final']['val_loss']['mean']:.4f}",
            ratio,
            ADAFACTOR_LOSS_TOLERANCE,
            ratio <= ADAFACTOR_LOSS_TOLERANCE,
        ),
        _check(
            "char_transformer",
            f"every weight matrix's second moment is n + m floats ({len(matrices)} matrices); "
            f"optimizer state bytes: Adafactor {adafactor['state_bytes']:,} vs AdamW "
            f"{adamw['state_bytes']:,} (ratio)",
            adafactor["state_bytes"] / adamw["state_bytes"],
            None,
            factored,
        ),
    ]


def evaluate_claims(tasks: dict[str, Any], matrices: list[dict[str, Any]]) -> dict[str, Any]:
    checks = {
        "adan": claim_adan(tasks),
        "adai": claim_adai(tasks),
        "apollo": claim_apollo(tasks),
        "adafactor": claim_adafactor(tasks, matrices),
    }
    claims = {}
    for name, found in checks.items():
        if not found:
            verdict = "NOT RUN"
        else:
            verdict = "PASS" if all(c["pass"] for c in found) else "FAIL"
        claims[name] = {"claim": CLAIMS[name], "verdict": verdict, "checks": found}
    return claims


# --- Tables ------------------------------------------------------------------------------------


def _fmt(summary: dict[str, Any], metric: str) -> str:
    if not summary["finite"]:
        finite = sum(v is not None and math.isfinite(v) for v in summary["per_seed"])
        return f"diverged ({len(summary['per_seed']) - finite} of {len(summary['per_seed'])} seeds)"
    if metric.endswith("accuracy"):
        return f"{summary['mean']:.2%} ± {summary['std']:.2%}"
    return f"{summary['mean']:.3g} ± {summary['std']:.2g}"


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
    lines = [
        "| " + " | ".join(header) + " |",
        "|"
        + "|".join(["---"] * (2 + per_method_grid) + ["--:"] * (len(header) - 2 - per_method_grid))
        + "|",
    ]
    for r in results:
        cells = [r["optimizer"]]
        if per_method_grid:
            cells.append(", ".join(f"{lr:g}" for lr in r["lr_grid"]))
        cells.append(f"{r['best_lr']:g}" + (" (edge)" if r["best_lr_at_grid_edge"] else ""))
        cells += [_fmt(r["final"][m], m) for m in metrics]
        if has_hessian:
            cells.append(_fmt(r["hessian_top_eigenvalue"], "eig"))
        cells += [f"{r['state_bytes']:,}", f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def markdown_report(results: dict[str, Any]) -> str:
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
    ]
    for name, claim in results["claims"].items():
        parts.append(f"- **{name}: {claim['verdict']}.** {claim['claim']}")
    parts += ["", results["claims_table"], ""]
    for check in results["claims"]["adan"]["checks"]:
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
    for task in results["tasks"].values():
        parts += [
            f"## {task['name']}: {task['title']}",
            "",
            f"{task['steps']} steps, {task['param_count']:,} parameters; learning rate chosen by "
            f"final {' then '.join(task['select'])} on seed {SELECTION_SEED}"
            + (
                f", from the grid {', '.join(f'{lr:g}' for lr in shared_grid(task))} "
                "(every optimizer)."
                if shared_grid(task) is not None
                else "."
            ),
            "",
            task_table(task),
            "",
        ]
    return "\n".join(parts)


# --- Figures -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(name: str) -> dict[str, Any]:
    names = [m.name for m in METHODS]
    color = f"C{names.index(name)}" if name in names else "k"
    return {"color": color, "linestyle": "-" if name.startswith("optim_zoo.") else "--"}


def _band(ax, row: dict[str, Any], metric: str, label: str | None = None, scale: float = 1.0):
    steps = np.asarray(row["curves"]["step"])
    curve = row["curves"][metric]
    style = _style(row["optimizer"])
    mean = np.asarray(curve["mean"], np.float64) * scale  # null (diverged) becomes NaN
    ax.plot(steps, mean, label=label or row["optimizer"], **style)
    ax.fill_between(
        steps,
        np.asarray(curve["min"], np.float64) * scale,
        np.asarray(curve["max"], np.float64) * scale,
        color=style["color"],
        alpha=0.15,
        linewidth=0,
    )


def _log_scale(metric: str, task: dict[str, Any]) -> bool:
    # Language-model losses stay within a factor of a few; everything else spans decades.
    return metric != "test_accuracy" and task["name"] != "char_transformer"


def _task_figure(plt, task: dict[str, Any], path: Path) -> None:
    metrics = task["plot_metrics"]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(5.2 * len(metrics), 4.2), constrained_layout=True, squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        for row in task["results"].values():
            _band(ax, row, metric)
        ax.set(xlabel="step", ylabel=task["metric_labels"][metric])
        if _log_scale(metric, task):
            ax.set_yscale("log")
        if metric == "test_accuracy":
            finals = [r["final"]["test_accuracy"]["mean"] for r in task["results"].values()]
            lowest = np.nanmin(np.asarray(finals, np.float64))
            ax.set_ylim(max(0.0, min(0.8, lowest - 0.05)) if np.isfinite(lowest) else 0.0, 1.0)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    fig.suptitle(
        f"{task['title']}\nmean over seeds (lines), min to max (bands), each at its chosen lr",
        fontsize="medium",
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lr_figure(plt, tasks: dict[str, Any], path: Path) -> None:
    columns = min(3, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(5 * columns, 3.9 * rows), constrained_layout=True, squeeze=False
    )
    for ax in axes.flat[len(tasks) :]:
        ax.set_axis_off()
    for ax, task in zip(axes.flat, tasks.values(), strict=False):
        metric = task["select"][0]
        for row in task["results"].values():
            scores = np.asarray(row["grid_final"][metric], np.float64)  # null: diverged
            ax.plot(
                row["lr_grid"],
                scores,
                marker="o",
                label=row["optimizer"],
                **_style(row["optimizer"]),
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _claim_adan_figure(plt, tasks, claims, path: Path) -> None:
    checks = {c["task"]: c for c in claims["adan"]["checks"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes[0], ("digits_cnn", "char_transformer"), strict=True):
        if name not in checks:
            ax.set_axis_off()
            continue
        results = tasks[name]["results"]
        for method in ("optim_zoo.adan", BASELINE):
            _band(ax, results[method], "train_loss")
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _claim_adai_figure(plt, tasks, claims, path: Path) -> None:
    names = [
        n for n in ("digits_mlp", "digits_cnn") if _need(tasks, n, "optim_zoo.adai", BASELINE, SGD)
    ]
    fig, axes = plt.subplots(
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
            _band(ax_row[0], results[method], "train_loss")
        ax_row[0].axvline(ADAI_EARLY_FRACTION * tasks[name]["steps"], color="gray", linestyle=":")
        ax_row[0].set(xlim=(0, early), yscale="log", xlabel="step", ylabel="training loss")
        ax_row[0].set_title(f"{name}: early training")
        ax_row[0].legend(fontsize="small")
        rows = list(results.values())
        labels = [r["optimizer"].split(".")[-1] for r in rows]
        colors = [_style(r["optimizer"])["color"] for r in rows]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _claim_apollo_figure(plt, tasks, claims, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True, squeeze=False)
    for ax, (name, metric) in zip(
        axes[0], (("digits_cnn", "test_accuracy"), ("char_transformer", "val_loss")), strict=True
    ):
        results = _need(tasks, name, "optim_zoo.apollo", BASELINE)
        if results is None:
            ax.set_axis_off()
            continue
        for method in ("optim_zoo.apollo", BASELINE):
            _band(ax, results[method], metric)
        warmup = max(1, round(APOLLO_WARMUP_FRACTION * tasks[name]["steps"]))
        ax.axvspan(0, warmup, color="gray", alpha=0.15, label="Apollo's warmup")
        ax.set(xlabel="step", ylabel=tasks[name]["metric_labels"][metric], title=name)
        if metric == "test_accuracy":
            ax.set_ylim(0.8, 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"Apollo vs AdamW: {claims['apollo']['verdict']}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _claim_adafactor_figure(plt, tasks, claims, matrices, path: Path) -> None:
    results = _need(tasks, "char_transformer", "optim_zoo.adafactor", BASELINE)
    fig, (loss_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    if results is not None:
        for method in ("optim_zoo.adafactor", BASELINE):
            _band(loss_ax, results[method], "val_loss")
        loss_ax.set(xlabel="step", ylabel="validation loss (nats/char)", title="char_transformer")
        loss_ax.grid(True, alpha=0.3)
        loss_ax.legend(fontsize="small")
        rows = list(results.values())
        bytes_ax.bar(
            [r["optimizer"].split(".")[-1] for r in rows],
            [r["state_bytes"] for r in rows],
            color=[_style(r["optimizer"])["color"] for r in rows],
        )
        bytes_ax.axhline(
            tasks["char_transformer"]["param_bytes"], color="gray", linestyle=":", label="params"
        )
        bytes_ax.set(yscale="log", ylabel="optimizer state bytes", title="state size")
        bytes_ax.tick_params(axis="x", labelrotation=30)
        bytes_ax.legend(fontsize="small")
    fig.suptitle(f"Adafactor vs AdamW: {claims['adafactor']['verdict']}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_figures(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Writes the study's PNGs into out_dir; returns their paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks, claims = results["tasks"], results["claims"]
    paths = []
    for task in tasks.values():
        path = out_dir / f"task_{task['name']}.png"
        _task_figure(plt, task, path)
        paths.append(path)
    if tasks:
        paths.append(out_dir / "lr_grids.png")
        _lr_figure(plt, tasks, paths[-1])
    figures = (
        ("claim_adan.png", lambda p: _claim_adan_figure(plt, tasks, claims, p)),
        ("claim_adai.png", lambda p: _claim_adai_figure(plt, tasks, claims, p)),
        ("claim_apollo.png", lambda p: _claim_apollo_figure(plt, tasks, claims, p)),
        (
            "claim_adafactor.png",
            lambda p: _claim_adafactor_figure(plt, tasks, claims, results["adafactor_matrices"], p),
        ),
    )
    for name, draw in figures:
        if claims[name[len("claim_") : -len(".png")]]["verdict"] != "NOT RUN":
            draw(out_dir / name)
            paths.append(out_dir / name)
    return paths


def _json_safe(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _json_safe(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [_json_safe(value) for value in tree]
    if isinstance(tree, np.generic):
        tree = tree.item()
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


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
      tasks: names from `_study_tasks.TASK_BUILDERS` to run (default all); claims whose
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
    task_results: dict[str, Any] = {}
    matrices: list[dict[str, Any]] = []
    for name in task_names:
        task = tasks_lib.TASK_BUILDERS[name](sizes)
        result = run_task(task, methods, mode, progress)
        result["table"] = task_table(result)
        task_results[name] = result
        if progress:
            print(f"\n{name}: {task.title}\n{result['table']}", file=sys.stderr, flush=True)
        adafactor = [m for m in methods if m.name == "optim_zoo.adafactor"]
        if name == "char_transformer" and adafactor:
            matrices = factored_matrix_report(task, adafactor[0])
    claims = evaluate_claims(task_results, matrices)
    results = {
        "mode": mode,
        "config": {
            "seeds": [SELECTION_SEED, *REPORT_SEEDS],
            "selection_seed": SELECTION_SEED,
            "neural_lr_factors": list(NEURAL_LR_FACTORS[mode]),
            "landscape_lr_grid": list(
                QUICK_LANDSCAPE_LR_GRID if mode == "quick" else LANDSCAPE_LR_GRID
            ),
            "hessian_iterations": HESSIAN_ITERATIONS[mode],
            "apollo_warmup_fraction": APOLLO_WARMUP_FRACTION,
            "sizes": dataclasses.asdict(sizes),
        },
        "environment": compare.environment(),
        "tasks": task_results,
        "adafactor_matrices": matrices,
        "claims": claims,
        "claims_table": claims_table(claims),
    }
    results["runtime_seconds"] = time.perf_counter() - started
    # Strict JSON: a diverged value (NaN, infinity) or a target never reached becomes null.
    results = _json_safe(results)
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
