"""The step-time benchmark's report: its tables, the targets it checks, and its figure.

What `step_time.py` measured, written down: the Markdown table of every row
(`markdown_table`), each option against its original (`variant_comparisons`,
`comparisons_table`), the published targets (`check_targets`), the bar chart (`plot`), the
paired modes' tables (`paired_table`, `paired_markdown`) and the report around them
(`markdown_report`). Nothing here times anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import report
from benchmarks.common.contenders import BF16_STATE, COMPARISONS, implementation_label
from benchmarks.common.traffic import ALGORITHMS
from benchmarks.speed import paired

MB = 1e6
# The published algorithms, which have peers and targets; the factored ones are optim_zoo's own
# combinations, timed for their cost only.
PUBLISHED = ("AdamW", "Adan", "Adafactor", "Apollo", "Adai", "AdaiW", "CAME")


def _implementation(row: dict) -> str:
    return implementation_label(row["library"], row.get("variant", ""))


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(rows: list[dict], trees: Sequence[str]) -> str:
    header = (
        "| tree | algorithm | implementation | ms/step | MB moved (1 pass / min) "
        "| floor ms (1 pass / min) | time/floor (1 pass / min) | state B per param B "
        "| kernels/leaf | XLA MB | temp MB | compile s |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for tree in trees:
        for row in rows:
            if row["tree"] != tree:
                continue
            name = _implementation(row) + (f" ({row['note']})" if row.get("note") else "")
            if "skipped" in row:
                lines.append(
                    f"| {tree} | {row['algorithm']} | {name} | skipped: {row['skipped']} "
                    "| | | | | | | | |"
                )
                continue
            temp = row.get("temp_bytes")
            lines.append(
                f"| {tree} | {row['algorithm']} | {name} | {row['ms_per_step']:.2f} "
                f"| {row['bytes_single'] / MB:.0f} / {row['bytes_min'] / MB:.0f} "
                f"| {row['floor_ms']:.2f} / {row['floor_min_ms']:.2f} "
                f"| {row['time_over_floor']:.2f} / {row['time_over_min_floor']:.2f} "
                f"| {row['state_per_param']:.2f} "
                f"| {_fmt(row.get('fusions_per_leaf'), '.1f')} "
                f"| {_fmt(None if row.get('xla_bytes') is None else row['xla_bytes'] / MB, '.0f')} "
                f"| {_fmt(None if temp is None else temp / MB, '.1f')} "
                f"| {_fmt(row.get('compile_s'), '.1f')} |"
            )
    return header + "\n".join(lines) + "\n"


def paired_ratios(row: dict, reference: dict) -> list[float]:
    """The row's median over the reference's in each round: both were timed within seconds of
    each other, so that load elsewhere on the machine moves both."""
    return [
        a / b for a, b in zip(row["round_medians_s"], reference["round_medians_s"], strict=True)
    ]


def variant_comparisons(rows: list[dict], trees: Sequence[str]) -> list[dict]:
    """Each variant row against its original in this run (`contenders.COMPARISONS`): the
    median of the rounds' paired ratios with its quartiles, the ratio of the rows' best
    rounds, of the bytes their algorithms must move (the 'min' floors) and of the bytes XLA's
    cost model counts for the two compiled steps."""
    timed = {
        (r["tree"], r["algorithm"], r.get("variant", "")): r
        for r in rows
        if "skipped" not in r and r["library"] == "optim_zoo"
    }
    found = []
    for tree in trees:
        for subject, reference, limit in COMPARISONS:
            a, b = timed.get((tree, *subject)), timed.get((tree, *reference))
            if a is None or b is None:
                continue
            ratios = paired_ratios(a, b)
            q1, median, q3 = np.percentile(ratios, [25, 50, 75])
            bytes_ratio = None
            if a.get("xla_bytes") and b.get("xla_bytes"):
                bytes_ratio = a["xla_bytes"] / b["xla_bytes"]
            found.append(
                {
                    "tree": tree,
                    "row": row_name(subject),
                    "reference": row_name(reference),
                    "ms": a["ms_per_step"],
                    "reference_ms": b["ms_per_step"],
                    "ratio": float(median),
                    "ratio_quartiles": [float(q1), float(q3)],
                    "ratio_of_best": a["ms_per_step"] / b["ms_per_step"],
                    "xla_bytes_ratio": bytes_ratio,
                    "floor_ratio": a["bytes_min"] / b["bytes_min"],
                    "limit": limit,
                    "temp_mb": _temp_mb(a),
                    "reference_temp_mb": _temp_mb(b),
                    "paired": a.get("paired", {}).get(row_name(reference)),
                }
            )
    return found


def row_name(key: tuple[str, str]) -> str:
    """An (algorithm, variant) key as a row's name: ``Adan [bf16 state]``."""
    algorithm, variant = key
    return algorithm + (f" [{variant}]" if variant else "")


