"""The package against the float64 NumPy references over many seeded random problems.

Each problem has a matrix, a 4-D tensor with tied largest dims, a 3-D tensor whose batch axis is
in the middle, a vector, a scalar and a wide matrix, with magnitudes from 1e-3 to 1e3. Gradients
are ``gate_t * (curv * p + noise_t)``: most leaves feel the current parameters (so a wrong step
changes every later gradient), one leaf does not (``curv = 0``), and ``gate`` can zero whole
steps. 60 steps, the whole trajectory is compared.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_zoo
from fixtures import reference, trajectories
from fixtures.trajectories import mask_list, package_trajectory, reference_trajectory

NUM_STEPS = 60
SEEDS = (0, 1)
TOL = 1e-10

# name -> (shape, magnitude of parameters and gradient noise, depends on params)
LEAVES = {
    "a_matrix": ((6, 4), 1.0, True),
    # Three tied largest dims: factored over the LATER two (axes 2, 3), batch axes 0 and 1.
    "b_tensor": ((3, 4, 4, 4), 1e3, True),
    # Factored over axes 0 and 2 with the batch axis in the middle (not "the last two axes").
    "c_mid_batch": ((4, 2, 4), 1e-2, True),
    "d_vector": ((7,), 1e-3, False),  # gradient independent of the parameters
    "e_scalar": ((), 10.0, True),
    "f_wide": ((2, 9), 1e-1, True),
}
NAMES = sorted(LEAVES)  # jax.tree.leaves order of a dict
ONLY_MATRIX_DECAYS = {n: n in ("a_matrix", "b_tensor") for n in NAMES}


def make_problem(seed: int, zero_steps: int = 0) -> dict:
    """This file's problem: `LEAVES` over `NUM_STEPS` steps (``trajectories.make_problem``)."""
    return trajectories.make_problem(seed, zero_steps, LEAVES, NUM_STEPS)


def _lr_schedule_optax():
    # Not optax.linear_schedule: with an int32 count it computes in float32 even under x64,
    # which would hide float64 exactness behind a 1e-9 relative rounding of the learning rate.
    def schedule(count):
        return 0.02 + (0.002 - 0.02) * jnp.minimum(count, 40).astype(jnp.float64) / 40

    return schedule


def _lr_schedule_python(count: int) -> float:
    # The same schedule written out, so the reference owes nothing to optax.
    return 0.02 + (0.002 - 0.02) * min(count, 40) / 40


def _adai_schedule_optax():
    return optax.piecewise_constant_schedule(0.2, {20: 0.5, 40: 0.5})


def _adai_schedule_python(count: int) -> float:
    return 0.2 * (0.5 if count >= 20 else 1.0) * (0.5 if count >= 40 else 1.0)


