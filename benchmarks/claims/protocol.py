"""The study's protocol: its optimizers, learning-rate grids and seeds, and what trains them.

Every optimizer of the main job (`benchmarks/common/contenders.py`) runs on a task
(`benchmarks/claims/tasks.py`) in two stages:

1. Selection: every learning rate of the optimizer's grid (`Method.lr_grid`) is trained with
   seed 0; the one with the best final value of the task's selection metric is chosen (a run
   that diverges scores worst; exact ties go to the smaller rate).
2. Report: the chosen learning rate is trained again with seeds 1, 2 and 3, and everything is
   reported over the four seeds at the chosen rate (mean, standard deviation, min and max).

The learning rate follows one of two schedules (`SCHEDULES`): held constant for the whole run,
or the papers' own protocol, a linear warmup from zero over the first tenth of the run and then
a cosine decay to zero at its end (`learning_rate_schedule`). Under the schedule, the grid's rate
is the peak, and the rate is chosen again from the grid.

A seed sets the initial parameters and the minibatch order (or the gradient noise); every
optimizer sees the same ones. The runs of one optimizer on one task are batched with `jax.vmap`
(the learning rate is an argument of the training step) and whole stretches of training are
compiled as one `jax.lax.scan`. `run_task` applies the protocol to one task; the study
(`benchmarks/claims/study.py`) and the beyond study (`benchmarks/claims/beyond.py`) run it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from tqdm import tqdm

import optim_zoo
from benchmarks.claims import tasks as tasks_lib
from benchmarks.common.contenders import CONTENDERS, Contender, format_kwargs
from benchmarks.common.environment import COMPILER_OPTIONS
from benchmarks.common.traffic import tree_bytes

# Neural tasks: each method's grid is its main-job learning rate (`CONTENDERS`, each a
# documented starting point) times these factors, half a decade apart over two decades, so that
# a method whose best rate on a task is far from its usual one is still bracketed.
NEURAL_LR_FACTORS = {"full": (0.1, 0.3, 1.0, 3.0, 10.0), "quick": (0.3, 1.0, 3.0)}
# Landscapes have no documented starting points, so every method gets the same wide grid.
LANDSCAPE_LR_GRID = tuple(float(f"{10.0**e:.3g}") for e in np.arange(-4.0, 1.25, 0.5))
QUICK_LANDSCAPE_LR_GRID = (1e-3, 1e-2, 1e-1)
SELECTION_SEED = 0
REPORT_SEEDS = (1, 2, 3)  # besides the selection seed
SEEDS = (SELECTION_SEED, *REPORT_SEEDS)
HESSIAN_ITERATIONS = {"quick": 5, "full": 50}  # 50: settled to 1e-4 here (see JSON)
APOLLO_WARMUP_FRACTION = 0.1  # of each run's steps; init_lr is learning_rate / 1000

# "constant": the rate is the grid's value at every step. "warmup_cosine": the papers' protocol,
# linear from 0 to the grid's value over the first WARMUP_FRACTION of the steps, then a cosine
# decay to 0 at the end of the run: one schedule for every optimizer, not each paper's own.
SCHEDULES = ("constant", "warmup_cosine")
WARMUP_FRACTION = 0.1

# What the claims and the variants of the beyond study are measured against.
BASELINE = "optax.adamw"


@dataclasses.dataclass(frozen=True)
class Method:
    """An optimizer of the study: a main-job contender whose learning rate is an argument."""

    contender: Contender
    center_lr: float  # the main job's learning rate; the grid is centred on it

    @property
    def name(self) -> str:
        return self.contender.name

    def kwargs(self, learning_rate: Any, steps: int, schedule: str = "constant") -> dict[str, Any]:
        kwargs = {
            **self.contender.kwargs,
            "learning_rate": learning_rate_schedule(learning_rate, steps, schedule),
        }
        if self.contender.factory is optim_zoo.apollo:
            # The warmup is part of Apollo as its authors run it; scale it with the run (also for
            # a variant of the contender under another name, as benchmarks/claims/beyond.py runs).
            # Under the papers' schedule its warmup is the schedule's: Apollo adds none.
            warmup = max(1, round(APOLLO_WARMUP_FRACTION * steps))
            kwargs["warmup"] = warmup if schedule == "constant" else 0
            kwargs["init_lr"] = None
        return kwargs

    def build(
        self, learning_rate: Any, steps: int, schedule: str = "constant"
    ) -> optax.GradientTransformation:
        return self.contender.factory(**self.kwargs(learning_rate, steps, schedule))

    def fixed_hyperparameters(self, steps: int, schedule: str = "constant") -> str:
        kwargs = self.kwargs(None, steps, schedule)
        del kwargs["learning_rate"]  # the grid and the schedule are stated apart
        return format_kwargs(kwargs)

    def lr_grid(self, task: tasks_lib.Task, mode: str) -> tuple[float, ...]:
        if task.family == "landscape":
            return landscape_lr_grid(mode)
        return tuple(float(f"{self.center_lr * f:.3g}") for f in NEURAL_LR_FACTORS[mode])


def learning_rate_schedule(peak: Any, steps: int, schedule: str) -> optax.ScalarOrSchedule:
    """The learning rate of a run of `steps` steps whose grid value is `peak` (see SCHEDULES).

    `peak` may be traced (the study vmaps over rates), so the schedule is optax's warmup-cosine
    shape with a peak of 1, scaled by `peak`.
    """
    if schedule == "constant":
        return peak
    if schedule != "warmup_cosine":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    shape = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=1.0,
        warmup_steps=max(1, round(WARMUP_FRACTION * steps)),
        decay_steps=steps,
        end_value=0.0,
    )
    return lambda count: peak * shape(count)


def landscape_lr_grid(mode: str) -> tuple[float, ...]:
    """Every method's grid on the landscapes."""
    return QUICK_LANDSCAPE_LR_GRID if mode == "quick" else LANDSCAPE_LR_GRID


