"""The study (benchmarks/study.py) end to end in its quick mode: structure and finiteness only.

The quick mode's runs are far too short for the claims' verdicts to mean anything; this checks
that every code path runs and that what it writes is complete and well formed.
"""

import json
import math

import pytest

from benchmarks import protocol, study, tasks

CLAIMS = ("adan", "adai", "apollo", "adafactor")


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("study")
    return out_dir, study.run_study("quick", out_dir, progress=False)


def test_every_task_has_every_optimizer(quick_study):
    _, results = quick_study
    assert list(results["tasks"]) == list(tasks.TASK_BUILDERS)
    names = [method.name for method in protocol.METHODS]
    assert len(names) == 8 and "optax.adamw" in names and "optax.sgd" in names
    assert "optim_zoo.came" in names
    for task in results["tasks"].values():
        assert list(task["results"]) == names
        for name in names:
            assert f"| {name} |" in task["table"]


def test_runs_are_complete_and_neural_ones_finite(quick_study):
    _, results = quick_study
    seeds = results["config"]["seeds"]
    assert len(seeds) >= 3
    for task in results["tasks"].values():
        evaluations = task["steps"] // task["eval_every"] + 1
        for row in task["results"].values():
            assert row["best_lr"] in row["lr_grid"]
            for metric in task["select"]:
                assert len(row["grid_final"][metric]) == len(row["lr_grid"])
            assert len(row["curves"]["step"]) == evaluations
            assert row["state_bytes"] > 0 and row["seconds"] > 0
            for metric in task["metric_labels"]:
                per_seed = row["curves"][metric]["per_seed"]
                assert len(per_seed) == len(seeds)
                assert all(len(curve) == evaluations for curve in per_seed)
                assert len(row["final"][metric]["per_seed"]) == len(seeds)
                if task["family"] == "neural":
                    # Tiny steps of sensible learning rates: nothing may diverge here. (On the
                    # landscapes a grid point may diverge; JSON records it as null.)
                    assert row["final"][metric]["finite"], (task["name"], row["optimizer"])
                    assert all(math.isfinite(v) for v in row["final"][metric]["per_seed"])
            if task["name"].startswith("digits_"):
                eigenvalues = row["hessian_top_eigenvalue"]["per_seed"]
                assert len(eigenvalues) == len(seeds)
                assert all(math.isfinite(v) for v in eigenvalues)
                assert row["hessian_relative_change"] >= 0


def test_every_claim_is_evaluated(quick_study):
    _, results = quick_study
    assert list(results["claims"]) == list(CLAIMS)
    for name, claim in results["claims"].items():
        assert claim["verdict"] in ("PASS", "FAIL"), name
        assert claim["checks"], name
        for check in claim["checks"]:
            assert isinstance(check["pass"], bool)
            assert check["value"] is None or math.isfinite(check["value"])
        assert f"| {name} |" in results["claims_table"]
    matrices = results["adafactor_matrices"]
    assert matrices and all(m["second_moment_floats"] == m["n_plus_m"] for m in matrices)


def test_writes_strict_json_markdown_and_figures(quick_study):
    out_dir, results = quick_study
    # Strict JSON: diverged values are null, never NaN or Infinity.
    saved = json.loads((out_dir / "study.json").read_text(), parse_constant=pytest.fail)
    assert saved == json.loads(json.dumps(results))
    report = (out_dir / "study.md").read_text()
    for name in CLAIMS:
        assert f"**{name}: " in report
    assert set(results["figures"]) >= {
        "lr_grids.png",
        "claim_adan.png",
        "claim_adai.png",
        "claim_apollo.png",
        "claim_adafactor.png",
        *(f"task_{name}.png" for name in tasks.TASK_BUILDERS),
    }
    for name in results["figures"]:
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_power_iteration_finds_the_top_eigenvalue():
    import jax
    import jax.numpy as jnp

    eigenvalues = jnp.array([5.0, 2.0, 1.0, 0.5])
    value = protocol.top_hessian_eigenvalue(
        lambda p: 0.5 * jnp.sum(eigenvalues * p["x"] ** 2),
        {"x": jnp.ones(4)},
        iterations=100,
        key=jax.random.key(0),
    )
    assert value == pytest.approx(5.0, rel=1e-4)


def test_unknown_task_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown tasks"):
        study.run_study("quick", tmp_path, tasks=["no_such_task"], progress=False)
