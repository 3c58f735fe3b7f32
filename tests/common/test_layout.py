"""The layout's rules, checked on the source: ``common/`` imports neither torch nor JAX, the
backends mirror each other file for file with the same public signatures, no private name is
imported across packages, and the public aliases of moved modules keep working."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "ppl_score"
SUBPACKAGES = ("common", "torch", "jax", "pyro", "numpyro", "demo")

# Parameters one framework has and the other spells differently or does not need: the
# randomness (a JAX key, a torch generator), device/dtype placement, the pure-function state
# of JAX (params, state) against torch's modules, the collectives' scope (a torch process group, a
# JAX mesh axis name; torch reduces the .grad of parameters, JAX a gradient pytree), and
# torch-only conveniences.
FRAMEWORK_PARAMS = {"key", "generator", "dtype", "device", "state", "params", "apply_fn", "model", "net", "lr"}
FRAMEWORK_PARAMS |= {"fresh", "cast", "process_group", "axis_name", "grads"}


def _modules(sub: str) -> list[str]:
    return sorted(p.stem for p in (PKG / sub).glob("*.py") if p.stem != "__init__")


def test_common_imports_neither_torch_nor_jax():
    names = ", ".join(f"ppl_score.common.{m}" for m in _modules("common"))
    code = f"import sys, ppl_score, ppl_score.spec, {names}\nprint(sorted(m for m in ('torch', 'jax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_backends_mirror_file_for_file():
    assert _modules("torch") == _modules("jax")


@pytest.mark.parametrize("module", _modules("torch"))
def test_backends_mirror_public_signatures(module):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    t = importlib.import_module(f"ppl_score.torch.{module}")
    j = importlib.import_module(f"ppl_score.jax.{module}")
    for name in sorted(set(getattr(t, "__all__", ())) & set(getattr(j, "__all__", ()))):
        a, b = getattr(t, name), getattr(j, name)
        if not (callable(a) and callable(b)) or (isinstance(a, type) and issubclass(a, BaseException)):
            continue
        pa = [p for p in inspect.signature(a).parameters if p not in FRAMEWORK_PARAMS]
        pb = [p for p in inspect.signature(b).parameters if p not in FRAMEWORK_PARAMS]
        assert pa == pb, f"{module}.{name}: torch {pa} != jax {pb}"


def _package_of(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else ""


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` in ``path`` names."""
    if node.level == 0:
        return node.module or ""
    parts = ["ppl_score", *path.relative_to(PKG).parts[:-1]]
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PKG / parts[1]).is_dir()) else ""


def test_no_private_name_imported_across_packages():
    offences = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        own = _package_of(path)
        aliases = {}  # local name -> subpackage of the ppl_score module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = _resolve(path, node)
                if not module.startswith("ppl_score"):
                    continue
                for a in node.names:
                    target = f"{module}.{a.name}"
                    sub = (
                        _subpackage(target)
                        if (PKG / Path(*target.split(".")[1:])).with_suffix(".py").exists()
                        or (PKG / Path(*target.split(".")[1:])).is_dir()
                        else _subpackage(module)
                    )
                    if a.name.startswith("_") and not a.name.startswith("__") and sub != own:
                        offences.append(f"{path.relative_to(ROOT)}: from {module} import {a.name}")
                    aliases[a.asname or a.name] = sub
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.value.id in aliases
                and aliases[node.value.id] != own
            ):
                offences.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offences, "\n".join(offences)


def test_spec_alias_is_the_objectives_module():
    import ppl_score.common.objectives as objectives
    import ppl_score.spec as spec

    assert spec.__all__ == objectives.__all__
    for name in objectives.__all__:
        assert getattr(spec, name) is getattr(objectives, name)


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("ppl_score.validation", "ppl_score.common.validate", "NonFiniteWarning"),
    ],
)
def test_moved_modules_keep_a_deprecated_alias(old, new, name):
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    import {old} as old, {new} as new\n"
        f"assert old.{name} is new.{name}\n"
        "assert any(issubclass(x.category, DeprecationWarning) and 'deprecated alias' in str(x.message) for x in w)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": ""})


def test_finite_difference_flag():
    from ppl_score.spec import OBJECTIVES

    assert {k for k, v in OBJECTIVES.items() if v.finite_difference} == {"fd_ssm", "fd_dsm"}


def test_torch_langevin_step_takes_the_jax_order():
    torch = pytest.importorskip("torch")
    from ppl_score.torch import langevin

    def fn(x):
        return -(x * x).sum(-1)

    state = langevin.init(fn, torch.zeros(3, 2, dtype=torch.float64))
    new, _ = langevin.step(state, fn, 0.1, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        old, _ = langevin.step(fn, state, 0.1, generator=torch.Generator().manual_seed(0))
    assert any(issubclass(x.category, DeprecationWarning) for x in w)
    torch.testing.assert_close(new.x, old.x, rtol=0, atol=0)
