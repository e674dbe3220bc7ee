"""Sphinx configuration of optim_zoo's documentation site.

Build it (warnings are errors, as in CI) from the repository root:

    pip install -e '.[docs]'
    python -m sphinx -W --keep-going -n docs docs/_build/html

The pages are MyST Markdown; the notebooks are rendered with the outputs they were committed with
(tests/test_notebooks.py executes them), never run again here. Nothing the built pages load comes
from the network: MathJax is served from the site itself (see `MATHJAX` below).
"""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

from docutils import nodes
from sphinx.transforms import SphinxTransform

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# The one place the project's address is written: pyproject.toml's [project.urls].
REPOSITORY = PYPROJECT["urls"]["Repository"]

project = PYPROJECT["name"]
release = version = PYPROJECT["version"]
author = "optim_zoo contributors"
copyright = "optim_zoo contributors"

extensions = [
    "myst_nb",  # MyST Markdown pages and .ipynb notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the Google-style docstrings
    "sphinx.ext.mathjax",
    # MATHJAX: MathJax 3.2.2 from a PyPI wheel, copied into the site's _static/mathjax and loaded
    # from there. The default loads it from a CDN, which CI's machines and many readers' cannot
    # reach; Debian's libjs-mathjax is MathJax 2 and needs apt, and sphinx.ext.imgmath needs a
    # LaTeX installation: this installs with pip in seconds, where the docs extra is installed.
    "sphinx-mathjax-offline",
]

# Sources: the pages of docs/ and the notebooks of notebooks/, copied on every build into
# docs/notebooks/ (ignored by git), so that the repository holds one copy of each and the
# notebooks' links to one another resolve as they do on GitHub.
NOTEBOOKS = DOCS / "notebooks"
NOTEBOOKS.mkdir(exist_ok=True)
for stale in NOTEBOOKS.glob("*.ipynb"):
    if not (ROOT / "notebooks" / stale.name).is_file():
        stale.unlink()
for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    copy = NOTEBOOKS / notebook.name
    if not copy.is_file() or copy.read_bytes() != notebook.read_bytes():
        shutil.copyfile(notebook, copy)

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
master_doc = "index"

# --- MyST and MyST-NB ----------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3  # so that `page.md#a-heading` links resolve, as on GitHub
nb_execution_mode = "off"  # the committed outputs, as tests/test_notebooks.py checks them
nb_merge_streams = True

# --- autodoc and napoleon ------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# The annotations as the source spells them, not the unions they stand for.
autodoc_type_aliases = {
    name: name
    for name in (
        "jax.typing.ArrayLike",
        "jax.typing.DTypeLike",
        "optax.ScalarOrSchedule",
        "optax.Params",
        "FactoringRule",
    )
}
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# The docstrings' own sections beyond Google style's (STYLE.md asks for a "Differences" note).
napoleon_custom_sections = [("Differences", "notes_style")]

# -n (nitpicky): every cross-reference must resolve. Names of other packages (jax, optax, numpy,
# flax) have no inventory here, since intersphinx would fetch theirs from the network.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|numpy|np|flax|chex|orbax)(\..*)?"),
    (r"py:.*", r"(Callable|Any|NamedTuple|TypeAliasForwardRef|collections\.abc\..*|typing\..*)"),
    (r"py:.*", r"(ArrayLike|DTypeLike|ScalarOrSchedule|Params|PerLeaf|FactoringRule)"),
    (r"py:.*", r"optim_zoo\.(_\w+|second_moment\.FactoringRule)(\..*)?"),
]

# --- HTML ----------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "optim_zoo"
html_theme_options = {
    "repository_url": REPOSITORY,
    "repository_branch": "main",
    "path_to_docs": "docs",
    "use_repository_button": True,
    # No source, edit or launch buttons: the theme would point them at docs/notebooks/, the
    # build's copies; each notebook opens with its own Colab link.
    "show_toc_level": 2,
}
html_static_path: list[str] = []
html_last_updated_fmt = None


class LocalImagesOnly(SphinxTransform):
    """Replaces an image loaded from the network (the notebooks' Colab badge) with its alt text.

    The site loads nothing from outside; the link around such an image stays.
    """

    default_priority = 100

    def apply(self, **kwargs) -> None:
        for image in list(self.document.findall(nodes.image)):
            uri = image.get("uri", "")
            if uri.startswith(("http://", "https://", "//")):
                image.replace_self(nodes.inline(text=image.get("alt", "") or uri))


def _alias_names(app, what, name, obj, options, signature, return_annotation):
    """Signatures name an alias in a union (``jax.typing.ArrayLike | None``) as the source does:
    Sphinx writes the placeholder it resolved `autodoc_type_aliases` with there."""

    def spelled(text: str | None) -> str | None:
        return text and re.sub(r"TypeAliasForwardRef\('([^']*)'\)", r"\1", text)

    return spelled(signature), spelled(return_annotation)


def setup(app):
    app.add_transform(LocalImagesOnly)
    app.connect("autodoc-process-signature", _alias_names)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
