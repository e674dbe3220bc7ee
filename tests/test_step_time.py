"""benchmarks/step_time.py end to end in its quick mode, JAX rows only (no torch needed)."""

import json
import math

import pytest

from benchmarks import step_time


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("step_time")
    argv = ["--quick", "--no-torch", "--no-plot", "--out-dir", str(out_dir)]
    return out_dir, step_time.main(argv)


def test_every_optim_zoo_optimizer_and_optax_peer_is_timed(quick_run):
    _, result = quick_run
    for tree in result["config"]["trees"]:
        timed = {
            (row["library"], row["algorithm"])
            for row in result["rows"]
            if row["tree"] == tree and "skipped" not in row
        }
        for algorithm in ("Adan", "Adafactor", "Apollo", "Adai", "AdaiW"):
            assert ("optim_zoo", algorithm) in timed
        for algorithm in ("AdamW", "Adan", "Adafactor"):
            assert ("optax", algorithm) in timed


def test_rows_are_consistent(quick_run):
    _, result = quick_run
    assert result["bandwidth_gbs"]["used"] > 0
    for row in result["rows"]:
        assert row["finite"], row
        assert row["ms_per_step"] > 0 and math.isfinite(row["ms_per_step"])
        # The forced extra passes only ever add bytes.
        assert row["bytes_min"] >= row["bytes_single"] > 0
        assert row["floor_min_ms"] >= row["floor_ms"] > 0
        assert row["compile_s"] > 0
        assert row["fusions_per_leaf"] > 0
        if row["library"] == "optim_zoo" and row["algorithm"] in ("Adan", "Apollo", "Adai"):
            # Three full-size state leaves or more per parameter (Adafactor's are factored).
            assert row["state_per_param"] >= 3


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
    assert step_time.ALGORITHMS["Adafactor"].extra_reads(shape, 4) == 3 * 4 * size
    assert step_time.ALGORITHMS["Adan"].extra_reads(shape, 4) == 0
    assert step_time.ALGORITHMS["Apollo"].extra_reads(shape, 4) == 4 * 4 * size
    assert step_time.ALGORITHMS["AdaiW"].extra_reads(shape, 4) == 2 * 4 * size


def test_unknown_filter_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        step_time.main(["--quick", "--no-torch", "--only", "nothing", "--out-dir", str(tmp_path)])
