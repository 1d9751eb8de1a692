"""The architecture's promises: the lower floors import no Lightning, methods come from one
registry, recipes are named from YAML, and module sizes stay within bounds."""

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


def test_modules_stay_small_and_the_pruner_thin():
    sizes = {p: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 600, max(sizes.items(), key=lambda kv: kv[1])
    tree = ast.parse((PACKAGE / "pruner.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BlockwisePruner"]
    assert cls.end_lineno - cls.lineno + 1 <= 350


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
