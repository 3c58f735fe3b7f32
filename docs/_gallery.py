"""sphinx-gallery hooks for ``docs/conf.py``.

The tutorials are command-line scripts as well as gallery examples: they take ``--smoke``
and ``--out`` and read ``__file__`` and ``__doc__`` (for their default output folder and
their ``--help`` text), which sphinx-gallery does not set. ``reset_argv`` runs just before
each tutorial is executed, with the tutorial's globals in ``script_vars``: it sets the two
names and returns the smoke-mode command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

# the smoke runs' figures: beside the HTML, never over the full-run figures in tutorials/figures
SCRATCH = Path(__file__).resolve().parent.parent / "out" / "docs" / "tutorial_figures"


def reset_argv(gallery_conf, script_vars):
    src = Path(script_vars["src_file"])
    example_globals = script_vars.get("example_globals")
    if example_globals is not None:
        example_globals["__file__"] = str(src)
        example_globals["__doc__"] = ast.get_docstring(ast.parse(src.read_text(encoding="utf-8"))) or ""
    return ["--smoke", "--out", str(SCRATCH / src.stem)]
