"""The package and the NumPy references against the public 5-step goldens of the official code.

The problem and its cases are ``fixtures/goldens.py``; ``python -m fixtures.goldens`` prints the
largest absolute error of each case.
"""

from __future__ import annotations

import functools

import chex
import optax
import pytest

from fixtures import goldens
from fixtures.goldens import ATOL, CASES, OPTAX_ADAN_CASE


def test_every_target_case_is_covered():
    # A golden added to the json without a test here must not go unnoticed.
    targets = set(goldens.load_golden()["cases"]) - {OPTAX_ADAN_CASE}
    assert targets == set(CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_golden(case):
    names, _, make_reference = CASES[case]
    expected = goldens.golden_values(goldens.load_golden()["cases"][case], names)
    got = goldens.run_reference(make_reference(), names)
    chex.assert_trees_all_close(got, expected, atol=ATOL, rtol=0)


PACKAGE_CASES = [
    pytest.param(case, variant, id=f"{case}-{variant}") for case, variant in goldens.PACKAGE_CASES
]


@pytest.mark.parametrize("case, variant", PACKAGE_CASES)
def test_package_matches_golden(case, variant):
    names, _, _ = CASES[case]
    expected = goldens.golden_values(goldens.load_golden()["cases"][case], names)
    got = goldens.run_package(functools.partial(goldens.make_package_tx, case, variant), names)
    chex.assert_trees_all_close(got, expected, atol=ATOL, rtol=0)


def test_optax_adan_is_the_deviating_case_and_optim_zoo_is_not():
    # Imported here, as fixtures.goldens does, so that the reference checks run even while the
    # package is unfinished.
    import optim_zoo

    expected = goldens.golden_values(goldens.load_golden()["cases"][OPTAX_ADAN_CASE], ("W", "b"))
    # The golden really is optax.adan (defaults, incl. its eps_root=1e-8)...
    got = goldens.run_package(lambda: optax.adan(0.01))
    chex.assert_trees_all_close(got, expected, atol=ATOL, rtol=0)
    # ...and optim_zoo.adan, which follows the official code, lands clearly elsewhere.
    assert goldens.max_abs_error(goldens.run_package(lambda: optim_zoo.adan(0.01)), expected) > 1e-4


def test_every_came_case_is_covered():
    assert set(goldens.load_golden(goldens.CAME_GOLDEN_PATH)["cases"]) == set(goldens.CAME_CASES)


@pytest.mark.parametrize("case", list(goldens.CAME_CASES))
def test_came_matches_golden(case):
    make_tx, make_reference = goldens.CAME_CASES[case]
    expected = goldens.golden_values(
        goldens.load_golden(goldens.CAME_GOLDEN_PATH)["cases"][case], ("W", "b")
    )
    chex.assert_trees_all_close(
        goldens.run_reference(make_reference()), expected, atol=ATOL, rtol=0
    )
    chex.assert_trees_all_close(goldens.run_package(make_tx), expected, atol=ATOL, rtol=0)
