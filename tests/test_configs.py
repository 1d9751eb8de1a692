"""Every shipped YAML config parses with the real CLI (``--print_config``), as litgpt does."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prox24_lightning.cli import cli_main
from prox24_lightning.solvers import METHODS, make_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "qwen2.5-7b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]
    if model["class_path"].endswith("BlockwisePruner"):
        assert model["init_args"]["method"] in METHODS
        make_config(model["init_args"]["method"], model["init_args"].get("solver"))
    else:
        assert model["class_path"].endswith("MaskedFinetuner")
        assert model["init_args"]["model_name_or_path"]


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert "fit" in out and "validate" in out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_solver_serves_every_method(path):
    """``--model.init_args.method NAME`` on any shipped config builds a valid solver config (as
    ``make demo`` does with Wanda on demo.yaml, a prox recipe by name)."""
    model = yaml.safe_load(path.read_text())["model"]
    if not model["class_path"].endswith("BlockwisePruner"):
        pytest.skip("not a pruning config")
    solver = model["init_args"].get("solver")
    for method in METHODS:
        assert isinstance(make_config(method, solver), METHODS[method].config_class)


def test_paper_configs_run_the_paper_recipe():
    """A config that says "(paper recipe)" resolves to RECIPES["paper"] (70B: its lambda0/beta),
    not to the default a mapping without ``recipe`` starts from."""
    import dataclasses

    from prox24_lightning.solvers import RECIPES

    paper = [p for p in CONFIGS if "(paper recipe)" in p.read_text().splitlines()[0]]
    assert {p.stem for p in paper} >= {"llama2-7b", "llama2-13b", "llama3-8b", "qwen2.5-7b"}
    for path in [*paper, CONFIGS[0].parent / "llama2-70b.yaml"]:
        solver = yaml.safe_load(path.read_text())["model"]["init_args"]["solver"]
        got = make_config("prox", solver)
        assert got == dataclasses.replace(RECIPES["paper"], lambda0=got.lambda0, beta=got.beta)
        assert (got.lambda0, got.beta) in ((0.01, 1.01), (0.001, 1.005)), path.name
