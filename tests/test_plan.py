"""The run plan (``prox24 plan`` and the start of ``fit``): figures from a config alone, on the
meta device, and the refusal of a run whose output disk is too small, before the model loads.

The Llama-2 fixtures hold the published configs' values (7B: hidden 4096, 32 blocks, MLP 11008,
32/32 heads; 70B: hidden 8192, 80 blocks, MLP 28672, 64/8 heads; both vocab 32000, 4096
positions)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import fit_args

from prox24_lightning import plan as plan_mod
from prox24_lightning.command import plan_main
from prox24_lightning.plan import (
    GB,
    InsufficientDiskSpace,
    RunSettings,
    check_disk,
    existing_parent,
    load_model_config,
    model_shape,
    plan_run,
    resolve_dtype,
)
from prox24_lightning.testing import save_tiny_model, tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent
LLAMA2_70B = FIXTURES / "llama2-70b-config.json"
LLAMA2_7B = FIXTURES / "llama2-7b-config.json"
#: The paper's calibration: 1024 x 2048 tokens, in batches of 8 (configs/llama2-*.yaml).
PAPER = {"nsamples": 1024, "seqlen": 2048, "batch_size": 8}


def shape_of(path: Path, dtype: str = "bfloat16"):
    config = load_model_config(str(path))
    return model_shape(config, dtype=resolve_dtype(config, dtype))


@pytest.fixture(scope="module")
def llama70b():
    return shape_of(LLAMA2_70B)


@pytest.fixture(scope="module")
def llama7b():
    return shape_of(LLAMA2_7B)


def rows(plan_rows) -> dict[str, int]:
    return {item: nbytes for item, nbytes, _ in plan_rows}


def test_llama2_70b_shapes_from_the_config_alone(llama70b):
    shape = llama70b
    assert shape.architecture == "LlamaForCausalLM" and shape.dtype == torch.bfloat16
    assert len(shape.blocks) == 80 and shape.hidden_size == 8192
    assert round(shape.weight_bytes / GB) == 138  # 68.98B parameters in bf16
    block = shape.blocks[0]
    dims = {layer.name.rpartition(".")[2]: (layer.d_out, layer.d_in) for layer in block.layers}
    assert dims == {
        "q_proj": (8192, 8192),
        "k_proj": (1024, 8192),  # 8 KV heads of 128
        "v_proj": (1024, 8192),
        "o_proj": (8192, 8192),
        "gate_proj": (28672, 8192),
        "up_proj": (28672, 8192),
        "down_proj": (8192, 28672),
    }
    # Shared inputs found by hooks on a meta forward, as the GramCollector finds them.
    assert shape.grouping == "forward"
    short = [[n.rpartition(".")[2] for n in g] for g in block.groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"],
                     ["down_proj"]]  # fmt: skip
    assert block.gram_bytes() == 4 * (3 * 8192**2 + 28672**2)


def test_llama2_70b_offload_fits_a_40gb_accelerator(llama70b):
    """configs/llama2-70b.yaml: the paper recipe, offloaded, fits 40 GB."""
    plan = plan_run(llama70b, RunSettings(**PAPER, offload=True, solver={"recipe": "paper"}))
    device, host, disk = rows(plan.device), rows(plan.host), rows(plan.disk)
    assert plan.device_peak <= 40 * GB
    # One block of 856M parameters plus an embedding (262M) in bf16 on the device, not the model.
    assert device["weights: one block + embeddings or head + rest"] < 2.5 * GB
    assert "activation cache (one copy)" not in device
    # Host RAM: the whole model plus one activation copy (1024 x 2048 x 8192 bf16 = 34.4 GB).
    assert host["weights (offloaded model)"] == llama70b.weight_bytes >= 137.9 * GB
    assert host["activation cache (one copy)"] == 1024 * 2048 * 8192 * 2
    assert plan.host_ram >= llama70b.weight_bytes + 34 * GB
    # Disk: the pruned weights once (block shards) + the export's full weights, ~1 bit masks.
    assert disk["block shards (pruned weights, written once)"] == llama70b.targeted * 2
    assert disk["export: weights"] == llama70b.weight_bytes
    assert 280 * GB < plan.disk_needed < 300 * GB
    assert plan.disk_needed == plan.checkpoint_bytes + plan.export_bytes
    table = plan.table()
    for label in ("accelerator", "host RAM", "disk (output)", "**peak**", "**total**"):
        assert label in table


def test_llama2_7b_without_offload_holds_the_model_and_activations_on_the_device(llama7b):
    plan = plan_run(llama7b, RunSettings(**PAPER, solver={"recipe": "paper"}))
    device, host = rows(plan.device), rows(plan.host)
    assert device["weights: the whole model"] == llama7b.weight_bytes
    assert round(llama7b.weight_bytes / GB, 1) == 13.5
    assert device["activation cache (one copy)"] == 1024 * 2048 * 4096 * 2
    assert "weights (offloaded model)" not in host
    assert 30 * GB < plan.device_peak < 45 * GB
    # The default solver's ADMM state on top still fits an 80 GB accelerator.
    assert plan.device_peak < plan_run(llama7b, RunSettings(**PAPER)).device_peak < 80 * GB
    # offload_activations moves the cache to the host and nothing else.
    moved = plan_run(
        llama7b, RunSettings(**PAPER, offload_activations=True, solver={"recipe": "paper"})
    )
    assert moved.device_peak == plan.device_peak - device["activation cache (one copy)"]
    assert rows(moved.host)["activation cache (one copy)"] == device["activation cache (one copy)"]
    assert moved.disk_needed == plan.disk_needed


def test_fewer_layers_at_once_need_fewer_solver_buffers(llama7b):
    block = plan_run(llama7b, RunSettings(**PAPER))
    seq = plan_run(llama7b, RunSettings(**PAPER, sequential="true_sequential"))
    ddp = plan_run(llama7b, RunSettings(**PAPER, world_size=2))
    solver = "solver buffers (fp32)"
    assert rows(seq.device)[solver] < rows(block.device)[solver]
    assert rows(ddp.device)[solver] < rows(block.device)[solver]
    assert rows(ddp.device)["Gram matrices (fp32)"] == rows(block.device)["Gram matrices (fp32)"]


def test_dtype_the_run_asks_for_then_the_precision_wins():
    config = load_model_config(str(LLAMA2_7B))
    assert resolve_dtype(config) == torch.float16  # the config's torch_dtype
    assert resolve_dtype(config, "float32") == torch.float32
    assert resolve_dtype(config, "float32", "bf16-true") == torch.bfloat16
    assert resolve_dtype(config, "auto", "32-true") == torch.float16


def test_sibling_rule_is_the_fallback_and_over_merges_gpt2(monkeypatch):
    config = tiny_causal_lm("gpt2", num_layers=1).config
    good = model_shape(config, dtype=torch.float32)
    assert good.grouping == "forward" and len(good.blocks[0].groups) == 4
    monkeypatch.setattr(plan_mod.shapes, "_forward_leaders", lambda *a: None)
    fallback = model_shape(config, dtype=torch.float32)
    assert fallback.grouping == "siblings"
    # attn.c_attn and attn.c_proj are siblings of one width but read different tensors.
    merged = [[n.split(".", 3)[3] for n in g] for g in fallback.blocks[0].groups]
    assert ["attn.c_attn", "attn.c_proj"] in merged
    plan = plan_run(fallback, RunSettings(nsamples=4, seqlen=32))
    assert any("sibling rule" in note for note in plan.notes)


def test_plan_command_prints_the_figures_of_a_config(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(plan_mod, "free_bytes", lambda path: 10**15)
    args = [
        "--config",
        str(ROOT / "configs" / "llama2-7b.yaml"),
        f"--model.init_args.model_name_or_path={LLAMA2_7B}",
        f"--trainer.default_root_dir={tmp_path / 'out'}",
    ]
    assert plan_main(args) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM, 32 blocks" in out and "resident" in out
    assert "| accelerator | weights: the whole model | 13.5 |" in out
    assert "needed" in out
    monkeypatch.setattr(plan_mod, "free_bytes", lambda path: 10**9)
    assert plan_main(args) == 1
    assert "not enough disk space" in capsys.readouterr().out


def test_disk_check_walks_up_and_credits_a_resume(tmp_path, monkeypatch, llama7b):
    plan = plan_run(llama7b, RunSettings(**PAPER))
    root = tmp_path / "not" / "yet"
    assert existing_parent(root) == tmp_path
    seen: list[Path] = []

    def free(path):
        seen.append(Path(path))
        return plan.disk_needed - 100

    monkeypatch.setattr(plan_mod, "free_bytes", free)
    with pytest.raises(InsufficientDiskSpace):
        check_disk(plan, root)
    assert seen == [tmp_path]
    root.mkdir(parents=True)
    (root / "block_000.safetensors").write_bytes(b"x" * 100)  # written before the interruption
    check_disk(plan, root, resume=True)
    with pytest.raises(InsufficientDiskSpace):
        check_disk(plan, root)


def test_fit_refuses_a_too_small_disk_before_the_model_loads(tmp_path, monkeypatch, text_files):
    from prox24_lightning import cli
    from prox24_lightning.models import loading
    from prox24_lightning.pruner import BlockwisePruner

    model = save_tiny_model(tmp_path / "model", "llama", num_layers=2)
    out = tmp_path / "run"
    loaded: list[str] = []

    def never(*args, **kwargs):
        loaded.append("model")
        raise AssertionError("the model was loaded although the disk is too small")

    monkeypatch.setattr(BlockwisePruner, "configure_model", never)
    monkeypatch.setattr("prox24_lightning.pruner.load_causal_lm", never)
    monkeypatch.setattr(loading, "load_causal_lm", never)
    monkeypatch.setattr(plan_mod, "free_bytes", lambda path: 1234)

    with pytest.raises(InsufficientDiskSpace) as err:
        cli.cli_main(fit_args(model, out, text_files[0]))
    assert loaded == []
    # The numbers: what the checkpoints and export of this tiny model need, and what is free.
    expected = plan_run(
        model_shape(load_model_config(model), dtype=torch.float32),
        RunSettings(nsamples=4, seqlen=32, batch_size=2),
    )
    message = str(err.value)
    assert f"{expected.disk_needed:,} bytes" in message
    assert "(1,234 bytes) free" in message
    assert str(out) in message
    assert not (out / "export").exists() and not list(out.rglob("*.ckpt"))


def test_plan_counts_each_methods_own_buffers_and_prints_the_solver_cost(llama70b, llama7b):
    """The default prox solver's ADMM state (split, dual, ``Y``, eigenvectors, the fp64
    eigendecomposition's transient) joins the accelerator peak; the solver-cost table lists the
    run's method and the others with FLOPs, time and buffers, and the exact mask search's cost
    grows as ``m (n/2)^3`` (a 70B down_proj costs it orders of magnitude more than the default)."""
    paper = plan_run(llama70b, RunSettings(**PAPER, offload=True, solver={"recipe": "paper"}))
    default = plan_run(llama70b, RunSettings(**PAPER, offload=True))
    own = rows(default.device)["prox buffers"]
    assert "prox buffers" not in rows(paper.device)
    assert default.device_peak == paper.device_peak + own
    # The down_proj's eigendecomposition alone: 4 x 8 B x 28672^2.
    assert own > 4 * 8 * 28672**2
    labels = [row[0] for row in default.solver_cost]
    assert labels == ["prox (this run)", "alps (default)", "sparsegpt (default)", "wanda (default)"]
    table = default.table()
    assert "Solver cost (estimate" in table and "| alps (default) |" in table
    cost = {row[0]: row for row in default.solver_cost}
    # Same order of cost as ALPS (within 25%), far above SparseGPT and Wanda.
    assert 0.8 < cost["prox (this run)"][1] / cost["alps (default)"][1] < 1.25
    assert cost["sparsegpt (default)"][1] < cost["prox (this run)"][1] / 5
    search = plan_run(llama7b, RunSettings(**PAPER, solver={"recipe": "search"}))
    small = plan_run(llama7b, RunSettings(**PAPER))
    assert search.solver_cost[0][1] > 8 * small.solver_cost[0][1]
