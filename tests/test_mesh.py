"""Sharded runs on 8 host CPU devices: launches `tests/on_devices/mesh_jax.py` in a subprocess.

The 8 devices come from `XLA_FLAGS=--xla_force_host_platform_device_count=8`, which only takes
effect before jax first initialises; this process may already have done so with one device, so
the mesh tests run in a fresh interpreter (`fixtures.mesh.run_pytest_on_host_devices`). The
subprocess's own pytest output is shown when it fails.
"""

import pytest

from fixtures.mesh import run_pytest_on_host_devices


@pytest.mark.slow
def test_sharded_optimizers_on_a_2x4_mesh():
    run_pytest_on_host_devices("mesh_jax.py")


@pytest.mark.slow
def test_8bit_state_on_a_2x4_mesh():
    run_pytest_on_host_devices("mesh_8bit.py")
