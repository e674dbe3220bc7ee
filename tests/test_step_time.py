"""benchmarks/speed/step_time.py end to end in its quick mode, JAX rows only (no torch needed).

With the byte counter it reports (benchmarks/common/traffic.py) and the implementations it times
(benchmarks/common/contenders.py).
"""

import json
import math

import jax.numpy as jnp
import optax
import pytest

import optim_zoo
from benchmarks.common import contenders, traffic
from benchmarks.speed import step_report, step_time

OPTIM_ZOO_ALGORITHMS = (
    "Adan",
    "Factored Adan",
    "Adafactor",
    "Apollo",
    "Adai",
    "Factored Adai",
    "AdaiW",
    "Factored AdaiW",
    "CAME",
)
FACTORED = {"Factored Adan": "Adan", "Factored Adai": "Adai", "Factored AdaiW": "AdaiW"}


# Every row on the quick run's factored tree; the many-leaves tree's per-leaf overhead target
# has a run of its own, with only the rows that target compares.
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("step_time")
    argv = ["--quick", "--no-torch", "--no-plot", "--trees", "tiny", "--out-dir", str(out_dir)]
    return out_dir, step_time.main([*argv, "--pairs", "2"])


@pytest.mark.slow
def test_many_leaves_tree_checks_the_per_leaf_overhead(tmp_path):
    argv = ["--quick", "--no-torch", "--no-plot", "--trees", "10x100", "--out-dir", str(tmp_path)]
    result = step_time.main([*argv, "--only", "adamw", "adai"])
    assert {(row["library"], row["algorithm"]) for row in result["rows"]} >= {
        ("optax", "AdamW"),
        ("optim_zoo", "Adai"),
    }
    overhead = [c["target"] for c in result["targets"] if "per-leaf overhead" in c["target"]]
    assert "Adai per-leaf overhead <= 2x optax.adamw's" in overhead, result["targets"]
    # Every optim_zoo row, variants too, against AdamW timed in the same rounds.
    assert f"Adai [{contenders.BF16_STATE}] per-leaf overhead <= 2x optax.adamw's" in overhead
    rows = _rows_by_key(result)
    for key, row in rows.items():
        if key[1] == "optim_zoo":
            assert len(row["pace"]["round_medians_s"]) == len(row["round_medians_s"]), key
            assert row["overhead_over_adamw"]["ratio"] >= 0
    # No leaf of this tree is large enough to factor: the factored rows hold the same state.
    for variant in ("", contenders.BF16_STATE):
        factored = rows[("10x100", "optim_zoo", "Factored Adai", variant)]["state_bytes"]
        assert factored == rows[("10x100", "optim_zoo", "Adai", variant)]["state_bytes"]


def test_paced_overhead_compares_round_by_round():
    # 1 MB of parameters, AdamW's state 2 MB, the row's 3 MB, at 1 GB/s: floors of 7 and 9 ms.
    mb = 1e6
    row = {
        "param_bytes": mb,
        "bytes_single": 9 * mb,
        "round_medians_s": [0.029, 0.059, 0.019],  # overheads 20, 50, 10 ms
        "pace": {"state_bytes": 2 * mb, "round_medians_s": [0.017, 0.017, 0.012]},  # 10, 10, 5
    }
    overhead = step_time.paced_overhead(row, bandwidth=1e9)
    assert overhead["ratio"] == pytest.approx(2.0)
    assert overhead["quartiles"] == pytest.approx([2.0, 3.5])


def _rows_by_key(result):
    """{(tree, library, algorithm, variant): row} over the timed rows."""
    return {
        (row["tree"], row["library"], row["algorithm"], row["variant"]): row
        for row in result["rows"]
        if "skipped" not in row
    }


@pytest.mark.slow
def test_every_optim_zoo_optimizer_and_optax_peer_is_timed(quick_run):
    _, result = quick_run
    for tree in result["config"]["trees"]:
        timed = {
            (row["library"], row["algorithm"])
            for row in result["rows"]
            if row["tree"] == tree and "skipped" not in row and not row["variant"]
        }
        for algorithm in ("Adan", "Adafactor", "Apollo", "Adai", "AdaiW"):
            assert ("optim_zoo", algorithm) in timed
        for algorithm in ("AdamW", "Adan", "Adafactor"):
            assert ("optax", algorithm) in timed


