"""Import a script (an experiment or a tutorial) as a module, for tests of its functions."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str) -> ModuleType:
    """``path`` imported as module ``name``. Scripts may set single-thread settings in
    ``os.environ`` at import; they are undone, so later subprocesses of the test session do
    not inherit them."""
    saved = dict(os.environ)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module
