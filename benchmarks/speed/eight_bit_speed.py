"""Step time with 8-bit state against float32 state, paired and interleaved, on one tree.

Each optim_zoo optimizer's jitted, donated ``update`` + ``apply_updates`` step on the 30M tree
of `step_time.py` (float32 parameters; on a GPU the 185M tree), with float32 state and with
8-bit state (``dtype_momentum=jnp.int8``, ``dtype_second_moment=jnp.uint8``) rounded to nearest
and stochastically, the arms timed in turns (`paired.interleave`) so that whatever else the
machine does hits all of them alike; each ratio is the median of the rounds' ratios with its
95% interval (`paired.compare`). Runs on whatever JAX's default backend is.

    python benchmarks/speed/eight_bit_speed.py                    # every optimizer, 30M tree
    python benchmarks/speed/eight_bit_speed.py --only adan --samples 20
    python benchmarks/speed/eight_bit_speed.py --quick            # a tiny tree: the code paths
    python benchmarks/speed/eight_bit_speed.py --turns --samples 14

``--turns`` times, instead of the float32 arms, the 8-bit arms against themselves without
steps in turns (``optim_zoo._fusion.TURN_ELEMENTS`` above any tree's size while the step is
traced): what the turns cost or save (``turns_<tree>_<backend>.md``;
docs/eight_bit_state.md, "Steps in turns").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import optax

import optim_zoo
from benchmarks.common.environment import RESULTS_DIR, environment, git_state
from benchmarks.common.traffic import tree_bytes
from benchmarks.speed import paired, step_time
from optim_zoo import _fusion

OPTIMIZERS = {
    "adan": lambda **kw: optim_zoo.adan(1e-3, weight_decay=0.02, **kw),
    "adafactor(momentum=0.9)": lambda **kw: optim_zoo.adafactor(1e-3, momentum=0.9, **kw),
    "apollo": lambda **kw: optim_zoo.apollo(1e-3, **kw),
    "adai": lambda **kw: optim_zoo.adai(0.1, **kw),
    "came": lambda **kw: optim_zoo.came(1e-3, **kw),
}
EIGHT_BIT = {"dtype_momentum": jnp.int8, "dtype_second_moment": jnp.uint8}
ARMS = {
    "float32": {},
    "8-bit nearest": EIGHT_BIT,
    "8-bit stochastic": {**EIGHT_BIT, "state_rounding": "stochastic"},
}


def _arm(tx: optax.GradientTransformation, params, grads, turns: bool = True):
    """A function that runs one step in place (donated) and waits for it; traced (with the
    first step) without steps in turns where `turns` is False."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    carry = [jax.tree.map(jnp.array, params), tx.init(params)]
    state_bytes = tree_bytes(carry[1])

    def run():
        carry[0], carry[1] = step(carry[0], carry[1], grads)
        jax.block_until_ready(carry)

    saved = _fusion.TURN_ELEMENTS
    _fusion.TURN_ELEMENTS = saved if turns else 2**62
    try:
        run()  # traced and compiled now, with the setting
    finally:
        _fusion.TURN_ELEMENTS = saved
    return run, state_bytes


def _turns_main(names, params, grads, samples: int, out: Path) -> None:
    """The 8-bit arms with steps in turns against themselves without, paired; printed and
    written to `out` (markdown)."""
    lines = [
        "# 8-bit state: steps in turns against none",
        "",
        f"`{' '.join(sys.argv)}` ({jax.default_backend()}): paired, interleaved rounds; ratio = "
        "median of the rounds' ratios [95% interval].",
        "",
    ]
    for name in names:
        for arm in ("8-bit nearest", "8-bit stochastic"):
            runs = {
                turns: _arm(OPTIMIZERS[name](**ARMS[arm]), params, grads, turns)[0]
                for turns in (False, True)
            }
            reps = paired.calibrate_reps(runs, 0.05)
            times = paired.interleave(runs, samples=samples, reps=reps)
            ms = {k: paired.summary(t)["median_ms"] for k, t in times.items()}
            ratio = paired.format_ratio(paired.compare(times[True], times[False]))
            lines.append(
                f"- {name}, {arm}: without turns {ms[False]:.1f} ms, in turns {ms[True]:.1f} "
                f"ms, in turns / without {ratio}"
            )
            print(lines[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated optimizer names")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--tree", default=None, help="a tree of step_time.TREES")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR / "eight_bit")
    parser.add_argument("--turns", action="store_true", help="8-bit arms without turns")
    args = parser.parse_args()
    backend = jax.default_backend()
    tree = args.tree or ("tiny" if args.quick else "185M" if backend == "gpu" else "30M")
    shapes = {**step_time.TREES, **step_time.QUICK_TREES}[tree]()
    params, grads = step_time.make_arrays(shapes, jnp.float32)
    params, grads = jax.device_put(params), jax.device_put(grads)
    names = args.only.split(",") if args.only else list(OPTIMIZERS)
    if args.turns:
        out = args.out_dir / f"turns_{tree}_{backend}.md"
        _turns_main(names, params, grads, args.samples, out)
        return
    started = time.perf_counter()
    rows = {}
    for name in names:
        runs, state_bytes = {}, {}
        for arm, kwargs in ARMS.items():
            runs[arm], state_bytes[arm] = _arm(OPTIMIZERS[name](**kwargs), params, grads)
        reps = paired.calibrate_reps(runs, 0.05)
        samples = paired.interleave(runs, samples=args.samples, reps=reps)
        rows[name] = {
            "state_bytes": state_bytes,
            "ms_per_step": {arm: paired.summary(t)["median_ms"] for arm, t in samples.items()},
            "vs_float32": {
                arm: paired.compare(samples[arm], samples["float32"])
                for arm in ARMS
                if arm != "float32"
            },
        }
        print(
            name,
            {arm: f"{ms:.2f} ms" for arm, ms in rows[name]["ms_per_step"].items()},
            {arm: paired.format_ratio(c) for arm, c in rows[name]["vs_float32"].items()},
            flush=True,
        )
    result = {
        "command": " ".join(sys.argv),
        "tree": tree,
        "backend": backend,
        "samples": args.samples,
        "environment": environment(),
        "git": git_state(),
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    lines = [
        f"# 8-bit state: step time against float32 state ({tree} tree, {backend})",
        "",
        f"`{result['command']}`: paired, interleaved rounds; ratio = median of the rounds' "
        "ratios [95% interval].",
        "",
        "| optimizer | float32 ms | 8-bit nearest ms | ratio | 8-bit stochastic ms | ratio "
        "| state bytes f32 → 8-bit |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        ms, vs = row["ms_per_step"], row["vs_float32"]
        lines.append(
            f"| {name} | {ms['float32']:.2f} | {ms['8-bit nearest']:.2f} "
            f"| {paired.format_ratio(vs['8-bit nearest'])} | {ms['8-bit stochastic']:.2f} "
            f"| {paired.format_ratio(vs['8-bit stochastic'])} "
            f"| {row['state_bytes']['float32']:,} → {row['state_bytes']['8-bit nearest']:,} |"
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"speed_{tree}_{backend}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
