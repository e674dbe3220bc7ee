"""benchmarks/claims/beyond.py end to end in its quick mode: structure and finiteness only.

The quick mode's runs are far too short for the comparisons to mean anything; this checks that
every code path runs and that what it writes is complete and well formed.
"""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks.claims import beyond, protocol, tasks

VERDICTS = ("worse", "better", "level", "both diverged")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("beyond")
    return out_dir, beyond.run_beyond("quick", out_dir, progress=False)


def _finite(summary):
    return summary["finite"] and all(math.isfinite(v) for v in summary["per_seed"])


@pytest.mark.slow
def test_factored_variants_ran_the_protocol_and_factored_the_matrices(quick):
    _, results = quick
    assert list(results["tasks"]) == list(beyond.QUICK_TASKS)
    for task in results["tasks"].values():
        assert list(task["factored"]) == list(beyond.FACTORED)
        neural = task["family"] == "neural"
        for row in task["factored"].values():
            assert row["best_lr"] in row["lr_grid"]
            assert row["seeds"] == list(beyond.SEEDS)
            assert row["state_bytes"] > 0
            leaves = row["factored_leaves"]
            # Every weight matrix of the models has both axes >= 8; the landscapes have none.
            assert leaves["factored"] == leaves["matrices"] == (3 if neural else 0)
            for metric in task["metric_labels"]:
                assert len(row["final"][metric]["per_seed"]) == len(beyond.SEEDS)
                if neural:
                    assert _finite(row["final"][metric]), (task["name"], row["optimizer"])
                assert row["vs_original"][metric]["verdict"] in VERDICTS
                assert row["vs_adamw"][metric]["verdict"] in VERDICTS
        if neural:
            original = results["study_tasks"][task["name"]]["results"]
            for name, row in task["factored"].items():
                # A factored second moment is smaller than the original's full one.
                assert row["state_bytes"] < original[row["original"]]["state_bytes"], name


@pytest.mark.slow
def test_bf16_state_ran_at_the_studys_rates_and_saves_bytes(quick):
    _, results = quick
    for name, task in results["tasks"].items():
        study_rows = results["study_tasks"][name]["results"]
        assert list(task["bf16_state"]) == [m.name for m in beyond.original_methods()]
        for optimizer, entry in task["bf16_state"].items():
            assert entry["lr"] == study_rows[optimizer]["best_lr"]
            assert entry["bytes_saved"] > 0
            assert entry["bfloat16"]["state_bytes"] < entry["float32"]["state_bytes"]
            for metric in task["metric_labels"]:
                for run in ("float32", "bfloat16"):
                    summary = entry[run]["final"][metric]
                    assert len(summary["per_seed"]) == len(beyond.SEEDS)
                    if task["family"] == "neural":
                        assert _finite(summary), (name, optimizer, run, metric)
                assert entry["bf16_vs_f32"][metric]["verdict"] in VERDICTS


@pytest.mark.slow
def test_golden_deviations_are_finite_and_the_float64_run_is_the_golden(quick):
    _, results = quick
    golden = results["golden"]
    assert golden["steps"] == list(beyond.GOLDEN_STEPS["quick"])
    families = {row["case"].split("_")[0] for row in golden["cases"]}
    assert families >= {"adan", "adafactor", "apollo", "adai", "adaiw"}
    for row in golden["cases"]:
        assert row["float64_vs_golden_5_steps"] < 1e-8, row["case"]
        for count in map(str, golden["steps"]):
            values = row["steps"][count]
            assert all(math.isfinite(v) and v >= 0 for v in values.values()), row["case"]
        # bfloat16 storage did take effect: the runs differ somewhere.
        assert row["steps"][str(golden["steps"][-1])]["bf16_vs_f32"] > 0, row["case"]


@pytest.mark.slow
def test_writes_strict_json_markdown_and_figure(quick):
    out_dir, results = quick
    saved = json.loads((out_dir / "beyond.json").read_text(), parse_constant=pytest.fail)
    assert saved == json.loads(json.dumps(results))
    report = (out_dir / "beyond.md").read_text()
    for heading in ("## 1. Factored", "## 2. bfloat16", "## 3. The golden"):
        assert heading in report
    for name in beyond.FACTORED:
        assert f"| {name} |" in report
    assert results["figures"] == ["finals.png"]
    assert (out_dir / "finals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bf16_state_method_stores_moments_in_bfloat16():
    task = tasks.TASK_BUILDERS["digits_mlp"](tasks.QUICK)
    for method in beyond.original_methods():
        _, state = protocol.state_shapes(task, beyond.bf16_state_method(method))
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(state)}
        assert jnp.dtype(jnp.bfloat16) in dtypes, method.name
        kwargs = beyond.bf16_state_method(method).contender.kwargs
        # Adafactor's contender has no momentum: only its second moment changes.
        assert ("dtype_momentum" in kwargs) == (method.name != "optim_zoo.adafactor")


@pytest.mark.parametrize(
    "variant, reference, higher, verdict",
    [
        ((1.0, 0.1), (1.5, 0.2), False, "better"),  # lower loss by more than the larger std
        ((1.0, 0.1), (1.1, 0.2), False, "level"),
        ((0.90, 0.01), (0.95, 0.01), True, "worse"),  # lower accuracy
        ((None, 0.0), (1.0, 0.1), False, "worse"),  # diverged
    ],
)
def test_compare_finals(variant, reference, higher, verdict):
    def summary(mean, std):
        if mean is None:
            return {"mean": None, "std": None, "per_seed": [None] * 4, "finite": False}
        return {"mean": mean, "std": std, "per_seed": [mean] * 4, "finite": True}

    assert beyond.compare_finals(summary(*variant), summary(*reference), higher)["verdict"] == (
        verdict
    )


def test_part_two_runs_the_optimizers_asked_for():
    assert [m.name for m in beyond.original_methods(("optim_zoo.came",))] == ["optim_zoo.came"]
    # In the study's order, whatever order they are asked in.
    names = ("optim_zoo.adaiw", "optim_zoo.adan")
    assert [m.name for m in beyond.original_methods(names)] == list(reversed(names))
    with pytest.raises(ValueError, match="optax.adamw"):
        beyond.original_methods(("optax.adamw",))
