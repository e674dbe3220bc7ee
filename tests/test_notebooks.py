"""The notebooks in notebooks/ run top to bottom, and are committed executed, with their plots.

Each notebook runs in a fresh kernel of this very interpreter, from a temporary copy, so the
committed files are never rewritten; the first cell that raises fails its test. The committed
files must carry their outputs (GitHub shows them) and open with a Colab badge and an install
cell that does nothing where optim_zoo is already importable.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import sys
import time
import tomllib
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb"))
# Each notebook is meant to run in a few minutes on a CPU. No single cell may take ten, beside
# the other test worker on a 2-core machine (the longest: the comparison notebook's quick study
# of one task under both learning-rate schedules, about a minute).
CELL_TIMEOUT_S = 600
KERNEL_NAME = "optim-zoo-tests"
# The project's address is written in pyproject.toml's [project.urls] only; the notebooks, which
# cannot read it in Colab, must name the same.
REPOSITORY = tomllib.loads((NOTEBOOK_DIR.parent / "pyproject.toml").read_text())["project"]["urls"][
    "Repository"
]
COLAB_URL = (
    REPOSITORY.replace("https://github.com/", "https://colab.research.google.com/github/")
    + "/blob/main/notebooks/"
)


def test_the_three_notebooks_are_there():
    assert {"01_quickstart.ipynb", "02_primitives.ipynb", "03_compare.ipynb"} <= set(NOTEBOOKS)


@pytest.fixture(scope="session")
def kernel_spec_manager(tmp_path_factory) -> KernelSpecManager:
    """Kernel specs holding one kernel that runs this interpreter.

    The `python3` spec that ipykernel installs runs whichever `python` comes first on PATH,
    which need not be the environment these tests run in.
    """
    kernels = tmp_path_factory.mktemp("jupyter") / "kernels"
    (kernels / KERNEL_NAME).mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "optim_zoo tests",
        "language": "python",
    }
    (kernels / KERNEL_NAME / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def _code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, kernel_spec_manager):
    copy = tmp_path / name
    shutil.copyfile(NOTEBOOK_DIR / name, copy)
    notebook = nbformat.read(copy, as_version=4)
    kernel = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = NotebookClient(
        notebook,
        km=kernel,
        timeout=CELL_TIMEOUT_S,
        record_timing=False,
        # The kernel's working directory: whatever a notebook writes lands in the temporary one.
        resources={"metadata": {"path": str(tmp_path)}},
    )
    started = time.perf_counter()
    try:
        client.execute()  # Raises CellExecutionError, with the cell and its traceback.
    finally:
        # nbclient leaves a kernel it was given running; stop it here.
        if kernel.has_kernel:
            kernel.shutdown_kernel(now=True)
    print(f"{name} ran in {time.perf_counter() - started:.0f} s")
    nbformat.write(notebook, copy)  # The executed copy, for a look after a failure.

    # optim_zoo is importable here, so the install cell must not have run pip.
    install_cell = _code_cells(notebook)[0]
    assert "%pip install" in install_cell.source
    assert install_cell.outputs == [], install_cell.outputs


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_executed_with_a_colab_badge(name):
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.cells[0].cell_type == "markdown"
    assert COLAB_URL + name in notebook.cells[0].source

    cells = _code_cells(notebook)
    install = cells[0].source
    assert "import optim_zoo" in install and "except ImportError:" in install, install
    assert f'REPOSITORY = "{REPOSITORY}"' in install, install
    # Executed top to bottom in one pass, without errors, with its plots in the file.
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    outputs = [output for cell in cells for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs)


def _run_install_cell(name, folder):
    """The install cell of `name` run where optim_zoo is not importable, in `folder`; returns
    the line its %pip magic was given, as IPython would expand it."""
    from IPython.core.inputtransformer2 import TransformerManager

    source = _code_cells(nbformat.read(NOTEBOOK_DIR / name, as_version=4))[0].source
    code = TransformerManager().transform_cell(source)
    installed = []

    def import_(module, *args, **kwargs):
        if module == "optim_zoo" and not installed:
            raise ImportError("No module named 'optim_zoo'")
        return builtins.__import__(module, *args, **kwargs)

    namespace = {"__builtins__": {**vars(builtins), "__import__": import_}}

    class Shell:
        def run_line_magic(self, magic, line):
            assert magic == "pip", magic
            installed.append(line.format(**namespace))

    namespace["get_ipython"] = Shell
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(code, name, "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert len(installed) == 1, installed
    return installed[0]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_install_cell_takes_an_uploaded_wheel_or_else_the_repository(name, tmp_path):
    # Nothing uploaded: the repository of pyproject.toml.
    assert f'"optim_zoo[bench] @ git+{REPOSITORY}"' in _run_install_cell(name, tmp_path)
    # A wheel uploaded to the session's folder, before the repository is public.
    wheel = tmp_path / "optim_zoo-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert f'"optim_zoo[bench] @ {wheel.resolve().as_uri()}"' in _run_install_cell(name, tmp_path)
