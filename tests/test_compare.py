"""The main job, benchmarks/compare.py, end to end in its quick mode."""

import json
import math

import pytest

import optim_zoo
from benchmarks import compare
from benchmarks.common import contenders


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("compare")
    return out_dir, compare.main(["--quick", "--no-progress", "--out-dir", str(out_dir)])


@pytest.mark.slow
def test_every_optimizer_is_in_the_table(quick_run):
    _, result = quick_run
    names = [row["optimizer"] for row in result["results"]]
    assert names == [contender.name for contender in contenders.CONTENDERS]
    for name in (
        "optim_zoo.adan",
        "optim_zoo.adafactor",
        "optim_zoo.apollo",
        "optim_zoo.adai",
        "optim_zoo.adaiw",
        "optax.adamw",
        "optax.sgd",
    ):
        assert name in names
        assert f"| {name} |" in result["table"]


@pytest.mark.slow
def test_every_optimizer_trains(quick_run):
    _, result = quick_run
    for row in result["results"]:
        losses = row["curves"]["train_loss"]
        assert all(math.isfinite(loss) for loss in losses), row["optimizer"]
        # Cross-entropy of 10 classes starts near log(10); every method must make progress.
        assert row["final_train_loss"] < 0.5 * losses[0], row["optimizer"]
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["ms_per_step"] > 0
        assert row["state_bytes"] > 0


@pytest.mark.slow
def test_writes_plot_and_table(quick_run):
    out_dir, result = quick_run
    png = out_dir / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out_dir / "compare.json").read_text())
    assert saved["table"] == result["table"]
    assert [row["optimizer"] for row in saved["results"]] == [
        row["optimizer"] for row in result["results"]
    ]
    assert saved["config"]["steps"] == 60


def test_unknown_optimizer_filter_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        compare.main(["--quick", "--optimizers", "no-such-optimizer", "--out-dir", str(tmp_path)])


def test_both_registries_cover_every_optimizer():
    """The benchmarks' contenders and the tests' configurations are kept apart on purpose
    (benchmarks/README.md, "Two registries"); what they must agree on is that neither leaves
    an optimizer of the package out."""
    from fixtures import registry

    exported = {
        name
        for name in optim_zoo.__all__
        if getattr(getattr(optim_zoo, name), "__module__", None) == "optim_zoo.alias"
    }
    assert {"adan", "adafactor", "apollo", "adai", "adaiw", "came"} <= exported
    benchmarked = {c.factory.__name__ for c in contenders.CONTENDERS} | {
        factory.__name__ for factory, _ in contenders.FACTORED_FORMS.values()
    }
    tested = {config.factory.__name__ for config in registry.CONFIGS}
    assert exported - benchmarked == set()
    assert exported - tested == set()