def _temp_mb(row: dict) -> float | None:
    temp = row.get("temp_bytes")
    return None if temp is None else temp / MB


def comparisons_table(comparisons: list[dict]) -> str:
    header = (
        "| tree | row | against | ms/step | against ms/step | ratio (quartiles) "
        "| step by step [95% interval] | best rounds "
        "| floor ratio | XLA bytes ratio | at most | temp MB (row / against) |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for c in comparisons:
        bold = "**" if c["ratio"] > c["limit"] else ""
        q1, q3 = c["ratio_quartiles"]
        step = c.get("paired")
        lines.append(
            f"| {c['tree']} | {c['row']} | {c['reference']} | {c['ms']:.2f} "
            f"| {c['reference_ms']:.2f} | {bold}{c['ratio']:.2f}{bold} ({q1:.2f}-{q3:.2f}) "
            f"| {'n/a' if step is None else paired.format_ratio(step)} "
            f"| {c['ratio_of_best']:.2f} | {c['floor_ratio']:.2f} "
            f"| {_fmt(c['xla_bytes_ratio'], '.2f')} "
            f"| {c['limit']:.1f} "
            f"| {_fmt(c['temp_mb'], '.1f')} / {_fmt(c['reference_temp_mb'], '.1f')} |"
        )
    return header + "\n".join(lines) + "\n"


def check_targets(rows: list[dict], headline: str, many_leaves: str | None) -> list[dict]:
    """The issue's targets, evaluated on this run's rows.

    Only the published algorithms' default configurations take part, as targets or as peers:
    the variant rows (bfloat16 state) and optim_zoo's factored combinations are not compared,
    except in the per-leaf overhead, which every optim_zoo row on the many-leaves tree keeps,
    against AdamW timed alongside it (round by round; `paced_overhead`).
    """
    limits = {"Adan": 1.3, "Adafactor": 2.0, "Apollo": 2.0, "Adai": 2.0, "AdaiW": 2.0, "CAME": 2.0}
    timed = [
        r
        for r in rows
        if "skipped" not in r and not r.get("variant") and r["algorithm"] in PUBLISHED
    ]
    checks = []
    for algorithm, limit in limits.items():
        ours = [
            r
            for r in timed
            if r["tree"] == headline and r["library"] == "optim_zoo" and r["algorithm"] == algorithm
        ]
        for r in ours:
            checks.append(
                {
                    "target": f"{algorithm} time/floor <= {limit} ({headline})",
                    "value": round(r["time_over_floor"], 3),
                    "met": r["time_over_floor"] <= limit,
                }
            )
    for tree in sorted({r["tree"] for r in timed}):
        for r in timed:
            if r["tree"] != tree or r["library"] != "optim_zoo":
                continue
            peers = [
                p
                for p in timed
                if p["tree"] == tree and p["algorithm"] == r["algorithm"] and p is not r
            ]
            if not peers:
                continue
            fastest = min(peers, key=lambda p: p["ms_per_step"])
            checks.append(
                {
                    "target": f"{r['algorithm']} faster than every peer ({tree})",
                    "value": f"{r['ms_per_step']:.2f} ms vs {fastest['library']} "
                    f"{fastest['ms_per_step']:.2f} ms",
                    "met": r["ms_per_step"] < fastest["ms_per_step"],
                }
            )
    # Per-leaf overhead: every optim_zoo row (variants too) against AdamW timed in the same
    # rounds, as every group on the many-leaves tree is.
    paced = [
        r
        for r in rows
        if r["tree"] == many_leaves and r["library"] == "optim_zoo" and "skipped" not in r
    ]
    for r in paced:
        overhead = r["overhead_over_adamw"]
        q1, q3 = overhead["quartiles"]
        checks.append(
            {
                "target": f"{row_name((r['algorithm'], r.get('variant', '')))} per-leaf overhead"
                " <= 2x optax.adamw's",
                "value": f"{overhead['ratio']:.2f}x AdamW's in the same rounds"
                f" (quartiles {q1:.2f}-{q3:.2f}); {r['overhead_us_per_leaf']:.2f} us",
                "met": overhead["ratio"] <= 2,
            }
        )
    return checks


def plot(rows: list[dict], trees: Sequence[str], path: Path) -> None:
    """One panel of bars per tree in `trees`, against each algorithm's single-pass floor."""
    plt = report.pyplot()
    libraries = [
        "optim_zoo",
        f"optim_zoo [{BF16_STATE}]",
        "optax",
        "torch",
        "pytorch-optimizer",
        "timm",
    ]
    colors = dict(zip(libraries, ["C0", "C0", "C1", "C2", "C3", "C4"], strict=True))
    hatches = {f"optim_zoo [{BF16_STATE}]": "//"}
    fig, axes = plt.subplots(1, len(trees), figsize=(8.5 * len(trees), 4.5), squeeze=False)
    for ax, tree in zip(axes[0], trees, strict=True):
        timed = [r for r in rows if r["tree"] == tree and "skipped" not in r]
        algorithms = [a for a in ALGORITHMS if any(r["algorithm"] == a for r in timed)]
        width = 0.8 / len(libraries)
        for i, algorithm in enumerate(algorithms):
            group = [r for r in timed if r["algorithm"] == algorithm]
            first = _implementation(group[0])
            floor = max(r["floor_ms"] for r in group if _implementation(r) == first)
            ax.hlines(floor, i - 0.4, i + 0.4, colors="k", linestyles="--", linewidth=1)
            for j, library in enumerate(libraries):
                for r in group:
                    if _implementation(r) == library:
                        ax.bar(
                            i - 0.4 + (j + 0.5) * width,
                            r["ms_per_step"],
                            width,
                            color=colors[library],
                            hatch=hatches.get(library),
                            edgecolor="white" if library in hatches else None,
                        )
        ax.set_xticks(range(len(algorithms)), [a.replace(" ", "\n") for a in algorithms])
        ax.set_yscale("log")
        ax.set_ylabel("ms per step (log)")
        ax.set_title(f"{tree} tree; dashed: single-pass floor of the first bar")
    handles = [
        plt.Rectangle(
            (0, 0),
            1,
            1,
            facecolor=colors[lib],
            hatch=hatches.get(lib),
            edgecolor="white" if lib in hatches else None,
        )
        for lib in libraries
    ]
    fig.legend(handles, libraries, loc="upper center", ncol=len(libraries))
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    report.save_figure(fig, path)


def _ms(arm: dict) -> str:
    return f"{arm['median_ms']:.3f}"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MB:.1f}"


