"""Sphinx configuration for ppl_score's documentation (``make docs``).

The build is offline: no intersphinx inventories are fetched, so references to Pyro,
NumPyro, torch or JAX objects render as code, not links. The tutorials in ``tutorials/`` are
executed by sphinx-gallery in smoke mode (``--smoke``: tiny sizes, a few steps), with their
figures written to a scratch folder so that the committed full-run figures stay untouched.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # ppl_score from this checkout, even without an install
sys.path.insert(0, str(DOCS))  # _gallery (sphinx-gallery hooks)

os.environ.setdefault("MPLBACKEND", "Agg")

import ppl_score  # noqa: E402

project = "ppl_score"
author = "ppl_score developers"
copyright = "ppl_score developers"
release = ppl_score.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**/README.md"]

# -- autodoc / autosummary / napoleon ------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

# -- MyST (Markdown pages: the spec, the guide, the experiments) ---------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- sphinx-gallery (the tutorials) ----------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "tutorials"),
    "gallery_dirs": "tutorials",
    # execute every tutorial but the Lightning one (two spawned processes; Lightning is not a
    # dependency): its page shows the code, ``tests/tutorials/test_lightning.py`` runs it
    "filename_pattern": r"^(?!.*lightning_ddp).*\.py$",
    "ignore_pattern": r"__init__\.py",
    "reset_argv": "_gallery.reset_argv",  # --smoke --out <scratch>, and __file__/__doc__
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "write_computation_times": False,
    "show_memory": False,
    "remove_config_comments": True,
    "image_scrapers": ("matplotlib",),
}

# -- HTML ----------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"ppl_score {release}"
html_static_path: list[str] = []


# -- hooks -----------------------------------------------------------------------------------
def _skip_foreign(app, what, name, obj, skip, options):
    """Document only what ppl_score defines: a module's ``__all__`` may re-export a function
    or class of another library (``ppl_score.jax.mmd.stop_gradient`` is JAX's), whose
    docstring is that library's to render."""
    if what == "module" and (inspect.isfunction(obj) or inspect.isclass(obj)):
        if not (getattr(obj, "__module__", None) or "").startswith("ppl_score"):
            return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_foreign)
