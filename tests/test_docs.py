"""The documentation site's sources: every public name has its API entry, and the project's
address is written in one place.

Cheap on purpose: nothing here builds the site. `.ci/run` builds it with warnings as errors
(`python -m sphinx -W --keep-going -n docs ...`), which fails on a broken cross-reference or
internal link, and checks the rendered pages in a headless browser (docs/check_rendered.py).
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from pathlib import Path

import optim_zoo

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# An autodoc entry in a page: ".. autofunction:: optim_zoo.adan" inside an {eval-rst} block.
ENTRY = re.compile(r"^\.\. auto(?:function|class|data)::\s+optim_zoo\.(\w+)\s*$", re.MULTILINE)


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_every_public_name_has_one_api_entry():
    entries = Counter(name for page in _pages() for name in ENTRY.findall(page.read_text()))
    assert set(entries) == set(optim_zoo.__all__), (
        f"missing: {sorted(set(optim_zoo.__all__) - set(entries))}, "
        f"not public: {sorted(set(entries) - set(optim_zoo.__all__))}"
    )
    # A second entry would be a duplicate object description, which the build refuses.
    assert [name for name, n in entries.items() if n > 1] == []


def test_the_site_has_its_pages_and_a_docs_extra():
    index = (DOCS / "index.md").read_text()
    for page in ("getting_started", "optimizers", "primitives", "state", "ecosystem"):
        assert page in index and (DOCS / f"{page}.md").is_file(), page
    for page in ("performance", "evidence", "architecture"):
        assert page in index and (DOCS / f"{page}.md").is_file(), page
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{notebook.stem}" in index, notebook.name
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert {"sphinx", "myst-nb", "sphinx-book-theme"} <= {
        re.split(r"[<>=!~ ]", requirement)[0] for requirement in extras["docs"]
    }


def repository() -> str:
    """The project's address: pyproject.toml's [project.urls], the one place it is written."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["urls"]["Repository"]


def test_every_address_of_the_project_is_pyprojects():
    owner_and_name = repository().removeprefix("https://github.com/")
    # Any github.com address of a repository named optim_zoo, in Colab's form too.
    address = re.compile(r"github(?:\.com)?/([\w.-]+/optim_zoo)\b")
    files = [ROOT / "README.md", *_pages(), *sorted((ROOT / "notebooks").glob("*.ipynb"))]
    found = {(path.name, m) for path in files for m in address.findall(path.read_text())}
    assert found, "no address of the project found: the pattern is stale"
    assert {m for _, m in found} == {owner_and_name}, sorted(found)