@pytest.mark.slow
def test_factored_and_bf16_state_rows_are_timed(quick_run):
    _, result = quick_run
    rows = _rows_by_key(result)
    for tree in result["config"]["trees"]:
        for algorithm in OPTIM_ZOO_ALGORITHMS:
            assert (tree, "optim_zoo", algorithm, "") in rows
            assert (tree, "optim_zoo", algorithm, contenders.BF16_STATE) in rows
    assert "[bf16 state]" in result["table"]
    assert "| Factored AdaiW |" in result["table"]


@pytest.mark.slow
def test_bf16_state_rows_count_their_smaller_state(quick_run):
    _, result = quick_run
    rows = _rows_by_key(result)
    for tree in result["config"]["trees"]:
        for algorithm in OPTIM_ZOO_ALGORITHMS:
            full = rows[(tree, "optim_zoo", algorithm, "")]
            half = rows[(tree, "optim_zoo", algorithm, contenders.BF16_STATE)]
            assert half["param_bytes"] == full["param_bytes"]
            assert half["state_bytes"] < full["state_bytes"]
            assert half["state_per_param"] < full["state_per_param"]
            assert half["bytes_single"] < full["bytes_single"]
            assert half["bytes_min"] - half["bytes_single"] <= (
                full["bytes_min"] - full["bytes_single"]
            )
            assert half["state_itemsizes"]["second_moment"] == 2
            assert full["state_itemsizes"]["second_moment"] == 4
            # Adafactor runs without momentum: no momentum state to read a dtype from.
            assert half["state_itemsizes"]["momentum"] == (4 if algorithm == "Adafactor" else 2)


@pytest.mark.slow
def test_factored_rows_hold_less_state_where_a_leaf_is_factored(quick_run):
    _, result = quick_run
    rows = _rows_by_key(result)
    for tree in result["config"]["trees"]:
        shapes = step_time.QUICK_TREES[tree]()
        any_factored = any(traffic.is_factored(shape) for shape in step_time.leaf_shapes(shapes))
        for factored, plain in FACTORED.items():
            for variant in ("", contenders.BF16_STATE):
                ours = rows[(tree, "optim_zoo", factored, variant)]["state_bytes"]
                base = rows[(tree, "optim_zoo", plain, variant)]["state_bytes"]
                assert ours < base if any_factored else ours == base, (tree, factored, variant)
    assert any(
        traffic.is_factored(shape)
        for shape in step_time.leaf_shapes(step_time.QUICK_TREES["tiny"]())
    )


@pytest.mark.slow
def test_each_option_is_timed_against_its_original(quick_run):
    out_dir, result = quick_run
    rows = _rows_by_key(result)
    for tree in result["config"]["trees"]:
        for algorithm in OPTIM_ZOO_ALGORITHMS:
            assert (tree, "optim_zoo", algorithm, contenders.BF16_STATE_SR) in rows
        for variant in (contenders.L2_DECAY, contenders.DECOUPLED_DECAY, contenders.STABLE_DECAY):
            assert (tree, "optim_zoo", "Apollo", variant) in rows
        assert (tree, "optim_zoo", "Adai", contenders.NO_DECAY) in rows
    # Every comparison found both its rows, on every tree, with the ratio of their times.
    assert len(result["comparisons"]) == len(contenders.COMPARISONS) * len(
        result["config"]["trees"]
    )
    named = {
        (tree, step_report.row_name((algorithm, variant))): row
        for (tree, library, algorithm, variant), row in _rows_by_key(result).items()
        if library == "optim_zoo"
    }
    for c in result["comparisons"]:
        assert c["ratio_of_best"] == pytest.approx(c["ms"] / c["reference_ms"])
        # The ratio pairs the rows' rounds: one round here, so it is the rows' ratio too.
        a, b = named[(c["tree"], c["row"])], named[(c["tree"], c["reference"])]
        assert len(a["round_medians_s"]) == len(b["round_medians_s"]) == 1
        assert c["ratio"] == pytest.approx(a["round_medians_s"][0] / b["round_medians_s"][0])
        assert c["ratio_quartiles"] == pytest.approx([c["ratio"], c["ratio"]])
        assert c["xla_bytes_ratio"] == pytest.approx(a["xla_bytes"] / b["xla_bytes"])
        assert c["floor_ratio"] == pytest.approx(a["bytes_min"] / b["bytes_min"])
        if c["row"] == "Apollo [L2 decay]":  # the sums read p too
            assert c["floor_ratio"] > 1 and c["xla_bytes_ratio"] > 1
        # And again step by step, the two rows interleaved: two pairs here.
        assert c["paired"]["pairs"] == 2
        low, high = c["paired"]["interval"]
        assert low <= c["paired"]["ratio"] <= high
    report = (out_dir / "step_time.md").read_text()
    assert "## Variants against their originals" in report
    assert "step by step" in report


