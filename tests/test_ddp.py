"""Pruning with ``strategy: blockwise_ddp`` on 2 CPU processes (gloo) equals the single process.

Each rank calibrates on its half of the samples (Lightning's DistributedSampler) and the Gram
matrices are summed across ranks before every solve. The layers of a block are spread over the
ranks (``assign_layers``, balanced by solve cost): each rank solves only its share, and the owner
broadcasts each solved weight and mask, so all ranks end with the same model; rank 0 exports it.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PROX_SOLVER, SHORT_WORDS, callback, fit_args, random_words
from safetensors.torch import load_file

from prox24_lightning.artifacts import load_masks
from prox24_lightning.strategies import assign_layers
from prox24_lightning.testing import save_tiny_model


def _run(model: str, out: Path, text: Path, **extra: str) -> None:
    overrides = {
        **PROX_SOLVER,
        "model.solver.momentum": None,  # the default, 0: no extrapolation
        # enough CG steps to reach the exact refit: the weights are then a function of mask + Gram
        "model.solver.refine_steps": "64",
        "data.nsamples": "8",
        **extra,
    }
    export = callback(
        "prox24_lightning.callbacks.ExportPruned", dirpath=out / "export", overwrite="true"
    )
    args = fit_args(model, out, text, method="prox", callbacks=export, **overrides)
    cmd = [sys.executable, "-m", "prox24_lightning", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[str, Path]:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    root = tmp_path_factory.mktemp("ddp")
    # No GQA: with shared KV heads the o_proj inputs span a subspace, the Gram is singular and the
    # refit on a mask is not unique (equal loss, different weights); here it is unique.
    model = save_tiny_model(root / "model", "llama", num_layers=2, hidden_size=32,
                            intermediate_size=64, num_heads=4, num_kv_heads=4)  # fmt: skip
    text = root / "train.txt"
    text.write_text(random_words(random.Random(0), 4000, SHORT_WORDS))
    return model, text


def _compare(single: Path, ddp: Path, *, ridged: bool = False) -> tuple[dict, dict]:
    """Masks identical, weights equal to fp32 tolerance; returns both sparsity reports. ``ridged``:
    the runs set ``ridge_shrinkage``, and every layer's ridge must be the single process's."""
    a = load_masks(single / "export" / "masks.safetensors")
    b = load_masks(ddp / "export" / "masks.safetensors")
    assert a.keys() == b.keys() and len(a) == 14
    for k in a:
        assert torch.equal(a[k], b[k]), k
    wa = load_file(str(single / "export" / "model.safetensors"))
    wb = load_file(str(ddp / "export" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    reports = [
        json.loads((d / "export" / "sparsity_report.json").read_text()) for d in (single, ddp)
    ]
    single_report, ddp_report = reports
    # Who solved what: recorded per layer by the process that ran the solve, counted per rank.
    assert {v["solved_by_rank"] for v in single_report["layers"].values()} == {0}
    assert single_report["summary"]["solves_per_rank"] == [14]
    by_rank = [v["solved_by_rank"] for v in ddp_report["layers"].values()]
    counts = [by_rank.count(rank) for rank in (0, 1)]
    assert ddp_report["summary"]["solves_per_rank"] == counts and sum(counts) == 14
    assert min(counts) > 0
    # the calibration tokens of both shards are counted
    for report in reports:
        assert {v["calibration_tokens"] for v in report["layers"].values()} == {8 * 32}
    # and so are their sequences' spreads: every layer's ridge is the single process's
    for name, row in single_report["layers"].items() if ridged else ():
        assert row["ridge_rule"] == ddp_report["layers"][name]["ridge_rule"] == "shrinkage"
        assert math.isclose(row["ridge"], ddp_report["layers"][name]["ridge"], rel_tol=1e-4)
    return single_report, ddp_report


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path, inputs):
    model, text = inputs
    # the shrinkage ridge: each rank's sequence spread is summed like its Gram
    ridge = {"model.solver.ridge_shrinkage": "2"}
    _run(model, tmp_path / "single", text, **{"trainer.devices": "1"}, **ridge)
    ddp = {"trainer.devices": "2", "trainer.strategy": "blockwise_ddp"}
    _run(model, tmp_path / "ddp", text, **ddp, **ridge)
    _, report = _compare(tmp_path / "single", tmp_path / "ddp", ridged=True)
    layers = report["layers"]
    for block in (0, 1):
        costs = {
            n: v["shape"][0] * v["shape"][1] ** 2 for n, v in layers.items() if v["block"] == block
        }
        assert {n: layers[n]["solved_by_rank"] for n in costs} == assign_layers(costs, 2)
    # each layer once, on one rank: down, q, v on rank 0, the others on rank 1, not 14 + 14
    assert report["summary"]["solves_per_rank"] == [6, 8]


@pytest.mark.slow
def test_two_process_ddp_offloaded_true_sequential_matches_single_process(tmp_path, inputs):
    """Spread within each true-sequential group, with the model offloaded: the broadcasts land
    in the onloaded parameters (on CPU these are the store's tensors) and the export is equal."""
    model, text = inputs
    seq = {"model.sequential": "true_sequential"}
    _run(model, tmp_path / "single", text, **{"trainer.devices": "1"}, **seq)
    ddp = {"trainer.devices": "2", "trainer.strategy": "blockwise_ddp", "model.offload": "true"}
    _run(model, tmp_path / "ddp", text, **ddp, **seq)
    _, report = _compare(tmp_path / "single", tmp_path / "ddp")
    # groups q/k/v, o, gate/up, down: rank 1 gets k and up (the second of each shared group)
    expected = {"q_proj": 0, "k_proj": 1, "v_proj": 0, "o_proj": 0, "gate_proj": 0,
                "up_proj": 1, "down_proj": 0}  # fmt: skip
    for name, layer in report["layers"].items():
        assert layer["solved_by_rank"] == expected[name.rsplit(".", 1)[1]], name
    assert report["summary"]["solves_per_rank"] == [10, 4]


def test_assign_layers_balances_cost_deterministically():
    costs = {"q": 1.0, "k": 1.0, "v": 1.0, "o": 1.0, "gate": 2.0, "up": 2.0, "down": 4.0}
    owners = assign_layers(costs, 2)
    assert list(owners) == list(costs)  # the caller's order
    assert owners == {"q": 0, "k": 1, "v": 0, "o": 1, "gate": 1, "up": 1, "down": 0}
    load = [sum(c for n, c in costs.items() if owners[n] == r) for r in (0, 1)]
    assert load == [6.0, 6.0]
    assert assign_layers(costs, 1) == dict.fromkeys(costs, 0)
    assert set(assign_layers(costs, 16).values()) == set(range(7))  # more ranks than layers
    with pytest.raises(ValueError):
        assign_layers(costs, 0)
