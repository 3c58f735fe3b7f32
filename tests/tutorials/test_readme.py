"""The README's Python snippets use no undefined names (each snippet stands on its own: its
imports and definitions, plus Python's builtins)."""

from __future__ import annotations

import ast
import builtins
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _snippets():
    text = README.read_text()
    return [m.group(1) for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S)]


def _undefined(source: str) -> set:
    tree = ast.parse(source)
    bound, loaded = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, (ast.Store, ast.Del)) else loaded).add(node.id)
    return loaded - bound


@pytest.mark.parametrize("k", range(len(_snippets())))
def test_readme_snippet_defines_every_name(k):
    source = _snippets()[k]
    missing = _undefined(source)
    assert not missing, f"README snippet {k} uses undefined names {sorted(missing)}:\n{source}"