def _methods() -> tuple[Method, ...]:
    methods = []
    for contender in CONTENDERS:
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


class TaskRunner:
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

    def trainer(self, method: Method, schedule: str = "constant") -> Trainer:
        return Trainer(self, method, schedule)


class Trainer:
    """One task, method and schedule, compiled once, training any batch of (rate, seed)."""

    def __init__(self, runner: TaskRunner, method: Method, schedule: str = "constant"):
        self.runner, self.method, self.schedule = runner, method, schedule
        task = runner.task

        def segment(data, learning_rate, params, opt_state, batches):
            tx = method.build(learning_rate, task.steps, schedule)

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
        opt_state = jax.vmap(
            lambda lr, p: self.method.build(lr, task.steps, self.schedule).init(p)
        )(lrs_array, params)
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
        stats = {
            "mean": curve.mean(axis=0).tolist(),
            "min": curve.min(axis=0).tolist(),
            "max": curve.max(axis=0).tolist(),
        }
        return {**stats, "per_seed": curve.tolist()} if per_seed else stats

    return {
        "curves": {
            "step": list(range(0, task.steps + 1, task.eval_every)),
            **{name: curve_summary(curve) for name, curve in curves.items()},
        },
        "final": {
            name: seed_summary(_final(curve, task.final_window)) for name, curve in curves.items()
        },
    }


def seed_summary(values: np.ndarray) -> dict[str, Any]:
    """Mean, standard deviation, min, max and each value, over seeds; whether all are finite."""
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


def state_shapes(
    task: tasks_lib.Task, method: Method, schedule: str = "constant"
) -> tuple[Any, Any]:
    """The shapes and dtypes of the task's parameters and of the method's state for them."""
    params = jax.eval_shape(task.init_params, jax.random.key(0))
    state = jax.eval_shape(lambda p: method.build(1.0, task.steps, schedule).init(p), params)
    return params, state


# --- One task ----------------------------------------------------------------------------------


def run_task(
    task: tasks_lib.Task,
    methods: Sequence[Method],
    mode: str,
    progress: bool,
    runner: TaskRunner | None = None,
    schedule: str = "constant",
) -> dict[str, Any]:
    """Selection and report (the module's protocol) for each method on one task.

    `runner` reuses a task's compiled initialisation and evaluation; by default one is built.
    `schedule` is the learning rate's course over each run, one of `SCHEDULES`.
    """
    if runner is None:
        runner = TaskRunner(task, mode)
    higher = set(task.higher_is_better)
    results: dict[str, Any] = {}
    for method in methods:
        started = time.perf_counter()
        trainer = runner.trainer(method, schedule)
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
            "fixed_hyperparameters": method.fixed_hyperparameters(task.steps, schedule),
            "lr_grid": list(grid),
            "grid_final": {m: [float(v) for v in values] for m, values in grid_final.items()},
            # Seed 0 at every grid point, for what-if questions about the selection rule.
            "grid_curves": {name: curve.tolist() for name, curve in grid_curves.items()},
            "best_lr": best_lr,
            "best_lr_at_grid_edge": len(grid) > 1 and best in (0, len(grid) - 1),
            "seeds": list(SEEDS),
            **summarise_curves(task, curves, per_seed=True),
        }
        row["train_seconds"] = time.perf_counter() - started
        if runner.hessian is not None:
            quotients = np.asarray(runner.hessian(final_params, task.data), np.float64)
            row["hessian_top_eigenvalue"] = seed_summary(quotients[:, -1])
            # How settled power iteration is: the change over its last tenth of iterations.
            earlier = quotients[:, -max(2, len(quotients[0]) // 10)]
            change = np.abs(quotients[:, -1] - earlier) / np.abs(quotients[:, -1])
            row["hessian_relative_change"] = float(np.max(change))
        _, state = state_shapes(task, method, schedule)
        row["state_bytes"] = tree_bytes(state)
        row["seconds"] = time.perf_counter() - started
        results[method.name] = row
    params, _ = state_shapes(task, methods[0])
    return {
        "name": task.name,
        "title": task.title,
        "schedule": schedule,
        "family": task.family,
        "steps": task.steps,
        "eval_every": task.eval_every,
        "select": list(task.select),
        "final_window": task.final_window,
        "metric_labels": task.metric_labels,
        "plot_metrics": list(task.plot_metrics),
        "higher_is_better": list(task.higher_is_better),
        "param_count": sum(int(math.prod(p.shape)) for p in jax.tree.leaves(params)),
        "param_bytes": tree_bytes(params),
        "details": task.details,
        "results": results,
    }