@pytest.mark.slow
def test_rows_are_consistent(quick_run):
    _, result = quick_run
    assert result["bandwidth_gbs"]["used"] > 0
    for row in result["rows"]:
        assert row["finite"], row
        assert row["ms_per_step"] > 0 and math.isfinite(row["ms_per_step"])
        # The single pass counts the state as allocated; the forced passes only add bytes.
        assert row["bytes_single"] == 3 * row["param_bytes"] + 2 * row["state_bytes"]
        assert row["bytes_min"] >= row["bytes_single"] > 0
        assert row["floor_min_ms"] >= row["floor_ms"] > 0
        assert row["compile_s"] > 0
        assert row["fusions_per_leaf"] > 0
        if (
            row["library"] == "optim_zoo"
            and row["algorithm"] in ("Adan", "Apollo", "Adai")
            and not row["variant"]
        ):
            # Three full-size state leaves or more per parameter (Adafactor's are factored).
            assert row["state_per_param"] >= 3


@pytest.mark.slow
def test_targets_leave_out_the_new_rows(quick_run):
    _, result = quick_run
    published = [
        row
        for row in result["rows"]
        if not row["variant"] and row["algorithm"] in step_report.PUBLISHED
    ]
    assert len(published) < len(result["rows"])
    trees = result["config"]["trees"]
    many = next((t for t in step_time.MANY_LEAVES_TREES if t in trees), None)
    # The same targets as from the published algorithms' default rows alone.
    assert step_report.check_targets(published, trees[0], many) == result["targets"]
    for check in result["targets"]:
        assert "Factored" not in check["target"]


@pytest.mark.slow
def test_writes_json_and_markdown(quick_run):
    out_dir, result = quick_run
    saved = json.loads((out_dir / "step_time.json").read_text())
    assert saved["table"] == result["table"]
    report = (out_dir / "step_time.md").read_text()
    assert result["table"] in report
    assert "## Targets" in report


def test_forced_passes_match_the_write_up():
    # A factored 256x512 float32 leaf: Adafactor re-reads g twice and p once.
    shape = (256, 512)
    size = 256 * 512
    algorithms = traffic.ALGORITHMS
    assert algorithms["Adafactor"].extra_reads(shape, 4) == 3 * 4 * size
    assert algorithms["Adan"].extra_reads(shape, 4) == 0
    assert algorithms["Apollo"].extra_reads(shape, 4) == 4 * 4 * size
    assert algorithms["AdaiW"].extra_reads(shape, 4) == 2 * 4 * size
    # Factored: Adan re-reads two momentum arrays (m and v); Adai g and p; AdaiW g.
    assert algorithms["Factored Adan"].extra_reads(shape, 4) == 2 * 4 * size
    assert algorithms["Factored Adai"].extra_reads(shape, 4) == 2 * 4 * size
    assert algorithms["Factored AdaiW"].extra_reads(shape, 4) == 4 * size
    # A leaf that is not factored is the unfactored algorithm's.
    vector = (1000,)
    for factored, plain in FACTORED.items():
        assert algorithms[factored].extra_reads(vector, 4) == algorithms[plain].extra_reads(
            vector, 4
        )


def test_forced_passes_count_the_state_dtype():
    shape = (256, 512)
    size = 256 * 512
    bf16 = traffic.StateItemsizes(momentum=2, second_moment=2)
    algorithms = traffic.ALGORITHMS
    # Apollo re-reads g (float32) and m, d, B (bfloat16).
    assert algorithms["Apollo"].extra_reads(shape, 4, bf16) == (4 + 3 * 2) * size
    assert algorithms["Adai"].extra_reads(shape, 4, bf16) == (2 * 4 + 2) * size
    assert algorithms["Factored Adan"].extra_reads(shape, 4, bf16) == 2 * 2 * size
    # Parameter-side re-reads do not change.
    assert algorithms["Adafactor"].extra_reads(shape, 4, bf16) == 3 * 4 * size
    assert algorithms["Factored Adai"].extra_reads(shape, 4, bf16) == 2 * 4 * size


