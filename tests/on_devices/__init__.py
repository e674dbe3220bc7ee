"""Programs the tests start in subprocesses, on 8 host CPU devices, kept apart from the tests.

`mesh_jax.py` and `mesh_nnx.py` are pytest files that `tests/test_mesh.py` and
`tests/test_flax_nnx.py` run in a subprocess with 8 devices (`fixtures.mesh`); the main run
does not collect them, as their names do not start with `test_`. `multiprocess_nnx.py` is the
worker `tests/test_multiprocess.py` launches, one process per half of the devices.
"""
