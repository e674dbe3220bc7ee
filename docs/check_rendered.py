"""Checks the built site as a reader's browser shows it, offline.

    python docs/check_rendered.py docs/_build/html [--screenshots DIR]

Opens pages in headless Chromium with every host name unresolvable (so nothing can come from
the network), lets their scripts run, and reads the resulting DOM:

- an optimizer's page and the primitives' page show their equations typeset by MathJax
  (``mjx-container`` elements, and no MathJax error);
- each notebook page shows its figures: ``<img>`` elements whose files are in the build;
- no page of the site loads a script, a stylesheet or an image from the network.

With --screenshots, it also saves a PNG of each checked page there, for a person to look at
(keep them out of the repository). Exits 1 listing every failure.
"""

from __future__ import annotations

import argparse
import html.parser
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# (page, what it must show): "math" (at least `MIN_EQUATIONS` typeset equations), or "figures"
# (at least `MIN_FIGURES` images that exist in the build).
PAGES = {
    "optimizers.html": "math",
    "primitives.html": "math",
    "notebooks/01_quickstart.html": "figures",
    "notebooks/02_primitives.html": "figures",
    "notebooks/03_compare.html": "figures",
}
MIN_EQUATIONS = 10
MIN_FIGURES = 3
# Long enough for MathJax to typeset a long page on a slow, busy machine (virtual time: the
# browser skips ahead when idle, so a fast machine does not wait it out).
VIRTUAL_TIME_MS = 30_000
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(
        f"check_rendered: none of {', '.join(BROWSERS)} found (apt-get install chromium)"
    )


def chromium(page: Path, *args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        command = [
            browser(),
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            # Every host name fails to resolve: the page gets nothing from the network.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--virtual-time-budget={VIRTUAL_TIME_MS}",
            "--window-size=1280,2400",
            *args,
            page.resolve().as_uri(),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


class Tags(html.parser.HTMLParser):
    """Counts the DOM's MathJax output and collects its images and what it loads."""

    def __init__(self) -> None:
        super().__init__()
        self.equations = 0
        self.math_errors = 0
        self.images: list[str] = []
        self.remote: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "mjx-container":
            self.equations += 1
        elif tag == "mjx-merror":
            self.math_errors += 1
        if tag == "img" and attributes.get("src"):
            self.images.append(attributes["src"])
        url = attributes.get("src") if tag in ("script", "img") else None
        if tag == "link" and "stylesheet" in (attributes.get("rel") or ""):
            url = attributes.get("href")
        if url and re.match(r"^(https?:)?//", url):
            self.remote.append(f"<{tag}> {url}")


def parse(text: str) -> Tags:
    tags = Tags()
    tags.feed(text)
    return tags


def check(site: Path, screenshots: Path | None) -> list[str]:
    failures = []
    # The static HTML of every page: nothing from the network, and no placeholder of Sphinx's
    # where a signature names a type alias.
    for page in sorted(site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        for remote in parse(text).remote:
            failures.append(f"{page.relative_to(site)} loads {remote}")
        if "TypeAliasForwardRef" in text:
            failures.append(f"{page.relative_to(site)}: a signature reads TypeAliasForwardRef")
    for name, wants in PAGES.items():
        page = site / name
        if not page.is_file():
            failures.append(f"{name}: not built")
            continue
        dom = parse(chromium(page, "--dump-dom"))
        if wants == "math":
            print(f"{name}: {dom.equations} typeset equations, {dom.math_errors} MathJax errors")
            if dom.equations < MIN_EQUATIONS:
                failures.append(f"{name}: {dom.equations} typeset equations (MathJax did not run?)")
            if dom.math_errors:
                failures.append(f"{name}: {dom.math_errors} equations MathJax could not typeset")
        else:
            figures = [src for src in dom.images if "_images/" in src]
            missing = [src for src in figures if not (page.parent / src).is_file()]
            print(f"{name}: {len(figures)} figures, {len(missing)} missing from the build")
            if len(figures) < MIN_FIGURES:
                failures.append(f"{name}: {len(figures)} figures, expected >= {MIN_FIGURES}")
            failures.extend(f"{name}: figure {src} is not in the build" for src in missing)
        if screenshots is not None:
            screenshots.mkdir(parents=True, exist_ok=True)
            shot = screenshots / (name.replace("/", "_").removesuffix(".html") + ".png")
            chromium(page, f"--screenshot={shot}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site, e.g. docs/_build/html")
    parser.add_argument("--screenshots", type=Path, default=None, help="save PNGs of the pages")
    args = parser.parse_args(argv)
    os.environ.setdefault("HOME", tempfile.gettempdir())  # chromium wants a home for its files
    failures = check(args.site, args.screenshots)
    if failures:
        print("check_rendered: FAILED", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    print(f"check_rendered: OK ({len(PAGES)} pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