def paired_table(result: dict) -> str:
    mode = result["mode"]
    lines = []
    if mode == "against_ref":
        limit = result["config"]["limit"]
        header = (
            "| tree | optimizer | new ms | ref ms | new / ref [95% interval] | pairs "
            "| pairs' IQR / median | lag-1 autocorr. | same program | "
            f"at most {limit:.2f}x |\n|---|---|---:|---:|---:|---:|---:|---:|---|---|\n"
        )
    elif mode == "steering":
        header = (
            "| tree | optimizer | on ms | off ms | on / off [95% interval] | pairs "
            "| pairs' IQR / median | XLA MB on / off | kernels per leaf on / off "
            "| temp MB on / off |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        )
    else:
        header = (
            "| tree | optimizer | comparison | ms (each arm) | ratio [95% interval] | contains 1 "
            "| pairs | pairs' IQR / median | each arm's IQR / median | lag-1 autocorr. |\n"
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|\n"
        )
    for e in result["rows"]:
        if "skipped" in e:
            lines.append(f"| {e['tree']} | {e['name']} | skipped: {e['skipped']} |")
            continue
        arms = e["arms"]
        if mode == "against_ref":
            c = e["comparisons"][0]
            lines.append(
                f"| {e['tree']} | {e['name']} | {_ms(arms['new'])} | {_ms(arms['ref'])} "
                f"| {paired.format_ratio(c)} | {c['pairs']} "
                f"| {c['ratio_iqr_over_median']:.3f} | {_fmt(c['lag1_autocorrelation'], '.2f')} "
                f"| {'yes' if e['same_program'] else 'no'} | {e['verdict']} |"
            )
        elif mode == "steering":
            c = e["comparisons"][0]
            on, off = arms["on"], arms["off"]
            kernels = f"{on['kernels_per_leaf']:.1f} / {off['kernels_per_leaf']:.1f}"
            lines.append(
                f"| {e['tree']} | {e['name']} | {_ms(on)} | {_ms(off)} "
                f"| {paired.format_ratio(c)} | {c['pairs']} | {c['ratio_iqr_over_median']:.3f} "
                f"| {_mb(on['xla_bytes'])} / {_mb(off['xla_bytes'])} | {kernels} "
                f"| {_mb(on['temp_bytes'])} / {_mb(off['temp_bytes'])} |"
            )
        else:
            for c in e["comparisons"]:
                a, b = arms[c["arm"]], arms[c["against"]]
                lines.append(
                    f"| {e['tree']} | {e['name']} | {c['arm']} / {c['against']} "
                    f"| {_ms(a)} / {_ms(b)} | {paired.format_ratio(c)} "
                    f"| {'yes' if c['contains_1'] else '**no**'} | {c['pairs']} "
                    f"| {c['ratio_iqr_over_median']:.3f} "
                    f"| {a['iqr_over_median']:.3f} / {b['iqr_over_median']:.3f} "
                    f"| {_fmt(c['lag1_autocorrelation'], '.2f')} |"
                )
    return header + "\n".join(lines) + "\n"


PAIRED_TITLES = {
    "against_ref": "Step time: today's optim_zoo against the package at a git ref",
    "steering": "Step time: the package's compiler steering on against off",
    "noise": "Step time: the paired method's own noise",
}


def paired_markdown(result: dict) -> str:
    config, machine = result["config"], result["machine"]
    method = (
        "Method: the arms of each row are timed one sample each in turn, in a fresh random order"
        f" per round, {config['pairs']} rounds at most ({config['pair_budget_s']} s at most per"
        " row once 10 are done); a sample is one step, or a batch of steps lasting at least"
        f" {1e3 * config['pair_sample_s']:.0f} ms, waited for. The ratio is the median of the"
        " rounds' ratios; the interval is the order-statistics interval of that median"
        f" (coverage >= {config['confidence']:.0%}, no assumption on the distribution; it"
        " assumes the rounds independent, which the lag-1 autocorrelation of the log ratios"
        " checks: near 0 is fine). ms: each arm's median sample."
    )
    lines = [
        f"# {PAIRED_TITLES[result['mode']]}",
        "",
        f"Command: `{config['command'].strip()}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores; JAX {machine['jax']} on "
        f"{', '.join(machine['jax_devices'])}; optax {machine['optax']}. Load average at start "
        f"{result['load_average']['start']}, at end {result['load_average']['end']}. "
        f"Parameters: {config['dtype']}. Wall time {result['wall_s']:.0f} s.",
        "",
        method,
        "",
    ]
    if result["mode"] == "against_ref":
        lines += [
            f"New: the package imported as `optim_zoo` from `{config['package']}` (git "
            f"{config['git']}). Reference: `{config['against_ref']}` = "
            f"`{config['reference_commit']}`, extracted with `git archive` and imported under"
            " another name (`benchmarks/speed/reference.py`). 'same program': the two optimized HLO"
            " modules are identical but for source locations, so any ratio is the method's"
            f" noise. Verdict on the claim new / ref <= {config['limit']:.2f}: met when the"
            " interval's upper end is within it, missed when its lower end is above it,"
            " undecided otherwise.",
            "",
        ]
    if result["mode"] == "noise":
        lines += [
            "'step again': the same compiled step on a second set of buffers; 'same-bytes pass':"
            " a donated elementwise pass without reductions over arrays of the parameters'"
            " shapes that moves the optimizer's single-pass bytes (its state rounded to whole"
            " arrays). A step against itself shows what the method adds; the pass against"
            " itself what the machine adds to a program that only streams memory; if the"
            " step's spread is larger than the pass's, the program adds to it.",
            "",
        ]
    lines.append(result["table"])
    return "\n".join(lines) + "\n"


def markdown_report(result: dict, rows: list[dict], trees: Sequence[str], checks: list) -> str:
    machine = result["machine"]
    lines = [
        "# Optimizer step time against the memory-traffic floor",
        "",
        f"Command: `{result['config']['command'].strip()}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine.get('memory_gib', '?')} GiB; JAX {machine['jax']} on "
        f"{', '.join(machine['jax_devices'])}; optax {machine['optax']}"
        + (f"; torch {machine['torch']}" if "torch" in machine else "")
        + ". "
        + machine["gpu"]
        + ".",
        "",
        f"Stream bandwidth (in-place, donated): {result['bandwidth_gbs']['used']:.1f} GB/s "
        f"(runs: {', '.join(f'{b:.1f}' for b in result['bandwidth_gbs']['runs'])}). "
        f"Load average at start {result['load_average']['start']}, "
        f"at end {result['load_average']['end']}. Parameters: {result['config']['dtype']}.",
        "",
        "time/floor: ms per step over (bytes moved / bandwidth); '1 pass' reads every parameter,"
        " gradient and state byte once and writes parameters and state once; 'min' adds the"
        " re-reads that the algorithm's reductions force (docs/performance.md). 'XLA MB': the"
        " bytes XLA's cost model counts for the compiled step, each kernel's operands and"
        " outputs (a kernel per output array on the CPU, so that an array several outputs"
        " need is read several times).",
        "",
        "Factored Adan, Factored Adai and Factored AdaiW are optim_zoo's `factored_adan` and"
        " `factored_adai` (decoupled=False / True) at Adan's, Adai's and AdaiW's"
        " hyperparameters. `optim_zoo [bf16 state]` rows keep the state in bfloat16"
        " (`dtype_momentum` and `dtype_second_moment`; Adafactor's momentum is off here, so"
        " only its statistics) with float32 parameters; the bytes moved and the re-reads count"
        " the state leaves at the dtype they are allocated in. `[bf16 state, stochastic"
        ' rounding]` rows store it with `state_rounding="stochastic"`. `[no decay]`,'
        " `[L2 decay]`, `[decoupled decay]` and `[stable decay]` rows change only the weight"
        " decay. None of these rows has peers or targets of its own; the table after the"
        " main one compares each with its original.",
        "",
        markdown_table(rows, trees),
        "## Variants against their originals (same run)",
        "",
        "Each option's row over the row without it, timed side by side in this run: the ratio"
        " is the median over the rounds of the two rows' medians in the same round (quartiles"
        " in brackets), bold where it exceeds the limit (a memory option moves fewer bytes, so"
        " it should be no slower; a weight decay should cost at most 10%); 'step by step' times"
        " the two again one step each in turn, in a random order per pair"
        f" ({result['config'].get('pairs', 0)} pairs at most; n/a: not run), and gives the"
        " median of the pairs' ratios with its 95% order-statistics interval; 'best rounds' is"
        " the ratio of the two rows' best rounds (their ms/step); 'floor ratio' the ratio of"
        " the bytes the two algorithms must move (their 'min' floors: no formulation can make"
        " the option cheaper than that, on a memory-bound step); 'XLA bytes ratio' the ratio of"
        " the bytes XLA's cost model counts for the two compiled steps (each kernel's operands"
        " and outputs), what the option costs in memory traffic as compiled.",
        "",
        comparisons_table(result.get("comparisons", [])),
        "## Targets",
        "",
    ]
    for check in checks:
        lines.append(
            f"- {'met' if check['met'] else '**missed**'}: {check['target']}: {check['value']}"
        )
    return "\n".join(lines) + "\n"
