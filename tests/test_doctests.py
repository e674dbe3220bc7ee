"""Every docstring example of the package runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import optim_zoo

MODULES = sorted(
    info.name for info in pkgutil.iter_modules(optim_zoo.__path__, prefix="optim_zoo.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


# STYLE.md: each optimizer and primitive shows a few steps in a doctest.
WITH_EXAMPLES = (
    "adafactor",
    "adai",
    "adaiw",
    "adan",
    "apollo",
    "came",
    "factored_adai",
    "factored_adan",
    "scale_by_adaptive_inertia",
    "scale_by_confidence",
    "scale_by_factored_rms",
    "scale_by_nesterov_moment",
    "scale_by_rectified_diag_hessian",
)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_every_optimizer_and_primitive_has_an_example(name):
    tests = doctest.DocTestFinder().find(getattr(optim_zoo, name), name)
    assert any(test.examples for test in tests)
