"""The package as it was at a git ref, imported beside today's under another name.

`package_at(ref)` is a context manager: it extracts ``optim_zoo/`` at `ref` from the
repository's own git objects (``git archive``) into a temporary folder, renames the package
``optim_zoo_at_<commit>``, rewrites every Python name token ``optim_zoo`` in its sources to
that name (the imports, ``from optim_zoo.x import y``, and any ``optim_zoo.f`` in code;
docstrings, comments and other strings are left as they are), imports it and every one of its
modules, and yields it. Both versions then live in one process, each with its own modules,
classes and jitted functions. On exit the modules are dropped from ``sys.modules`` and the
folder is removed.

Nothing is read from outside the repository but its git objects: the ref is resolved and
archived by ``git`` run in the repository root.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pkgutil
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tokenize
import types
from collections.abc import Iterator
from pathlib import Path

from benchmarks.common.environment import REPO_ROOT

PACKAGE = "optim_zoo"


def _git(*args: str) -> bytes:
    result = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, check=False)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"git {' '.join(args)} failed: {message}")
    return result.stdout


def resolve(ref: str) -> str:
    """The full commit hash `ref` names in this repository."""
    return _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").decode().strip()


def rename_package_tokens(source: str, old: str, new: str) -> str:
    """`source` with every Python NAME token `old` replaced by `new` (imports and attribute
    uses alike); strings and comments are untouched."""
    positions = [
        token.start
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.NAME and token.string == old
    ]
    lines = source.splitlines(keepends=True)
    # Right to left within a line, so that earlier columns stay valid.
    for row, col in sorted(positions, reverse=True):
        line = lines[row - 1]
        lines[row - 1] = line[:col] + new + line[col + len(old) :]
    return "".join(lines)


def _extract(commit: str, folder: Path, name: str) -> Path:
    archive = _git("archive", "--format=tar", commit, PACKAGE)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        # The "data" filter refuses links and paths out of the folder (Python >= 3.11.4).
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(folder, **safe)
    root = folder / name
    (folder / PACKAGE).rename(root)
    for path in root.rglob("*.py"):
        path.write_text(rename_package_tokens(path.read_text(), PACKAGE, name))
    leftover = [
        str(p.relative_to(folder))
        for p in root.rglob("*.py")
        if any(
            t.type == tokenize.NAME and t.string == PACKAGE
            for t in tokenize.generate_tokens(io.StringIO(p.read_text()).readline)
        )
    ]
    if leftover:
        raise RuntimeError(f"{PACKAGE} still named in {leftover}")
    return root


def _check_isolated(name: str, root: Path, before: set[str]) -> None:
    """Every module of the copy comes from the copy, and loading it imported nothing of today's
    package that was not loaded before (an import by a string the rewrite cannot see)."""
    for module_name, module in list(sys.modules.items()):
        if module_name == name or module_name.startswith(name + "."):
            file = getattr(module, "__file__", None)
            if file is not None and not Path(file).resolve().is_relative_to(root.resolve()):
                raise RuntimeError(f"{module_name} was loaded from {file}, outside {root}")
    pattern = re.compile(rf"^{PACKAGE}(\.|$)")
    new = {m for m in sys.modules if pattern.match(m)} - before
    if new:
        raise RuntimeError(f"loading the reference copy imported {sorted(new)}")


@contextlib.contextmanager
def package_at(ref: str) -> Iterator[types.ModuleType]:
    """Yields the package as it was at `ref`, imported as ``optim_zoo_at_<commit[:10]>``."""
    commit = resolve(ref)
    name = f"{PACKAGE}_at_{commit[:10]}"
    if name in sys.modules:
        raise RuntimeError(f"{name} is already imported")
    pattern = re.compile(rf"^{PACKAGE}(\.|$)")
    before = {m for m in sys.modules if pattern.match(m)}
    folder = Path(tempfile.mkdtemp(prefix="optim_zoo_ref_"))
    try:
        root = _extract(commit, folder, name)
        sys.path.insert(0, str(folder))
        try:
            package = importlib.import_module(name)
            # Import every module now, so that nothing is imported from the folder later (a
            # lazy import inside a function) and everything is checked below.
            for info in pkgutil.walk_packages(package.__path__, prefix=name + "."):
                importlib.import_module(info.name)
        finally:
            sys.path.remove(str(folder))
        _check_isolated(name, root, before)
        package.__reference_commit__ = commit
        yield package
    finally:
        for module_name in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module_name]
        shutil.rmtree(folder, ignore_errors=True)


def counterpart(package: types.ModuleType, obj: object) -> object:
    """`obj` (a function or class of today's package) by the same name in `package`."""
    name = getattr(obj, "__name__", None)
    if name is None or not hasattr(package, name):
        raise AttributeError(f"{package.__name__} has no {name!r}")
    return getattr(package, name)
