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
