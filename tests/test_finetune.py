"""Finetuning with fixed 2:4 masks: the real CLI on tiny models (CPU, seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import callback, fit_args
from transformers import AutoModelForCausalLM

from prox24_lightning.artifacts import load_masks, load_masks_with_layout, save_masks, write_json
from prox24_lightning.check import check_export, check_weights
from prox24_lightning.cli import cli_main
from prox24_lightning.finetune import MaskedFinetuner, MaskMismatchError
from prox24_lightning.models import find_blocks, find_linear_layers, get_weight_matrix
from prox24_lightning.ops.masks import mask_2of4
from prox24_lightning.testing import offline_tokenizer, save_tiny_model, tiny_causal_lm

ROOT = Path(__file__).resolve().parent.parent
#: What the pruning run and the finetuning runs here add to ``fit_args``' settings.
COMMON = {
    "trainer.enable_checkpointing": "false",
    "data.nsamples": "8",
    "data.max_eval_windows": "4",
    "data.eval_batch_size": "4",
}


@pytest.fixture(scope="module")
def pruned_llama(tmp_path_factory, text_files) -> Path:
    """A real export: a tiny llama pruned by the CLI with Wanda (the fastest method)."""
    root = tmp_path_factory.mktemp("pruned")
    model_dir = save_tiny_model(root / "model", "llama", num_layers=2)
    train, held_out = text_files
    export = root / "export"
    callbacks = callback(
        "prox24_lightning.callbacks.ExportPruned", dirpath=export, print_table="false"
    )
    cli_main(
        fit_args(model_dir, root / "run", train, validation=held_out, callbacks=callbacks, **COMMON)
    )
    assert check_export(export).ok
    return export


def _finetune(
    source: Path,
    out: Path,
    text: tuple[Path, Path],
    *,
    enforce: bool = True,
    export: bool = True,
    lr: float = 1e-2,
    weight_decay: float = 0.1,
    export_args: tuple[str, ...] = (),
    **extra: str,
):
    callbacks = []
    if enforce:
        callbacks += callback("prox24_lightning.finetune.EnforceMask")
    if export:
        callbacks += [
            *callback(
                "prox24_lightning.finetune.ExportFinetuned",
                dirpath=out / "export",
                overwrite="true",
            ),
            *export_args,
        ]
    optimizer = {
        "class_path": "torch.optim.AdamW",
        "init_args": {"lr": lr, "weight_decay": weight_decay},
    }
    overrides = {
        **COMMON,
        "trainer.max_steps": "4",
        "trainer.precision": "bf16-mixed",
        "trainer.accumulate_grad_batches": "2",
        "trainer.gradient_clip_val": "1.0",
        "model": "prox24_lightning.finetune.MaskedFinetuner",
        "model.optimizer": json.dumps(optimizer),
        **extra,
    }
    train, held_out = text
    return cli_main(
        fit_args(
            source, out, train, method=None, validation=held_out, callbacks=callbacks, **overrides
        )
    )


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _kept_changed_fraction(source: Path, finetuned: Path) -> float:
    """Fraction of kept (mask == True) weights whose value changed."""
    masks, transposed = load_masks_with_layout(source / "masks.safetensors")
    a, b = _state(source), _state(finetuned)
    changed = total = 0
    for name, mask in masks.items():
        w0, w1 = a[f"{name}.weight"], b[f"{name}.weight"]
        if name in transposed:  # GPT-2 Conv1D stores [in, out]
            w0, w1 = w0.T, w1.T
        changed += int((w0 != w1)[mask].sum())
        total += int(mask.sum())
    return changed / total


def test_masks_survive_adamw_bf16_accumulation_clipping(tmp_path, pruned_llama, text_files):
    out = tmp_path / "ft"
    cli = _finetune(pruned_llama, out, text_files)
    assert cli.trainer.global_step == 4  # 8 batches, 2 accumulated per optimizer step
    export = out / "export"
    result = check_export(export)  # exact 2:4, agrees with the masks, no -0.0/NaN/Inf
    assert result.ok, result.verdict()
    assert result.layers == 14
    src_masks = load_masks(pruned_llama / "masks.safetensors")
    ft_masks = load_masks(export / "masks.safetensors")
    assert src_masks.keys() == ft_masks.keys()
    assert all(torch.equal(src_masks[k], ft_masks[k]) for k in src_masks)
    assert _kept_changed_fraction(pruned_llama, export) > 0.9
    report = json.loads((export / "sparsity_report.json").read_text())
    assert report["summary"]["all_2of4"] and report["method"] == "wanda+finetune"
    assert report["training"]["global_step"] == 4
    assert report["config"]["model"]["class_path"].endswith("MaskedFinetuner")
    assert all(v["relative_change"] > 0 for v in report["layers"].values())


def test_without_enforce_mask_the_pattern_is_lost(tmp_path, pruned_llama, text_files):
    with pytest.warns(UserWarning, match="without an EnforceMask"):
        cli = _finetune(pruned_llama, tmp_path / "ft", text_files, enforce=False, export=False)
    model: MaskedFinetuner = cli.model  # type: ignore[assignment]
    layers = find_linear_layers(model.lm)
    result = check_weights(lambda n: get_weight_matrix(layers[n]).detach(), model.masks)
    assert not result.ok
    assert sum("not 2:4" in p for p in result.problems) == len(model.masks)


def _synthetic_export(folder: Path, arch: str) -> Path:
    """A 2:4 export without running the pruner: magnitude masks, +0.0 zeros, saved masks."""
    model = tiny_causal_lm(arch, num_layers=1)
    masks, transposed = {}, set()
    with torch.no_grad():
        for block_name, block in find_blocks(model):
            for name, module in find_linear_layers(block, prefix=block_name).items():
                w = get_weight_matrix(module)
                mask = mask_2of4(w.abs())
                w.masked_fill_(~mask, 0.0)
                masks[name] = mask
                if type(module).__name__ == "Conv1D":
                    transposed.add(name)
    model.save_pretrained(folder)
    offline_tokenizer().save_pretrained(folder)
    save_masks(folder / "masks.safetensors", masks, transposed=transposed, method="magnitude")
    # The checker compares the report's pruned layers with the masks and weights.
    layers = {n: {"shape": list(m.shape), "is_2of4": True} for n, m in masks.items()}
    write_json(folder / "sparsity_report.json", {"method": "magnitude", "layers": layers})
    return folder


def test_conv1d_layout_and_masks_come_from_the_file(tmp_path, text_files):
    source = _synthetic_export(tmp_path / "gpt2", "gpt2")
    masks = load_masks(source / "masks.safetensors")
    # A kept weight that happens to be exactly zero must stay trainable: the masks come from
    # the file, not from W == 0.
    name = "transformer.h.0.mlp.c_fc"
    model = AutoModelForCausalLM.from_pretrained(source)
    w = model.get_submodule(name).weight  # Conv1D: [in, out]
    i, o = (masks[name].t() & (w != 0)).nonzero()[0].tolist()
    with torch.no_grad():
        w[i, o] = 0.0
    model.save_pretrained(source)
    assert check_export(source).ok
    out = tmp_path / "ft"
    _finetune(
        source,
        out,
        text_files,
        **{"trainer.precision": "32-true", "model.trainable": "masked_layers"},
    )
    export = out / "export"
    assert check_export(export).ok, check_export(export).verdict()
    before, after = _state(source), _state(export)
    assert after[f"{name}.weight"][i, o] != 0
    assert _kept_changed_fraction(source, export) > 0.9
    # trainable=masked_layers: embeddings and norms stay as they were
    assert torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    assert torch.equal(before["transformer.h.0.ln_1.weight"], after["transformer.h.0.ln_1.weight"])


def test_mask_mismatch_errors(tmp_path):
    source = _synthetic_export(tmp_path / "llama", "llama")
    layer = "model.layers.0.mlp.up_proj"

    other = save_tiny_model(tmp_path / "other", "llama", num_layers=1, intermediate_size=96)
    other_model = AutoModelForCausalLM.from_pretrained(other)
    other_masks = {
        n: mask_2of4(get_weight_matrix(m).abs())
        for n, m in find_linear_layers(other_model.model.layers[0], prefix="model.layers.0").items()
    }
    save_masks(tmp_path / "other.safetensors", other_masks)
    ft = MaskedFinetuner(str(source), masks_path=str(tmp_path / "other.safetensors"))
    with pytest.raises(MaskMismatchError, match=r"down_proj.*\(64, 96\).*\(64, 128\)"):
        ft.configure_model()

    masks = load_masks(source / "masks.safetensors")
    save_masks(
        tmp_path / "extra.safetensors",
        {**masks, "model.layers.7.mlp.up_proj": masks[layer]},
    )
    ft = MaskedFinetuner(str(source), masks_path=str(tmp_path / "extra.safetensors"))
    with pytest.raises(MaskMismatchError, match=r"layers\.7\.mlp\.up_proj.*no such layer"):
        ft.configure_model()

    # Same shapes, different masks (another pruning run): the weights disagree with the masks.
    shifted = {n: m.roll(1, dims=1) for n, m in masks.items()}
    save_masks(tmp_path / "shifted.safetensors", shifted)
    ft = MaskedFinetuner(str(source), masks_path=str(tmp_path / "shifted.safetensors"))
    with pytest.raises(MaskMismatchError, match="non-zeros outside the masks"):
        ft.configure_model()
    ft = MaskedFinetuner(
        str(source), masks_path=str(tmp_path / "shifted.safetensors"), mask_mismatch="apply"
    )
    ft.configure_model()
    w = get_weight_matrix(ft.lm.get_submodule(layer))
    assert not bool((w[~shifted[layer]] != 0).any())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_lora_merge_remasks_and_keeps_2of4(tmp_path, pruned_llama, text_files):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    cli = _finetune(
        pruned_llama,
        out,
        text_files,
        lr=5e-2,
        weight_decay=0.0,
        export_args=("--trainer.callbacks.save_adapter=true",),
        **{"model.lora": '{"r": 4, "alpha": 8}', "trainer.precision": "32-true"},
    )
    export = out / "export"
    assert check_export(export).ok, check_export(export).verdict()
    assert (export / "adapter" / "adapter_config.json").is_file()  # the unmerged adapter
    assert not list(out.glob(".export.adapter.*"))
    assert _kept_changed_fraction(pruned_llama, export) > 0.9
    report = json.loads((export / "sparsity_report.json").read_text())
    assert report["training"]["lora_remasked"]
    dropped = [v["lora_update_dropped_by_remask"] for v in report["layers"].values()]
    # A dense adapter update puts about half its mass on pruned entries; re-masking drops it.
    assert len(dropped) == 14 and all(0.2 < d < 0.9 for d in dropped)
    assert report["hparams"]["lora"]["r"] == 4
    assert not hasattr(cli.model.lm, "peft_config")  # merged in place: evaluation = export


def test_lora_without_peft_fails_clearly(tmp_path, monkeypatch):
    from prox24_lightning.finetune import LoraSettings

    source = _synthetic_export(tmp_path / "llama", "llama")
    monkeypatch.setitem(sys.modules, "peft", None)
    ft = MaskedFinetuner(str(source), lora=LoraSettings(r=2))
    with pytest.raises(ImportError, match=r"prox24_lightning\[peft\]"):
        ft.configure_model()


def test_held_out_perplexity_decreases(tmp_path, pruned_llama, text_files):
    cli = _finetune(
        pruned_llama,
        tmp_path / "ft",
        text_files,
        export=False,
        lr=3e-3,
        weight_decay=0.0,
        evaluate="both",
        **{
            "trainer.precision": "32-true",
            "trainer.max_steps": "16",
            "trainer.accumulate_grad_batches": "1",
            "model.scheduler": json.dumps(
                {
                    "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                    "init_args": {"T_max": 16},
                }
            ),
        },
    )
    # the schedule advanced once per optimizer step, down to eta_min = 0
    assert cli.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 16
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    before, after = (m["val/held_out_ppl"] for m in cli._metrics.values())
    assert len(cli._metrics) == 2
    assert after < 0.5 * before, (before, after)


def test_finetune_demo_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["fit", "--config", str(ROOT / "configs" / "finetune-demo.yaml"), "--print_config"]
        )
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith("MaskedFinetuner")
    assert printed["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.AdamW"
    names = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
    assert "EnforceMask" in names and "ExportFinetuned" in names
