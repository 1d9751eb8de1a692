"""Every shipped YAML config parses with the real CLI (``--print_config``), as litgpt does, and
every method override (``configs/methods/``) on its documented model config parses to the run it
stands for."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from prox24_lightning.cli import cli_main
from prox24_lightning.solvers import METHODS, make_config

ROOT = Path(__file__).resolve().parent.parent
#: Configs that run on their own (a model, its data and trainer, a method).
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
#: Method overrides: only ``model.init_args.method`` and ``solver``, given after a model config.
METHOD_FILES = sorted((ROOT / "configs" / "methods").glob("*.yaml"))

#: The Llama-2-7B comparison runs, ``--config configs/llama2-7b.yaml --config
#: configs/methods/<name>.yaml --trainer.default_root_dir <folder>``, and what each one's own
#: file ``configs/llama2-7b-<...>.yaml`` held before the method overrides replaced them: run
#: folder, method, solver. The rest of each such file was ``configs/llama2-7b.yaml``.
LLAMA2_7B_RUNS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "wanda": ("outputs/llama2-7b-wanda", "wanda", {"refine": "gd", "refine_steps": 0}),
    "wanda-gd": ("outputs/llama2-7b-wanda-gd", "wanda", {"refine": "gd", "refine_steps": 1000}),
    "sparsegpt": ("outputs/llama2-7b-sparsegpt", "sparsegpt", {"refine": "gd", "refine_steps": 0}),
    "sparsegpt-gd": (
        "outputs/llama2-7b-sparsegpt-gd",
        "sparsegpt",
        {"refine": "gd", "refine_steps": 1000},
    ),
    "alps": (
        "outputs/llama2-7b-alps",
        "alps",
        {
            "refine": "gd",
            "refine_steps": 0,
            "alps_rho0": 0.1,
            "alps_max_iterations": 300,
            "alps_pcg_iterations": 10,
            "alps_dampening": 0.01,
        },
    ),
    "alps-gd": (
        "outputs/llama2-7b-alps-gd",
        "alps",
        {
            "refine": "gd",
            "refine_steps": 1000,
            "alps_rho0": 0.1,
            "alps_max_iterations": 300,
            "alps_pcg_iterations": 10,
            "alps_dampening": 0.01,
        },
    ),
    "admm-gd": (
        "outputs/llama2-7b-admm-gd",
        "admm",
        {
            "refine": "gd",
            "refine_steps": 1000,
            "admm_iterations": 20,
            "admm_mask_iterations": 15,
            "admm_rho": 1.0,
            "admm_dampening": 0.1,
        },
    ),
    "prox-default": ("outputs/llama2-7b-default", "prox", {"recipe": "default"}),
}


@functools.cache
def _printed(*args: str) -> dict[str, Any]:
    """The config ``prox24 fit ARGS --print_config`` prints, parsed (cached: each costs a parse)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def _set_keys(solver: dict[str, Any] | None) -> dict[str, Any]:
    """The solver keys a config sets (a printed config also lists the unset ones, as null)."""
    return {k: v for k, v in (solver or {}).items() if v is not None}


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "qwen2.5-7b"} <= names
    assert {p.stem for p in METHOD_FILES} == set(LLAMA2_7B_RUNS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses(path):
    model = _printed("--config", str(path))["model"]
    if model["class_path"].endswith("BlockwisePruner"):
        assert model["init_args"]["method"] in METHODS
        make_config(model["init_args"]["method"], _set_keys(model["init_args"].get("solver")))
    else:
        assert model["class_path"].endswith("MaskedFinetuner")
        assert model["init_args"]["model_name_or_path"]


@pytest.mark.parametrize("name", sorted(LLAMA2_7B_RUNS))
def test_method_override_parses_to_the_run_it_replaced(name):
    """Base + override + run folder parse to the base's config with exactly the run folder,
    method and solver of the run's former single file, and resolve to the same solver config."""
    folder, method, solver = LLAMA2_7B_RUNS[name]
    base = str(ROOT / "configs" / "llama2-7b.yaml")
    override = str(ROOT / "configs" / "methods" / f"{name}.yaml")
    got = _printed("--config", base, "--config", override, f"--trainer.default_root_dir={folder}")
    assert _set_keys(got["model"]["init_args"]["solver"]) == solver
    expected = copy.deepcopy(_printed("--config", base))
    expected["trainer"]["default_root_dir"] = folder
    expected["model"]["init_args"]["method"] = method
    expected["model"]["init_args"]["solver"] = got["model"]["init_args"]["solver"]
    assert got == expected
    assert make_config(method, _set_keys(got["model"]["init_args"]["solver"])) == make_config(
        method, solver
    )


@pytest.mark.parametrize("path", METHOD_FILES, ids=[p.stem for p in METHOD_FILES])
def test_method_file_overrides_every_model_config(path):
    """A method file sets only the method and its solver, and every solver key any model config
    sets (``null``: unset), so on any model config it runs exactly its own solver settings,
    whether a later file's mapping replaces or updates the earlier one."""
    override = yaml.safe_load(path.read_text())
    assert list(override) == ["model"] and list(override["model"]) == ["init_args"]
    init_args = override["model"]["init_args"]
    assert set(init_args) == {"method", "solver"} and init_args["method"] in METHODS
    for config in CONFIGS:
        model = yaml.safe_load(config.read_text())["model"]
        if model["class_path"].endswith("BlockwisePruner"):
            assert set(model["init_args"].get("solver") or {}) <= set(init_args["solver"]), (
                config.name
            )


def test_documented_method_overrides_are_tested():
    """Every ``--config MODEL --config configs/methods/NAME.yaml`` in the README and in the
    configs' own comments is a combination that
    :func:`test_method_override_parses_to_the_run_it_replaced` parses."""
    texts = [ROOT / "README.md", *CONFIGS, *METHOD_FILES]
    pattern = re.compile(r"--config (configs/\S+\.yaml) --config configs/methods/(\S+)\.yaml")
    found = {m.groups() for p in texts for m in pattern.finditer(p.read_text())}
    assert found, "no documented method override"
    assert found <= {("configs/llama2-7b.yaml", name) for name in LLAMA2_7B_RUNS}, found


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
