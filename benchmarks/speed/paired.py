"""Paired, interleaved timing: compare two programs step by step, with an interval on the ratio.

The speed of a shared machine changes while a benchmark runs (float32 Adan's rounds on the 30M
tree: 29.9 ms in two, 41.6 to 50.4 ms in eight others of one run, docs/performance.md), so times
measured at different moments do not compare. `interleave` times the arms of a comparison in
turns, one sample of each per round in a fresh random order, so that whatever the machine does
at a moment hits both arms of that round. `compare` takes the per-round ratios of two arms and
reports their median with a distribution-free interval (order statistics: no assumption on the
shape of the ratios' distribution, only that the rounds are independent draws;
`lag1_autocorrelation` says how far that holds).

- `interleave(runs, samples=...)`: seconds per step of each arm, round by round.
- `calibrate_reps`: steps per sample, so that a sample lasts long enough to time.
- `median_interval`: the order-statistics interval of a median and its exact coverage.
- `compare`, `summary`: what a report keeps of two arms' samples, and of one arm's.
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

CONFIDENCE = 0.95


def calibrate_reps(runs: Mapping[str, Callable[[], Any]], target_s: float, tries: int = 3) -> int:
    """Steps per sample so that the fastest arm's sample lasts about `target_s` (at least 1).

    Each `run` must wait for its step to finish (`block_until_ready`); a step much shorter
    than the timer's and Python's overhead is timed in batches instead.
    """
    fastest = math.inf
    for run in runs.values():
        for _ in range(tries):
            t0 = time.perf_counter()
            run()
            fastest = min(fastest, time.perf_counter() - t0)
    return max(1, round(target_s / max(fastest, 1e-9)))


def interleave(
    runs: Mapping[str, Callable[[], Any]],
    *,
    samples: int,
    reps: int = 1,
    warmup: int = 2,
    budget_s: float | None = None,
    min_samples: int = 10,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Seconds per step of every arm, `samples` rounds of one sample each in a random order.

    A sample is `reps` consecutive steps of one arm over their count. Each arm first runs
    `warmup` steps. With `budget_s`, the rounds stop early once that many seconds have passed
    and at least `min_samples` rounds are done. Python's garbage collector is off while the
    rounds run, so that a collection lands in no sample.
    """
    rng = random.Random(seed)
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for i in range(samples):
            order = names[:]
            rng.shuffle(order)
            for name in order:
                run = runs[name]
                t0 = time.perf_counter()
                for _ in range(reps):
                    run()
                times[name].append((time.perf_counter() - t0) / reps)
            spent = time.perf_counter() - start
            if budget_s is not None and i + 1 >= min_samples and spent > budget_s:
                break
    finally:
        if enabled:
            gc.enable()
    return times


def _binomial_half_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exact."""
    if k < 0:
        return 0.0
    return sum(math.comb(n, i) for i in range(min(k, n) + 1)) / 2**n


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """The order-statistics interval for the median of `values`: [x_(k), x_(n+1-k)] with the
    largest k whose coverage, 1 - 2 P(Binomial(n, 1/2) <= k - 1), is at least `confidence`.

    With too few values for that coverage, the interval is [min, max] and `coverage` says
    what it is (1 - 2^(1-n)).
    """
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("no values")
    k = 1
    while k + 1 <= (n + 1) // 2 and 1 - 2 * _binomial_half_cdf(k, n) >= confidence:
        k += 1
    coverage = 1 - 2 * _binomial_half_cdf(k - 1, n) if n > 1 else 0.0
    return {"low": x[k - 1], "high": x[n - k], "coverage": coverage}


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def lag1_autocorrelation(values: Sequence[float]) -> float | None:
    """Correlation of consecutive values: near 0 when the rounds behave as independent draws,
    positive when slow drifts survive the pairing (the interval is then too narrow)."""
    n = len(values)
    if n < 3:
        return None
    mean = statistics.fmean(values)
    dev = [v - mean for v in values]
    denominator = sum(d * d for d in dev)
    if denominator == 0:
        return 0.0
    return sum(dev[i] * dev[i + 1] for i in range(n - 1)) / denominator


def summary(times: Sequence[float]) -> dict[str, Any]:
    """One arm: median, quartiles and extremes in ms, and the spread (interquartile range over
    the median) of its samples."""
    q1, median, q3 = _quantiles(times)
    return {
        "samples": len(times),
        "median_ms": 1e3 * median,
        "quartiles_ms": [1e3 * q1, 1e3 * q3],
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "iqr_over_median": (q3 - q1) / median,
    }


def compare(
    a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """Arm `a` against arm `b` timed in the same rounds: the median of the rounds' ratios a/b,
    its interval, the spread of the ratios (quartiles; interquartile range over the median)
    and the lag-1 autocorrelation of their logarithms."""
    if len(a) != len(b):
        raise ValueError(f"arms of {len(a)} and {len(b)} samples are not paired")
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    q1, median, q3 = _quantiles(ratios)
    interval = median_interval(ratios, confidence)
    return {
        "ratio": median,
        "interval": [interval["low"], interval["high"]],
        "coverage": interval["coverage"],
        "pairs": len(ratios),
        "ratio_quartiles": [q1, q3],
        "ratio_iqr_over_median": (q3 - q1) / median,
        "lag1_autocorrelation": lag1_autocorrelation([math.log(r) for r in ratios]),
        "contains_1": interval["low"] <= 1.0 <= interval["high"],
    }


def format_ratio(c: Mapping[str, Any], confidence: float = CONFIDENCE) -> str:
    """``1.02x [0.99, 1.04]``: a comparison's ratio and interval, with the interval's coverage
    when too few pairs give it less than `confidence` (``[0.95, 1.10] 88%``)."""
    low, high = c["interval"]
    short = f" {c['coverage']:.0%}" if c["coverage"] < confidence else ""
    return f"{c['ratio']:.3f}x [{low:.3f}, {high:.3f}]{short}"
