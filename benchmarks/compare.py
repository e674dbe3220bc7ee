"""Main job: every optim_zoo optimizer and two optax baselines on one small, fixed problem.

A two-hidden-layer MLP is trained on scikit-learn's bundled 8x8 digits (no download) with the
same initial parameters, the same minibatch order and the same number of steps for every
optimizer. The script prints one table (final full-train-set loss, test accuracy, time per
jitted step, optimizer state size) and writes it to `results/compare.json`, with the loss and
accuracy curves plotted in `results/compare.png`.

    python benchmarks/compare.py            # the full run, well under a minute on 2 CPU cores
    python benchmarks/compare.py --quick    # a smoke run of a few seconds (used by the tests)
    python benchmarks/compare.py --study full   # the claims study instead (benchmarks/README.md)

Learning rates were picked once on this problem from each method's documented starting point;
`CONTENDERS` (`benchmarks/common/contenders.py`) says where each comes from. They are sensible, not
exhaustively tuned: the table shows that every method trains this model, not which one is best
in general.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from benchmarks.common import report
from benchmarks.common.contenders import CONTENDERS, Contender, eight_bit_state
from benchmarks.common.digits import (
    Dataset,
    cross_entropy,
    init_mlp,
    load_digits_dataset,
    minibatch_order,
    mlp_logits,
    mlp_sizes,
)
from benchmarks.common.environment import RESULTS_DIR, environment
from benchmarks.common.traffic import tree_bytes

DEFAULT_OUT_DIR = RESULTS_DIR


def loss(params: list[dict[str, jax.Array]], x: jax.Array, y: jax.Array) -> jax.Array:
    return cross_entropy(mlp_logits(params, x), y)


@jax.jit
def evaluate(params: list[dict[str, jax.Array]], data: Dataset) -> tuple[jax.Array, jax.Array]:
    """Loss over the whole training set and accuracy on the test set."""
    train_loss = loss(params, data.x_train, data.y_train)
    predictions = jnp.argmax(mlp_logits(params, data.x_test), axis=-1)
    return train_loss, jnp.mean(predictions == data.y_test)


def make_train_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    @jax.jit
    def train_step(params, opt_state, data: Dataset, batch_indices: jax.Array):
        x, y = data.x_train[batch_indices], data.y_train[batch_indices]
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return train_step


def make_step_timer(
    train_step, params, opt_state, data: Dataset, batch_indices, number: int
) -> Callable[[], float]:
    """A function that runs `number` chained steps from the given state; returns s per step.

    `train_step` is already compiled; chaining the steps and blocking once at the end measures
    throughput the way a training loop sees it.
    """
    batch_indices = jnp.asarray(batch_indices)

    def seconds_per_step() -> float:
        p, s = params, opt_state
        start = time.perf_counter()
        for _ in range(number):
            p, s, _ = train_step(p, s, data, batch_indices)
        jax.block_until_ready((p, s))
        return (time.perf_counter() - start) / number

    return seconds_per_step


def best_ms_per_step(timers: Sequence[Callable[[], float]], repeats: int) -> list[float]:
    """Each timer's best time over `repeats` rounds, in ms; every round runs every timer once.

    Interleaving spreads load from other processes over all optimizers alike, and the best
    round (as `timeit` reports) is the one least disturbed by it.
    """
    best = [math.inf] * len(timers)
    for _ in range(repeats):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer())
    return [1e3 * seconds for seconds in best]


def run_contender(
    contender: Contender,
    data: Dataset,
    init_params: list[dict[str, jax.Array]],
    batches: np.ndarray,
    *,
    eval_every: int,
    timing_steps: int,
    progress: bool,
) -> tuple[dict[str, Any], Callable[[], float]]:
    """Trains one optimizer; returns its table row (without timing) and a timer of its step."""
    tx = contender.build()
    train_step = make_train_step(tx)
    params, opt_state = init_params, tx.init(init_params)

    curves: dict[str, list[float]] = {"step": [], "train_loss": [], "test_accuracy": []}

    def record(step: int, params: list[dict[str, jax.Array]]) -> None:
        train_loss, test_accuracy = evaluate(params, data)
        curves["step"].append(step)
        curves["train_loss"].append(float(train_loss))
        curves["test_accuracy"].append(float(test_accuracy))

    record(0, params)
    steps = len(batches)
    for step, batch_indices in enumerate(
        tqdm(batches, desc=contender.name, disable=not progress, leave=False, file=sys.stderr),
        start=1,
    ):
        params, opt_state, _ = train_step(params, opt_state, data, batch_indices)
        if step % eval_every == 0 or step == steps:
            record(step, params)

    row = {
        "optimizer": contender.name,
        "hyperparameters": contender.hyperparameters,
        "final_train_loss": curves["train_loss"][-1],
        "test_accuracy": curves["test_accuracy"][-1],
        "state_bytes": tree_bytes(opt_state),
        "curves": curves,
    }
    timer = make_step_timer(train_step, params, opt_state, data, batches[0], timing_steps)
    return row, timer


def format_table(rows: Sequence[dict[str, Any]], param_bytes: int) -> str:
    """A Markdown table: readable in a terminal and pasteable into the README as it is."""
    header = [
        "optimizer",
        "hyperparameters",
        "final train loss",
        "test accuracy",
        "ms / step",
        "state bytes",
        "state / params",
    ]
    cells = [
        [
            row["optimizer"],
            row["hyperparameters"],
            f"{row['final_train_loss']:.2e}",
            f"{row['test_accuracy']:.2%}",
            f"{row['ms_per_step']:.3f}",
            f"{row['state_bytes']:,}",
            f"{row['state_bytes'] / param_bytes:.2f}x",
        ]
        for row in rows
    ]
    return report.markdown_table(header, cells, left=2)


def plot_curves(rows: Sequence[dict[str, Any]], title: str, path: Path) -> None:
    fig, (loss_ax, acc_ax) = report.pyplot().subplots(
        1, 2, figsize=(12, 4.5), constrained_layout=True
    )
    for row in rows:
        curves = row["curves"]
        # optim_zoo solid, optax baselines dashed.
        style = "-" if row["optimizer"].startswith("optim_zoo.") else "--"
        loss_ax.plot(curves["step"], curves["train_loss"], style, label=row["optimizer"])
        acc_ax.plot(curves["step"], curves["test_accuracy"], style, label=row["optimizer"])
    loss_ax.set(yscale="log", xlabel="step", ylabel="cross-entropy on the full training set")
    loss_ax.set_title("Training loss")
    lowest = report.accuracy_floor(row["test_accuracy"] for row in rows)
    acc_ax.set(xlabel="step", ylabel="test accuracy", ylim=(lowest, 1.0))
    acc_ax.set_title("Test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(True, which="both", alpha=0.3)
    acc_ax.legend(loc="lower right", fontsize="small")
    fig.suptitle(title)
    report.save_figure(fig, path, dpi=120)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1500)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=None, help="default: steps // 60")
    parser.add_argument("--seed", type=int, default=0, help="initial parameters and batch order")
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds: 60 steps, shorter timing (for tests)"
    )
    parser.add_argument(
        "--optimizers",
        default=None,
        help="comma-separated substrings; run only the optimizers whose name contains one",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="default benchmarks/results (with --study: benchmarks/results/study, or "
        "benchmarks/results/study_quick)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--study",
        choices=("quick", "full"),
        default=None,
        help="run the study of benchmarks/claims/study.py (every claim tested) instead",
    )
    args = parser.parse_args(argv)
    if args.out_dir is None and args.study is None:
        args.out_dir = DEFAULT_OUT_DIR
    if args.steps is None:
        args.steps = 60 if args.quick else 1500
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 60)
    if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1:
        parser.error("--steps, --batch-size and --eval-every must be positive")
    return args


def select_contenders(patterns: str | None) -> tuple[Contender, ...]:
    if patterns is None:
        return CONTENDERS
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = tuple(c for c in CONTENDERS if any(p in c.name for p in wanted))
    if not chosen:
        names = ", ".join(c.name for c in CONTENDERS)
        raise SystemExit(f"--optimizers {patterns!r} matches none of: {names}")
    return chosen


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """--study: the study's run_study (benchmarks/claims/study.py), on this data and model."""
    from benchmarks.claims import study  # only here: the main job runs without the study's code

    results = study.run_study(args.study, args.out_dir, progress=not args.no_progress)
    print(study.markdown_report(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the comparison; returns what it writes to `compare.json`."""
    args = parse_args(argv)
    if args.study is not None:
        return run_study(args)
    timing_repeats, timing_steps = (2, 10) if args.quick else (20, 50)
    contenders = select_contenders(args.optimizers)
    started = time.perf_counter()

    data = load_digits_dataset()
    sizes = mlp_sizes(data.x_train.shape[1])
    init_params = init_mlp(jax.random.key(args.seed), sizes)
    batches = minibatch_order(data.x_train.shape[0], args.batch_size, args.steps, args.seed)
    param_count = sum(leaf.size for leaf in jax.tree.leaves(init_params))
    param_bytes = tree_bytes(init_params)
    title = (
        f"digits ({data.x_train.shape[0]} train / {data.x_test.shape[0]} test), "
        f"MLP {'-'.join(map(str, sizes))} ({param_count:,} parameters), "
        f"{args.steps} steps of batch {args.batch_size}"
    )
    print(title, flush=True)

    # Beside the default table, each optim_zoo optimizer with 8-bit state (stochastic rounding);
    # the quick run, the first one only.
    eight_bit = [eight_bit_state(c) for c in contenders if c.name.startswith("optim_zoo.")]
    eight_bit = eight_bit[:1] if args.quick else eight_bit
    rows, timers = zip(
        *(
            run_contender(
                contender,
                data,
                init_params,
                batches,
                eval_every=args.eval_every,
                timing_steps=timing_steps,
                progress=not args.no_progress,
            )
            for contender in (*contenders, *eight_bit)
        ),
        strict=True,
    )
    for row, ms_per_step in zip(rows, best_ms_per_step(timers, timing_repeats), strict=True):
        row["ms_per_step"] = ms_per_step
    rows, eight_bit_rows = rows[: len(contenders)], rows[len(contenders) :]
    total_seconds = time.perf_counter() - started

    table = format_table(rows, param_bytes)
    print(table)
    eight_bit_table = format_table(eight_bit_rows, param_bytes) if eight_bit_rows else ""
    if eight_bit_rows:
        print("\n8-bit state (dtype_momentum=jnp.int8, dtype_second_moment=jnp.uint8):")
        print(eight_bit_table)
    print(f"total time {total_seconds:.1f} s; parameters take {param_bytes:,} bytes")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(rows, title, args.out_dir / "compare.png")
    result = {
        "title": title,
        "config": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "eval_every": args.eval_every,
            "seed": args.seed,
            "layer_sizes": list(sizes),
            "param_bytes": param_bytes,
            "timing": {"repeats": timing_repeats, "steps_per_repeat": timing_steps},
        },
        "environment": environment(),
        "total_seconds": total_seconds,
        "table": table,
        "results": list(rows),
        "eight_bit_table": eight_bit_table,
        "eight_bit_results": list(eight_bit_rows),
    }
    (args.out_dir / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out_dir / 'compare.json'} and {args.out_dir / 'compare.png'}")
    return result


if __name__ == "__main__":
    main()
