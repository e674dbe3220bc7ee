"""Puts the repository root on sys.path, for a benchmark run as `python benchmarks/<name>.py`.

Python then puts only `benchmarks/` itself on sys.path; each script imports this module first
(by its bare name, found there), so that `benchmarks` and `fixtures` import as packages.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
