"""The architecture's promises: the lower floors import no Lightning, methods come from one
registry, recipes are named from YAML, and the import graph has no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from prox24_lightning.solvers import METHODS, RECIPES, ProxConfig, WandaConfig, make_config

PACKAGE = Path(__file__).resolve().parent.parent / "prox24_lightning"


def test_lower_floors_import_no_lightning():
    code = (
        "import sys\n"
        "import prox24_lightning.ops, prox24_lightning.optim, prox24_lightning.solvers\n"
        "import prox24_lightning.pipeline, prox24_lightning.calibration\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'lightning_fabric'))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules ``path`` imports anywhere (a deferred import inside a function is still
    a dependency: two modules that need each other are one job split in two), except under
    ``TYPE_CHECKING``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                targets = [a.name for a in sub.names]
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    anchor = package.split(".")[: len(package.split(".")) - sub.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import mod`` imports the submodule ``pkg.mod`` when there is one.
                targets = [f"{base}.{a.name}" for a in sub.names] + [base]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
    return found


def test_the_package_has_no_import_cycle():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: _imports(p, set(files)) for m, p in files.items()}
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            cycle = stack[stack.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*stack, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    # The library floors never import the command line.
    for module, targets in graph.items():
        if not module.startswith(("prox24_lightning.cli", "prox24_lightning.command")):
            assert not {t for t in targets if t.startswith("prox24_lightning.cli")}, module


def test_methods_live_in_one_registry():
    assert {"magnitude", "wanda", "sparsegpt", "prox"} <= set(METHODS)
    for name, cls in METHODS.items():
        assert cls.name == name
        assert isinstance(make_config(name), cls.config_class)
    # A Wanda config carries no prox settings, and prox-only keys given to it are ignored.
    wanda = make_config("wanda", {"beta": 1.1, "refine": "cg", "refine_steps": 5})
    assert wanda == WandaConfig(refine="cg", refine_steps=5)
    assert not hasattr(wanda, "beta")


def test_recipes_by_name_with_overrides():
    fast = make_config("prox", {"recipe": "fast", "beta": 1.05})
    assert isinstance(fast, ProxConfig) and fast.beta == 1.05
    assert fast.momentum == RECIPES["fast"].momentum and RECIPES["fast"].beta == 1.03
    assert make_config("prox", {"recipe": "paper"}) == RECIPES["paper"]
    with pytest.raises(
        ValueError, match="unknown solver.recipe 'quick'; choose one of default, paper"
    ):
        make_config("prox", {"recipe": "quick"})
    # One config serves every method: a baseline takes the recipe's refinement only.
    assert make_config("wanda", {"recipe": "fast"}) == WandaConfig(refine="cg", refine_steps=50)
    assert make_config("sparsegpt", {"recipe": "paper", "refine_steps": 7}).refine_steps == 7
    with pytest.raises(ValueError, match=r"unknown solver setting\(s\) betta .* valid: recipe"):
        make_config("prox", {"betta": 1.1})


def test_no_solver_reads_the_optimizers_state():
    """A method's solve asks its optimizer through typed calls (``status``, ``replace_support``),
    never by reading or writing the optimizer's state dict by key."""
    offenders = []
    for path in (PACKAGE / "solvers").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("layer_state", "state_dict"):
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
            if (
                isinstance(node, ast.Subscript)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "state"
            ):
                offenders.append(f"{path.name}:{node.lineno} .state[...]")
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                if node.slice.value in ("phase", "prox_steps", "lam", "frac_2of4", "forced"):
                    offenders.append(f"{path.name}:{node.lineno} [{node.slice.value!r}]")
    assert not offenders, offenders


def test_one_masked_cg():
    """Conjugate gradients on a fixed support are written once (ops/cg.py)."""
    import re

    writers = [
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if re.search(r"rr_new|\brr\s*=\s*\(", p.read_text())
    ]
    assert writers == ["ops/cg.py"], writers
