"""benchmarks/speed/gpu_check.py's logic, in its dry run on a tiny tree (any backend)."""

import contextlib
import json

import optim_zoo
from benchmarks.speed import gpu_check


def _dry_run(tmp_path, *extra):
    return gpu_check.main(["--dry-run", "--out-dir", str(tmp_path), *extra])


def _rows(result):
    return {row["name"]: row for row in result["rows"]}


def test_dry_run_reports_every_kind_of_row(tmp_path):
    result = _dry_run(tmp_path, "--steering", "default", "--only", "adafactor")
    rows = _rows(result)
    assert set(rows) == {
        "optim_zoo Adafactor (steering default)",
        "optax Adafactor",
        "torch AdamW (fused=True)",
        "same-bytes pass (0 state arrays)",
    }
    if gpu_check.torch_skip_reason() is not None:
        assert rows["torch AdamW (fused=True)"]["skipped"] == gpu_check.torch_skip_reason()
    for name, row in rows.items():
        if "skipped" in row:
            continue
        assert row["median_ms"] > 0 and row["samples"] >= 1, name
        if name.startswith("same-bytes"):
            assert row["bytes_moved"] > 0 and row["kernels_per_leaf"] > 0
            continue
        assert row["bytes_single"] == 3 * row["param_bytes"] + 2 * row["state_bytes"]
        assert row["time_over_floor"] > 0 and row["time_over_same_bytes_pass"] > 0
        if row["library"] != "torch":
            assert row["xla_bytes"] > 0 and row["kernels_per_leaf"] > 0 and row["finite"]
    # Adafactor's state is factored: its same-bytes pass reads p and g and writes p.
    assert rows["optim_zoo Adafactor (steering default)"]["state_arrays"] == 0
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["table"] == result["table"]
    assert result["table"] in (tmp_path / "gpu_check.md").read_text()


def test_dry_run_times_steering_on_against_off(tmp_path, monkeypatch):
    # A stand-in switch until (or besides) the package's: what matters here is that each arm
    # is built under its own setting and the two are compared.
    events = []

    @contextlib.contextmanager
    def switch(enabled):
        events.append(enabled)
        yield

    monkeypatch.setattr(optim_zoo, "compiler_steering", switch, raising=False)
    result = _dry_run(tmp_path, "--only", "adafactor", "--no-torch")
    assert events == [True, False]
    rows = _rows(result)
    assert "optim_zoo Adafactor (steering on)" in rows
    assert "optim_zoo Adafactor (steering off)" in rows
    (found,) = [c for c in result["comparisons"] if c["arm"] == "on"]
    assert found["row"] == "optim_zoo Adafactor" and found["pairs"] == 4
    assert "x [" in result["table"]


def test_dry_run_with_the_package_steering(tmp_path):
    result = _dry_run(tmp_path, "--only", "adan", "--no-torch")
    assert [c["row"] for c in result["comparisons"] if c["arm"] == "on"] == [
        "optim_zoo Adan",
        "optim_zoo Factored Adan",
    ]


def test_a_row_past_the_deadline_is_skipped_not_run(tmp_path):
    argv = ["--steering", "default", "--only", "adafactor", "--no-torch", "--deadline", "0"]
    result = _dry_run(tmp_path, *argv)
    rows = _rows(result)
    assert rows.pop("torch AdamW (fused=True)")["skipped"] == "--no-torch"
    assert set(rows) == {
        "optim_zoo Adafactor (steering default)",
        "optax Adafactor",
        "same-bytes pass (0 state arrays)",
    }
    assert all(row["skipped"].startswith("deadline") for row in rows.values())
    assert (tmp_path / "gpu_check.md").exists()