def test_forced_passes_count_a_decay_other_than_the_rows_own():
    shapes = [(256, 512), (1000,)]
    size = 256 * 512 + 1000
    algorithms = traffic.ALGORITHMS
    bf16 = traffic.StateItemsizes(momentum=2, second_moment=2)

    def extra(name, decay, state=None):
        own = traffic.traffic(shapes, 4, 0, algorithms[name], state)
        other = traffic.traffic(shapes, 4, 0, algorithms[name], state, decay)
        assert other["bytes_single"] == own["bytes_single"]
        return other["bytes_min"] - own["bytes_min"]

    # Apollo runs without decay: L2 reads p in the sums' pass, stable decay B and d once more.
    assert extra("Apollo", "L2") == 4 * size
    assert extra("Apollo", "stable") == 8 * size
    assert extra("Apollo", "stable", bf16) == 4 * size
    # Adai's own decay is L2: without it, the mean's pass does not read p.
    assert extra("Adai", "none") == extra("Factored Adai", "none") == -4 * size
    # Decoupled decay reads p where the single pass does; and decays the rows run already.
    for name in algorithms:
        assert extra(name, "decoupled") == 0
    assert extra("Adai", "L2") == extra("Adan", "none") == 0
    # The variant rows of a run carry their decay.
    assert set(contenders.DECAY_OF_VARIANT.values()) == {"none", "L2", "decoupled", "stable"}


def test_state_itemsizes_read_the_allocated_state():
    params = {"w": jnp.zeros((256, 128), jnp.float32), "b": jnp.zeros((128,), jnp.float32)}
    bf16 = {"dtype_momentum": jnp.bfloat16, "dtype_second_moment": jnp.bfloat16}
    cases = [
        (optim_zoo.adan(1e-3), (4, 4)),
        (optim_zoo.adan(1e-3, **bf16), (2, 2)),
        (optim_zoo.factored_adan(1e-3, **bf16), (2, 2)),
        (optim_zoo.apollo(1e-2, dtype_second_moment=jnp.bfloat16), (4, 2)),
        (optim_zoo.factored_adai(0.1, dtype_momentum=jnp.bfloat16), (2, 4)),
        (optim_zoo.adafactor(dtype_second_moment=jnp.bfloat16), (4, 2)),
        (optim_zoo.adafactor(momentum=0.9, dtype_momentum=jnp.bfloat16), (2, 4)),
    ]
    for tx, (momentum, second_moment) in cases:
        sizes = traffic.state_itemsizes(tx.init(params), 4)
        assert (sizes.momentum, sizes.second_moment) == (momentum, second_moment)
    # 8-bit codes: a byte and a 64th of a float32 scale an element where a leaf is coded (w),
    # the float32 of the leaves too small to code (b) weighed in.
    eight_bit = {"dtype_momentum": jnp.int8, "dtype_second_moment": jnp.uint8}
    coded = ((1 + 4 / 64) * 256 * 128 + 4 * 128) / (256 * 128 + 128)
    for tx in (optim_zoo.adan(1e-3, **eight_bit), optim_zoo.apollo(1e-2, **eight_bit)):
        sizes = traffic.state_itemsizes(tx.init(params), 4)
        assert sizes.momentum == pytest.approx(coded) and sizes.second_moment == sizes.momentum
    # A state without optim_zoo's fields (optax's AdamW) gets the defaults.
    sizes = traffic.state_itemsizes(optax.adamw(1e-3).init(params), 4)
    assert sizes == traffic.StateItemsizes.default(4)


def test_only_selects_by_algorithm_word_library_or_variant():
    rows = contenders.implementations(with_torch=False)

    def names(word):
        return {c.name for c in rows if c.matches({word})}

    assert names("adan") == {
        "optim_zoo Adan",
        "optim_zoo [bf16 state] Adan",
        "optim_zoo [bf16 state, stochastic rounding] Adan",
        "optim_zoo [no decay] Adan",
        "optim_zoo [decoupled decay] Adan",
        "optax Adan",
        "optim_zoo Factored Adan",
        "optim_zoo [bf16 state] Factored Adan",
        "optim_zoo [bf16 state, stochastic rounding] Factored Adan",
    }
    assert names("bf16") == {c.name for c in rows if "bf16" in c.variant}
    assert names("stochastic") == {c.name for c in rows if c.variant == contenders.BF16_STATE_SR}
    assert names("decay") == {c.name for c in rows if c.variant.endswith("decay")}
    assert len(names("factored")) == 10  # three algorithms, their variants, one no decay


def test_unknown_filter_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        step_time.main(["--quick", "--no-torch", "--only", "nothing", "--out-dir", str(tmp_path)])
