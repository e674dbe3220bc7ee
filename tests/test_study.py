"""The study (benchmarks/claims/study.py) end to end in its quick mode: structure and finiteness.

The quick mode's runs are far too short for the claims' verdicts to mean anything; this checks
that every code path runs and that what it writes is complete and well formed.
"""

import json
import math

import pytest

from benchmarks.claims import protocol, study, tasks

CLAIMS = ("adan", "adai", "apollo", "adafactor", "came")


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("study")
    return out_dir, study.run_study("quick", out_dir, progress=False)


@pytest.mark.slow
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


def every_task(results):
    """Each task's results, at constant rates and under every other schedule."""
    for run in study.protocols(results).values():
        yield from run["tasks"].values()


@pytest.mark.slow
def test_every_schedule_runs_the_claims_tasks(quick_study):
    _, results = quick_study
    runs = study.protocols(results)
    assert list(runs) == list(protocol.SCHEDULES) == ["constant", "warmup_cosine"]
    neural = [n for n, t in results["tasks"].items() if t["family"] == "neural"]
    assert neural == ["digits_mlp", "digits_cnn", "char_transformer"]
    names = [method.name for method in protocol.METHODS]
    for schedule, run in runs.items():
        expected = list(tasks.TASK_BUILDERS) if schedule == "constant" else neural
        assert list(run["tasks"]) == expected
        for task in run["tasks"].values():
            assert task["schedule"] == schedule
            assert list(task["results"]) == names


@pytest.mark.slow
def test_runs_are_complete_and_neural_ones_finite(quick_study):
    _, results = quick_study
    seeds = results["config"]["seeds"]
    assert len(seeds) >= 3
    for task in every_task(results):
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


@pytest.mark.slow
def test_every_claim_is_evaluated_under_every_schedule(quick_study):
    _, results = quick_study
    for run in study.protocols(results).values():
        assert list(run["claims"]) == list(CLAIMS)
        for name, claim in run["claims"].items():
            assert claim["verdict"] in ("PASS", "FAIL"), name
            assert claim["checks"], name
            for check in claim["checks"]:
                assert isinstance(check["pass"], bool)
                assert check["value"] is None or math.isfinite(check["value"])
            assert f"| {name} |" in run["claims_table"]
    matrices = results["adafactor_matrices"]
    assert matrices and all(m["second_moment_floats"] == m["n_plus_m"] for m in matrices)


@pytest.mark.slow
def test_writes_strict_json_markdown_and_figures(quick_study):
    out_dir, results = quick_study
    # Strict JSON: diverged values are null, never NaN or Infinity.
    saved = json.loads((out_dir / "study.json").read_text(), parse_constant=pytest.fail)
    assert saved == json.loads(json.dumps(results))
    report = (out_dir / "study.md").read_text()
    for name in CLAIMS:
        verdicts = [run["claims"][name]["verdict"] for run in study.protocols(results).values()]
        assert f"**{name}: {verdicts[0]} (constant), {verdicts[1]} (warmup_cosine).**" in report
    neural = [n for n, t in results["tasks"].items() if t["family"] == "neural"]
    assert set(results["figures"]) == {
        "lr_grids.png",
        "lr_grids_warmup_cosine.png",
        *(f"claim_{name}{suffix}.png" for name in CLAIMS for suffix in ("", "_warmup_cosine")),
        *(f"task_{name}.png" for name in tasks.TASK_BUILDERS),
        *(f"task_{name}_warmup_cosine.png" for name in neural),
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


def test_warmup_cosine_schedule_rises_to_the_peak_then_decays_to_zero():
    import numpy as np

    steps, peak = 200, 0.3
    schedule = protocol.learning_rate_schedule(peak, steps, "warmup_cosine")
    rates = np.asarray([float(schedule(c)) for c in range(steps + 1)])
    warmup = round(protocol.WARMUP_FRACTION * steps)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert rates[warmup] == pytest.approx(peak)
    np.testing.assert_allclose(
        rates[: warmup + 1], peak * np.arange(warmup + 1) / warmup, rtol=1e-6
    )
    assert np.all(np.diff(rates[: warmup + 1]) > 0) and np.all(np.diff(rates[warmup:]) < 0)
    middle = warmup + (steps - warmup) // 2
    assert rates[middle] == pytest.approx(peak / 2)  # cosine: half the peak halfway down
    assert protocol.learning_rate_schedule(peak, steps, "constant") == peak
    with pytest.raises(ValueError, match="schedule"):
        protocol.learning_rate_schedule(peak, steps, "step")


def test_apollo_warms_up_by_itself_only_at_constant_rates():
    apollo = next(m for m in protocol.METHODS if m.name == "optim_zoo.apollo")
    assert apollo.kwargs(0.01, 1000)["warmup"] == 100
    assert apollo.kwargs(0.01, 1000, "warmup_cosine")["warmup"] == 0


def test_came_claim_checks_loss_and_state_bytes():
    from benchmarks.claims import paper_claims as claims

    def row(val_loss, state_bytes):
        return {"final": {"val_loss": {"mean": val_loss, "std": 0.01}}, "state_bytes": state_bytes}

    def verdicts(came_loss, came_bytes):
        results = {
            "optim_zoo.came": row(came_loss, came_bytes),
            "optim_zoo.adafactor": row(2.3, 100),
            "optax.adamw": row(2.0, 2000),
        }
        found = {"char_transformer": {"results": results, "param_bytes": 1000}}
        return [check["pass"] for check in claims.claim_came(found)]

    assert verdicts(2.06, 1100) == [True, True]  # 3% worse, Adafactor's bytes + params
    assert verdicts(2.07, 1100) == [False, True]
    assert verdicts(2.0, 1101) == [True, False]
    assert claims.claim_came({}) == []
