"""The schedules: Apollo's warmup with a schedule, and docs/optimizers.md's official recipe."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_zoo

WARMUP, INIT_LR, BASE_LR = 10, 1e-5, 0.01
SCHEDULE = optax.cosine_decay_schedule(BASE_LR, 40)


def _official(count):
    """The official Apollo: during warmup it ramps toward its constructor's rate, then the
    scheduler's value (which has counted every step) takes over."""
    if count < WARMUP:
        return INIT_LR + (BASE_LR - INIT_LR) * count / WARMUP
    return float(SCHEDULE(count))


def test_warmup_ramps_toward_the_schedule_value():
    warmup = optim_zoo.linear_warmup(SCHEDULE, INIT_LR, WARMUP)
    for count in range(WARMUP):
        expected = INIT_LR + (float(SCHEDULE(count)) - INIT_LR) * count / WARMUP
        np.testing.assert_allclose(warmup(count), expected, rtol=1e-6)
    # Which is not the official ramp once the schedule has moved from its start.
    assert not np.isclose(float(warmup(WARMUP - 1)), _official(WARMUP - 1), rtol=1e-4)


def test_readme_recipe_is_the_official_warmup():
    def recipe(c):
        return jnp.where(c < WARMUP, INIT_LR + (BASE_LR - INIT_LR) * c / WARMUP, SCHEDULE(c))

    learning_rate = optim_zoo.linear_warmup(recipe, warmup=0)
    for count in range(40):
        np.testing.assert_allclose(learning_rate(count), _official(count), rtol=1e-6)
    optim_zoo.apollo(recipe, warmup=0)  # and apollo takes it as it is


@pytest.mark.parametrize("scale", [True, False])
def test_relative_step_size(scale):
    schedule = optim_zoo.relative_step_size(multiply_by_parameter_scale=scale)
    factor = 1.0 if scale else 0.05
    for count in (0, 99, 10_000, 39_999):
        expected = factor * min(1e-2, 1 / np.sqrt(count + 1))
        np.testing.assert_allclose(schedule(count), expected, rtol=1e-6)
