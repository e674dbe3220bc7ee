"""Checks the built distributions against the tracked tree, with the wheel installed.

Run by .ci/run with the wheel installed (not editable) into a fresh virtual environment and from
a folder outside the source tree, so that `import optim_zoo` can only find the installed copy:

    python -I .ci/check_wheel.py --source DIR --manifest FILE --wheel WHEEL --sdist SDIST

--source is the copy of the tracked tree the distributions were built from, --manifest the
NUL-separated list of its files (paths relative to --source) taken before anything ran in it.

It checks that
- optim_zoo is imported from this environment's site-packages, not from the source tree;
- the wheel holds every tracked file under optim_zoo/ (every module, and py.typed), and the
  installed package has py.typed;
- every name in optim_zoo.__all__ exists, and every public name README.md lists (the first
  column of the "## Optimizers" and "## Primitives" tables, their "primitive" and "state"
  columns, the building blocks paragraph and the "## New combinations" bullets) is both an
  attribute of optim_zoo and in __all__;
- the sdist holds README.md, pyproject.toml and every tracked file under optim_zoo/, tests/ and
  fixtures/ (so tests/data/golden_5step.json and optim_zoo/py.typed among them);
- the installed version is optim_zoo.__version__.

Every failure is listed, then the script exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import pathlib
import re
import sys
import sysconfig
import tarfile
import zipfile

PACKAGE = "optim_zoo"
# Tracked files under these folders must all be in the sdist: what building and testing need.
SDIST_FOLDERS = ("optim_zoo/", "tests/", "fixtures/")
SDIST_FILES = ("README.md", "pyproject.toml")
# Names the README gives in prose that no table or bullet holds (FactoredSecondMoment is named in
# the Primitives section's text). Each must still appear in README.md in backticks.
README_PROSE_NAMES = ("FactoredSecondMoment",)
BUILDING_BLOCKS_LEAD = "Building blocks the optimizers chain with them:"

IDENTIFIER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


class Failures:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def missing(self, what: str, names) -> None:
        names = sorted(names)
        if names:
            self.add(f"{what}: {', '.join(names)}")


# --- README parsing ----------------------------------------------------------------------------
def section(readme: str, heading: str) -> str | None:
    """The text under the first '## ' heading that starts with `heading`, up to the next one."""
    match = re.search(
        rf"^## {re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL
    )
    return match.group(1) if match else None


def table_names(text: str, columns: tuple[str, ...]) -> set[str]:
    """Backticked identifiers in the first column of every table in `text`, and in the columns
    whose header is one of `columns`."""
    names: set[str] = set()
    header: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if header is None:
            header = [cell.lower() for cell in cells]
            continue
        if all(set(cell) <= set(":-") for cell in cells):  # the |---|---| separator row
            continue
        wanted = {0} | {i for i, name in enumerate(header) if name in columns}
        for i in wanted:
            if i < len(cells):
                names.update(IDENTIFIER.findall(cells[i]))
    return names


def paragraph(readme: str, lead: str) -> str | None:
    """The paragraph (up to the next blank line) that starts with `lead`."""
    match = re.search(rf"^{re.escape(lead)}(.*?)(?:\n\s*\n|\Z)", readme, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else None


def bullet_names(text: str) -> set[str]:
    """The backticked identifier each top-level bullet starts with ('- `name`: ...')."""
    return set(re.findall(r"^- `([A-Za-z_][A-Za-z0-9_]*)`", text, re.MULTILINE))


def readme_names(readme: str, failures: Failures) -> set[str]:
    names: set[str] = set()
    parts = {
        '"## Optimizers" table': (section(readme, "Optimizers"), "table"),
        '"## Primitives" table': (section(readme, "Primitives"), "table"),
        f'paragraph "{BUILDING_BLOCKS_LEAD}"': (paragraph(readme, BUILDING_BLOCKS_LEAD), "prose"),
        '"## New combinations" bullets': (section(readme, "New combinations"), "bullets"),
    }
    for where, (text, kind) in parts.items():
        if text is None:
            failures.add(f"README.md: found no {where}")
            continue
        if kind == "table":
            found = table_names(text, ("primitive", "state"))
        elif kind == "bullets":
            found = bullet_names(text)
        else:
            found = set(IDENTIFIER.findall(text))
        if not found:
            failures.add(f"README.md: found no backticked names in the {where}")
        names |= found
    for name in README_PROSE_NAMES:
        if f"`{name}`" not in readme:
            failures.add(f"README.md no longer names `{name}`: update README_PROSE_NAMES")
        names.add(name)
    return names


# --- The checks --------------------------------------------------------------------------------
def check_import_location(module, source: pathlib.Path, failures: Failures) -> None:
    location = pathlib.Path(module.__file__).resolve()
    site_dirs = {pathlib.Path(sysconfig.get_path(key)).resolve() for key in ("purelib", "platlib")}
    if location.is_relative_to(source):
        failures.add(f"{PACKAGE} was imported from the source tree: {location}")
    elif not any(location.is_relative_to(site) for site in site_dirs):
        failures.add(
            f"{PACKAGE} was imported from {location}, not from site-packages "
            f"({', '.join(map(str, sorted(site_dirs)))})"
        )
    try:
        direct_url = importlib.metadata.distribution(PACKAGE).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        failures.add(f"no installed distribution named {PACKAGE}: the wheel is not installed")
        return
    if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
        failures.add(f"{PACKAGE} is installed in editable mode, not from the wheel")


def package_files(tracked: list[str]) -> list[str]:
    return [path for path in tracked if path.startswith(f"{PACKAGE}/")]


def check_wheel_files(wheel: pathlib.Path, tracked: list[str], failures: Failures) -> None:
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = set(archive.namelist())
    wanted = set(package_files(tracked))
    if not any(path.endswith(".py") for path in wanted):
        failures.add(f"the tracked tree has no {PACKAGE}/*.py files: wrong --manifest?")
    wanted.add(f"{PACKAGE}/py.typed")
    failures.missing(f"tracked files missing from the wheel {wheel.name}", wanted - in_wheel)


def check_installed_files(module, tracked: list[str], failures: Failures) -> None:
    installed = pathlib.Path(module.__file__).resolve().parent
    if not (installed / "py.typed").is_file():
        failures.add(f"the installed package has no py.typed ({installed})")
    # Every tracked top-level module imports, from the installed package.
    for path in package_files(tracked):
        if path.endswith(".py") and path.count("/") == 1 and path != f"{PACKAGE}/__init__.py":
            name = f"{PACKAGE}.{pathlib.PurePosixPath(path).stem}"
            try:
                submodule = importlib.import_module(name)
            except Exception as err:  # report every module that fails, not just the first
                failures.add(f"cannot import {name} from the installed wheel: {err!r}")
                continue
            if not pathlib.Path(submodule.__file__).resolve().is_relative_to(installed):
                failures.add(f"{name} was imported from {submodule.__file__}, not from {installed}")


def check_names(module, readme: str, failures: Failures) -> None:
    exported = getattr(module, "__all__", None)
    if not exported:
        failures.add(f"{PACKAGE}.__all__ is missing or empty")
        exported = []
    duplicates = {name for name in exported if exported.count(name) > 1}
    failures.missing(f"names listed more than once in {PACKAGE}.__all__", duplicates)
    failures.missing(
        f"names in {PACKAGE}.__all__ that {PACKAGE} does not define",
        {name for name in exported if not hasattr(module, name)},
    )
    listed = readme_names(readme, failures)
    failures.missing(
        f"names README.md lists that {PACKAGE} does not define",
        {name for name in listed if not hasattr(module, name)},
    )
    failures.missing(
        f"names README.md lists that are not in {PACKAGE}.__all__", set(listed) - set(exported)
    )
    print(f"README.md lists {len(listed)} public names; {PACKAGE}.__all__ has {len(exported)}")


def check_sdist(sdist: pathlib.Path, tracked: list[str], failures: Failures) -> None:
    with tarfile.open(sdist) as archive:
        members = [member.name for member in archive.getmembers() if member.isfile()]
    # Every member sits under one top folder, optim_zoo-<version>/.
    in_sdist = {name.split("/", 1)[1] for name in members if "/" in name}
    wanted = {path for path in tracked if path.startswith(SDIST_FOLDERS)} | set(SDIST_FILES)
    wanted |= {f"{PACKAGE}/py.typed", "tests/data/golden_5step.json"}
    failures.missing(f"files missing from the sdist {sdist.name}", wanted - in_sdist)


def check_version(module, failures: Failures) -> None:
    try:
        installed = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return  # reported by check_import_location
    declared = getattr(module, "__version__", None)
    if installed != declared:
        failures.add(
            f"the installed distribution is version {installed}, "
            f"but {PACKAGE}.__version__ is {declared!r}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=pathlib.Path, required=True)
    parser.add_argument("--manifest", type=pathlib.Path, required=True)
    parser.add_argument("--wheel", type=pathlib.Path, required=True)
    parser.add_argument("--sdist", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)

    source = args.source.resolve()
    tracked = sorted(
        path.removeprefix("./") for path in args.manifest.read_text().split("\0") if path
    )
    readme = (source / "README.md").read_text(encoding="utf-8")
    failures = Failures()

    # What the archives hold needs no import: checked even when the package cannot be imported.
    check_wheel_files(args.wheel, tracked, failures)
    check_sdist(args.sdist, tracked, failures)
    try:
        module = importlib.import_module(PACKAGE)
    except Exception as err:
        failures.add(f"cannot import {PACKAGE} from the installed wheel: {err!r}")
    else:
        print(f"{PACKAGE} {getattr(module, '__version__', '?')} from {module.__file__}")
        check_import_location(module, source, failures)
        check_installed_files(module, tracked, failures)
        check_names(module, readme, failures)
        check_version(module, failures)

    if failures.messages:
        print("check_wheel: FAILED", file=sys.stderr)
        for message in failures.messages:
            print(f"  {message}", file=sys.stderr)
        return 1
    print(f"check_wheel: OK ({args.wheel.name}, {args.sdist.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
