"""The paired, interleaved timing (benchmarks/speed/paired.py), the package loaded at a git ref
(benchmarks/speed/reference.py), the HLO kernel count, and step_time.py's paired modes on tiny
trees."""

import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import optax
import pytest

import optim_zoo
from benchmarks.speed import paired, reference, step_time

# --- Statistics -------------------------------------------------------------------------------


def _coverage(k, n):
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


def test_median_interval_is_the_narrowest_with_the_coverage():
    for n in (6, 10, 50, 200):
        values = list(range(n))
        found = paired.median_interval(values)
        k = found["low"] + 1  # values are their own ranks, from 0
        assert found["high"] == n - k
        assert found["coverage"] == pytest.approx(_coverage(k, n))
        assert found["coverage"] >= 0.95
        assert _coverage(k + 1, n) < 0.95  # one rank narrower would not cover
    # n = 200: ranks 86 and 115, the textbook interval.
    assert paired.median_interval(list(range(200)))["low"] == 85
    # Too few values for 95%: the extremes, with what they cover.
    few = paired.median_interval([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (few["low"], few["high"]) == (1.0, 5.0)
    assert few["coverage"] == pytest.approx(1 - 2 / 2**5)


def test_compare_finds_a_ratio_under_drift():
    # Arm a is 10% slower than b; the machine's speed drifts by 2x over the rounds and each
    # sample has its own noise. The pairs see the 10%, not the drift.
    rng = random.Random(1)
    a, b = [], []
    for i in range(200):
        speed = 1 + i / 200
        a.append(1.1 * speed * rng.uniform(0.97, 1.03))
        b.append(speed * rng.uniform(0.97, 1.03))
    found = paired.compare(a, b)
    low, high = found["interval"]
    assert low < 1.1 < high and high - low < 0.02
    assert not found["contains_1"]
    assert found["pairs"] == 200
    assert abs(found["lag1_autocorrelation"]) < 0.3
    with pytest.raises(ValueError):
        paired.compare(a, b[:-1])
    assert paired.format_ratio(found).endswith("]")
    # Four pairs cover the median with 87.5% only: the report says so.
    assert paired.format_ratio(paired.compare(a[:4], b[:4])).endswith("] 88%")


def test_interleave_times_every_arm_in_every_round_in_random_orders():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = paired.interleave(runs, samples=30, reps=2, warmup=1)
    assert {name: len(t) for name, t in times.items()} == {"a": 30, "b": 30, "c": 30}
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    rounds = ["".join(calls[3 + 6 * i : 3 + 6 * (i + 1)][::2]) for i in range(30)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len(set(rounds)) > 1
    # A budget stops the rounds once the minimum is done.
    slow = {"a": lambda: time.sleep(0.002), "b": lambda: time.sleep(0.002)}
    times = paired.interleave(slow, samples=1000, budget_s=0.0, min_samples=3, warmup=0)
    assert len(times["a"]) == len(times["b"]) == 3


def test_calibrate_reps_batches_short_steps():
    assert paired.calibrate_reps({"a": lambda: time.sleep(0.01)}, 0.005) == 1
    assert paired.calibrate_reps({"a": lambda: None}, 0.005) > 10


# --- HLO --------------------------------------------------------------------------------------

HLO = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_computation (param_0: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  ROOT %multiply = f32[8]{0} multiply(%param_0, %param_0)
}

%fc.1 (param_0.1: f32[8]) -> f32[8] {
  %param_0.1 = f32[8]{0} parameter(0)
  ROOT %add = f32[8]{0} add(%param_0.1, %param_0.1)
}

%command_buffer (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %loop_multiply_fusion = f32[8]{0} fusion(%p), kind=kLoop, calls=%fused_computation
  ROOT %loop_add_fusion = f32[8]{0} fusion(%loop_multiply_fusion), kind=kLoop, calls=%fc.1
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %copy = f32[8]{0} copy(%x)
  %call = f32[8]{0} call(%copy), to_apply=%command_buffer
  %cublas = (f32[8]{0}, s8[0]{0}) custom-call(%call), custom_call_target="__cublas$gemm"
  %gte = f32[8]{0} get-tuple-element(%cublas), index=0
  ROOT %t = f32[8]{0} bitcast(%gte)
}
"""


def test_count_kernels_follows_calls_into_command_buffers():
    assert step_time.count_kernels(HLO) == {"copy": 1, "fusion": 2, "custom-call": 1}


def _compiled(tx, params):
    compiled, _ = step_time.compile_step(tx, params, tx.init(params), params)
    return compiled


def test_kernel_count_and_digest_of_compiled_steps():
    params = {"w": jnp.ones((16, 8)), "b": jnp.ones((8,))}
    text = _compiled(optim_zoo.adan(1e-3), params).as_text()
    entry = text[text.index("\nENTRY") :]
    kernels = step_time.count_kernels(text)
    # On the CPU nothing is called in sequence: every kernel is in the entry computation.
    assert kernels["fusion"] == entry.count(" fusion(")
    assert kernels.get("copy", 0) == entry.count(" copy(")
    # Another trace of the same optimizer is the same program; another optimizer is not.
    again = _compiled(optim_zoo.adan(1e-3), params).as_text()
    assert step_time.hlo_digest(again) == step_time.hlo_digest(text)
    other = _compiled(optax.adamw(1e-3), params).as_text()
    assert step_time.hlo_digest(other) != step_time.hlo_digest(text)


def test_same_bytes_pass_moves_the_single_pass_bytes():
    shapes = [(16, 8), (8,)]
    runs, moved, compiled = step_time.same_bytes_pass(shapes, jnp.float32, 2, copies=2)
    assert moved == (3 + 2 * 2) * (16 * 8 + 8) * 4
    for run in runs:
        run()
    assert step_time.count_kernels(compiled.as_text())["fusion"] == 3 * len(shapes)


# --- The package at a git ref -----------------------------------------------------------------


def test_rename_package_tokens_leaves_strings_and_comments():
    source = (
        "import optim_zoo\n"
        "from optim_zoo.alias import adan  # optim_zoo's\n"
        "x = optim_zoo.adan\n"
        'doc = "optim_zoo.adan"\n'
        "optim_zoo_like = 1\n"
    )
    renamed = reference.rename_package_tokens(source, "optim_zoo", "old_zoo")
    assert renamed == (
        "import old_zoo\n"
        "from old_zoo.alias import adan  # optim_zoo's\n"
        "x = old_zoo.adan\n"
        'doc = "optim_zoo.adan"\n'
        "optim_zoo_like = 1\n"
    )


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="no git executable")


@pytest.fixture
def repo(tmp_path_factory, monkeypatch):
    """A git repository of one commit holding today's package, standing in for the checkout:
    CI tests a copy of the tracked files without their history, and the reference must be
    found all the same."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(
        Path(optim_zoo.__file__).parent,
        root / "optim_zoo",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    for args in (["init", "-q"], ["add", "optim_zoo"], ["commit", "-q", "-m", "today"]):
        subprocess.run(["git", "-C", str(root), *args], check=True, env={**os.environ, **env})
    monkeypatch.setattr(reference, "REPO_ROOT", root)
    return root


@needs_git
def test_package_at_head_is_a_separate_copy_removed_afterwards(repo):
    params = {"w": jnp.ones((4, 3))}
    with reference.package_at("HEAD") as old:
        assert old.__name__.startswith("optim_zoo_at_") and old is not optim_zoo
        folder = Path(old.__file__).parent
        assert folder.is_dir() and not folder.is_relative_to(repo)
        tx = old.adan(1e-3)
        state = tx.init(params)
        assert type(state[0]).__module__.startswith(old.__name__)
        updates, _ = tx.update(params, state, params)
        assert updates["w"].shape == (4, 3)
    assert not folder.parent.exists()
    assert not [m for m in sys.modules if m.startswith(old.__name__)]
    with pytest.raises(RuntimeError):
        with reference.package_at("no-such-ref-anywhere"):
            pass


def _paired_run(tmp_path, *extra):
    argv = ["--quick", "--trees", "tiny", "--pairs", "3", "--out-dir", str(tmp_path), *extra]
    return step_time.main(argv)


@needs_git
def test_against_ref_compares_each_optimizer_with_the_reference(tmp_path, repo):
    result = _paired_run(tmp_path, "--against-ref", "HEAD", "--only", "adafactor", "--no-bf16")
    (row,) = result["rows"]
    assert row["name"] == "Adafactor"
    (c,) = row["comparisons"]
    assert (c["arm"], c["against"], c["pairs"]) == ("new", "ref", 3)
    assert c["interval"][0] <= c["ratio"] <= c["interval"][1]
    assert row["verdict"] in ("met", "missed", "undecided")
    assert row["same_program"]  # the reference commit holds today's package
    saved = json.loads((tmp_path / "against_ref.json").read_text())
    assert saved["config"]["reference_commit"] == reference.resolve("HEAD")
    assert result["table"] in (tmp_path / "against_ref.md").read_text()


def test_noise_check_pairs_a_step_and_a_pass_with_themselves(tmp_path):
    result = _paired_run(tmp_path, "--noise-check")
    (row,) = result["rows"]
    assert row["name"] == "Adan"
    pairs = [(c["arm"], c["against"]) for c in row["comparisons"]]
    assert pairs == [
        ("step", "step again"),
        ("same-bytes pass", "same-bytes pass again"),
        ("step", "same-bytes pass"),
    ]
    assert row["arms"]["same-bytes pass"]["state_arrays"] == 4  # Adan: m, v, n, prev
    assert (tmp_path / "noise.md").exists()


def recording_switch(events):
    """A stand-in for optim_zoo.compiler_steering that records the settings it is given."""

    @contextlib.contextmanager
    def switch(enabled):
        events.append(enabled)
        yield

    return switch


def test_steering_both_builds_each_step_under_its_setting(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(optim_zoo, "compiler_steering", recording_switch(events), raising=False)
    result = _paired_run(tmp_path, "--steering", "both", "--only", "adafactor", "--no-bf16")
    assert events == [True, False]
    (row,) = result["rows"]
    assert set(row["arms"]) == {"on", "off"}
    assert (tmp_path / "steering.json").exists()