zoo = optim_zoo
# config -> (package factory, reference factory, steps with all-zero gradients at the start)
CONFIGS: dict[str, tuple[Callable, Callable, int]] = {
    # --- Adan ---------------------------------------------------------------------------------
    "adan_default": (lambda: zoo.adan(0.01), lambda: reference.Adan(0.01), 0),
    "adan_betas_eps_root": (
        lambda: zoo.adan(0.01, b1=0.9, b2=0.8, b3=0.95, eps=1e-6, eps_root=1e-9),
        lambda: reference.Adan(0.01, b1=0.9, b2=0.8, b3=0.95, eps=1e-6, eps_root=1e-9),
        0,
    ),
    "adan_prox": (
        lambda: zoo.adan(0.02, weight_decay=0.05),
        lambda: reference.Adan(0.02, weight_decay=0.05),
        0,
    ),
    "adan_no_prox": (
        lambda: zoo.adan(0.02, weight_decay=0.05, no_prox=True),
        lambda: reference.Adan(0.02, weight_decay=0.05, no_prox=True),
        0,
    ),
    "adan_prox_mask_schedule": (
        lambda: zoo.adan(
            _lr_schedule_optax(), weight_decay=0.1, weight_decay_mask=ONLY_MATRIX_DECAYS
        ),
        lambda: reference.Adan(
            _lr_schedule_python, weight_decay=0.1, weight_decay_mask=mask_list(ONLY_MATRIX_DECAYS)
        ),
        0,
    ),
    # The 1e3 leaf makes the global norm large: every step is clipped.
    "adan_clip": (
        lambda: zoo.adan(0.01, max_grad_norm=1.0),
        lambda: reference.Adan(0.01, max_grad_norm=1.0),
        0,
    ),
    "adan_clip_prox": (
        lambda: zoo.adan(0.01, weight_decay=0.05, max_grad_norm=50.0),
        lambda: reference.Adan(0.01, weight_decay=0.05, max_grad_norm=50.0),
        0,
    ),
    # --- Adafactor ----------------------------------------------------------------------------
    "adafactor_default": (lambda: zoo.adafactor(), lambda: reference.Adafactor(), 0),
    "adafactor_factor_all": (
        lambda: zoo.adafactor(min_dim_size_to_factor=0),
        lambda: reference.Adafactor(min_dim_size_to_factor=0),
        0,
    ),
    # min_dim 3: f_wide (2, 9) stays unfactored, the others are factored.
    "adafactor_min3_lr_noscale": (
        lambda: zoo.adafactor(0.02, min_dim_size_to_factor=3, multiply_by_parameter_scale=False),
        lambda: reference.Adafactor(
            0.02, min_dim_size_to_factor=3, multiply_by_parameter_scale=False
        ),
        0,
    ),
    "adafactor_momentum_wd_decay": (
        lambda: zoo.adafactor(
            0.01,
            min_dim_size_to_factor=0,
            decay_rate=0.6,
            momentum=0.9,
            dtype_momentum=jnp.float64,
            weight_decay_rate=1e-3,
        ),
        lambda: reference.Adafactor(
            0.01, min_dim_size_to_factor=0, decay_rate=0.6, momentum=0.9, weight_decay_rate=1e-3
        ),
        0,
    ),
    "adafactor_unfactored_noclip_mask": (
        lambda: zoo.adafactor(
            0.01,
            factored=False,
            clipping_threshold=None,
            weight_decay_rate=1e-2,
            weight_decay_mask=ONLY_MATRIX_DECAYS,
        ),
        lambda: reference.Adafactor(
            0.01,
            factored=False,
            clipping_threshold=None,
            weight_decay_rate=1e-2,
            weight_decay_mask=mask_list(ONLY_MATRIX_DECAYS),
        ),
        0,
    ),
    "adafactor_clip_schedule_eps": (
        lambda: zoo.adafactor(
            _lr_schedule_optax(), min_dim_size_to_factor=0, clipping_threshold=1.5, eps=1e-8
        ),
        lambda: reference.Adafactor(
            _lr_schedule_python, min_dim_size_to_factor=0, clipping_threshold=1.5, eps=1e-8
        ),
        0,
    ),
    # --- Apollo -------------------------------------------------------------------------------
    "apollo_default": (
        lambda: zoo.apollo(0.01, warmup=10),
        lambda: reference.Apollo(0.01, warmup=10),
        0,
    ),
    "apollo_no_warmup": (
        lambda: zoo.apollo(0.01, warmup=0),
        lambda: reference.Apollo(0.01, warmup=0),
        0,
    ),
    "apollo_init_lr_beta_eps": (
        lambda: zoo.apollo(0.02, beta=0.8, eps=1e-6, warmup=20, init_lr=1e-3),
        lambda: reference.Apollo(0.02, beta=0.8, eps=1e-6, warmup=20, init_lr=1e-3),
        0,
    ),
    "apollo_belief": (
        lambda: zoo.apollo(0.01, warmup=10, rebound="belief"),
        lambda: reference.Apollo(0.01, warmup=10, rebound="belief"),
        0,
    ),
    "apollo_L2_mask": (
        lambda: zoo.apollo(
            0.01, warmup=10, weight_decay=0.05, weight_decay_mask=ONLY_MATRIX_DECAYS
        ),
        lambda: reference.Apollo(
            0.01, warmup=10, weight_decay=0.05, weight_decay_mask=mask_list(ONLY_MATRIX_DECAYS)
        ),
        0,
    ),
    "apollo_decoupled": (
        lambda: zoo.apollo(0.01, warmup=10, weight_decay=0.05, weight_decay_type="decoupled"),
        lambda: reference.Apollo(0.01, warmup=10, weight_decay=0.05, weight_decay_type="decoupled"),
        0,
    ),
    "apollo_stable": (
        lambda: zoo.apollo(0.01, warmup=10, weight_decay=0.05, weight_decay_type="stable"),
        lambda: reference.Apollo(0.01, warmup=10, weight_decay=0.05, weight_decay_type="stable"),
        0,
    ),
    "apollo_belief_default_decay_mask": (
        lambda: zoo.apollo(
            0.01,
            warmup=10,
            rebound="belief",
            weight_decay=0.05,
            weight_decay_mask=ONLY_MATRIX_DECAYS,
        ),
        lambda: reference.Apollo(
            0.01,
            warmup=10,
            rebound="belief",
            weight_decay=0.05,
            weight_decay_mask=mask_list(ONLY_MATRIX_DECAYS),
        ),
        0,
    ),
    "apollo_belief_stable": (
        lambda: zoo.apollo(
            0.01, warmup=10, rebound="belief", weight_decay=0.05, weight_decay_type="stable"
        ),
        lambda: reference.Apollo(
            0.01, warmup=10, rebound="belief", weight_decay=0.05, weight_decay_type="stable"
        ),
        0,
    ),
    # SPEC: with a schedule, the warmup ramps from init_lr to the schedule's value at the count.
    "apollo_schedule": (
        lambda: zoo.apollo(_lr_schedule_optax(), warmup=10, init_lr=1e-4),
        lambda: reference.Apollo(_lr_schedule_python, warmup=10, init_lr=1e-4),
        0,
    ),
    # --- Adai / AdaiW / AdaiV2 ------------------------------------------------------------------
    "adai_default": (lambda: zoo.adai(0.1), lambda: reference.Adai(0.1), 0),
    "adai_betas_eps": (
        lambda: zoo.adai(0.3, beta0=0.5, beta2=0.9, eps=1e-2),
        lambda: reference.Adai(0.3, beta0=0.5, beta2=0.9, eps=1e-2),
        0,
    ),
    "adai_L2": (
        lambda: zoo.adai(0.1, weight_decay=0.05),
        lambda: reference.Adai(0.1, weight_decay=0.05),
        0,
    ),
    "adai_decoupled_mask": (
        lambda: zoo.adai(
            0.1, weight_decay=0.05, decoupled=True, weight_decay_mask=ONLY_MATRIX_DECAYS
        ),
        lambda: reference.Adai(
            0.1,
            weight_decay=0.05,
            decoupled=True,
            weight_decay_mask=mask_list(ONLY_MATRIX_DECAYS),
        ),
        0,
    ),
    "adaiw_schedule": (
        lambda: zoo.adaiw(_adai_schedule_optax(), weight_decay=0.05),
        lambda: reference.adaiw(_adai_schedule_python, weight_decay=0.05),
        0,
    ),
    "adai_dampening": (
        lambda: zoo.adai(0.1, dampening=0.5),
        lambda: reference.Adai(0.1, dampening=0.5),
        0,
    ),
    "adaiw_dampening": (
        lambda: zoo.adaiw(0.1, weight_decay=0.05, dampening=0.7),
        lambda: reference.adaiw(0.1, weight_decay=0.05, dampening=0.7),
        0,
    ),
    # v_bar == 0 on the first two steps: the package must not produce NaN (SPEC: ratio 0).
    "adai_zero_first_grads": (lambda: zoo.adai(0.1), lambda: reference.Adai(0.1), 2),
    # --- CAME (SPEC-came.md): every leaf of rank >= 2 factored over its last two axes ---------
    "came_default": (lambda: zoo.came(0.01), lambda: reference.Came(0.01), 0),
    "came_betas_clip_decay_mask": (
        lambda: zoo.came(
            0.02,
            b1=0.8,
            b2=0.95,
            b3=0.99,
            clipping_threshold=0.5,
            weight_decay=0.05,
            weight_decay_mask=ONLY_MATRIX_DECAYS,
        ),
        lambda: reference.Came(
            0.02,
            b1=0.8,
            b2=0.95,
            b3=0.99,
            clipping_threshold=0.5,
            weight_decay=0.05,
            weight_decay_mask=mask_list(ONLY_MATRIX_DECAYS),
        ),
        0,
    ),
    "came_no_clip_eps_schedule": (
        lambda: zoo.came(
            _lr_schedule_optax(), eps=1e-20, eps_confidence=1e-10, clipping_threshold=None
        ),
        lambda: reference.Came(
            _lr_schedule_python, eps=1e-20, eps_confidence=1e-10, clipping_threshold=None
        ),
        0,
    ),
    "came_zero_first_grads": (lambda: zoo.came(0.01), lambda: reference.Came(0.01), 2),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_package_matches_reference(config):
    make_tx, make_reference, zero_steps = CONFIGS[config]
    problems = [make_problem(seed, zero_steps) for seed in SEEDS]
    trajectories.assert_package_matches_reference(make_tx, make_reference, problems, LEAVES, TOL)


# --- CAME's eps_confidence: the official default, 1e-16 (SPEC-came.md) ---------------------------
# On the problems above the instability dwarfs eps_confidence, so any default passes them. With
# gradients of 1e-24, Adafactor's eps (1e-30) dominates their squares (1e-48), the normalised
# update is ~1e-8, and its instability (u - m)**2 ~1e-16: of the order of eps_confidence.
_TINY_GRADIENTS = {
    "a_matrix": ((4, 3), 3e-24, False),
    "b_tensor": ((2, 3, 5), 3e-24, False),
    "c_vector": ((3,), 3e-24, False),
}


def test_came_default_eps_confidence_is_the_official_one():
    for factory in (optim_zoo.came, optim_zoo.scale_by_confidence):
        assert inspect.signature(factory).parameters["eps_confidence"].default == 1e-16
    problem = trajectories.make_problem(3, 0, _TINY_GRADIENTS, 6)
    with jax.enable_x64(True):
        default = package_trajectory(lambda: optim_zoo.came(0.01), problem)
        explicit = package_trajectory(lambda: optim_zoo.came(0.01, eps_confidence=1e-16), problem)
        smaller = package_trajectory(lambda: optim_zoo.came(0.01, eps_confidence=1e-30), problem)
        official = reference_trajectory(reference.Came(0.01, eps_confidence=1e-16), problem)
    for name in _TINY_GRADIENTS:
        np.testing.assert_array_equal(default[name], explicit[name], err_msg=name)
        np.testing.assert_allclose(default[name], official[name], rtol=0, atol=1e-12)
    # The default matters here: 1e-30 takes other steps on the factored leaves (by 0.2 and more).
    for name in ("a_matrix", "b_tensor"):
        assert np.max(np.abs(smaller[name] - default[name])) > 1e-2, name


def test_scale_by_confidence_default_eps_confidence_in_the_step():
    # With b1 = 0 the momentum is the update itself, so the instability is eps_confidence alone
    # and the step is the update over sqrt((1 - b3) * eps_confidence), 1e10 times it.
    with jax.enable_x64(True):
        update = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))
        tx = optim_zoo.scale_by_confidence(b1=0.0, b3=0.9999)
        step, _ = jax.jit(tx.update)(update, tx.init(update))
    expected = np.asarray(update) / np.sqrt((1 - 0.9999) * 1e-16)
    np.testing.assert_allclose(np.asarray(step), expected, rtol=1e-12)


def max_errors() -> dict[str, float]:
    """Largest leaf-scaled absolute error per configuration (for printing)."""
    errors = {}
    with jax.enable_x64(True):
        for config, (_, make_reference, zero_steps) in CONFIGS.items():
            worst = 0.0
            for seed in SEEDS:
                problem = make_problem(seed, zero_steps)
                expected = reference_trajectory(make_reference(), problem)
                got = package_trajectory(CONFIGS[config][0], problem)
                for n in NAMES:
                    err = np.max(np.abs(got[n] - expected[n])) / LEAVES[n][1]
                    worst = max(worst, float(err))
            errors[config] = worst
    return errors


if __name__ == "__main__":
    for config, err in max_errors().items():
        print(f"{config:36s} {err:.2e}")
