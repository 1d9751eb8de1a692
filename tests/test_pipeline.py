"""End to end on tiny random models: the real CLI prunes, exports, reloads, validates, resumes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prox24_lightning.artifacts import check_export, load_masks
from prox24_lightning.cli import cli_main
from prox24_lightning.models.hf import find_blocks, find_linear_layers, get_weight_matrix
from prox24_lightning.testing import save_tiny_model

WORDS = (
    "the cat sat on a mat while dogs ran far away and birds sang in trees near the river bank "
    "under a bright sky people walked slowly home after work"
).split()


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    train, held_out = d / "train.txt", d / "eval.txt"
    train.write_text(" ".join(rng.choice(WORDS) for _ in range(6000)))
    held_out.write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    return train, held_out


def _args(
    model_dir: str, out: Path, text: tuple[Path, Path], method: str, **extra: str
) -> list[str]:
    train, held_out = text
    args = {
        "seed_everything": "0",
        "trainer.accelerator": "cpu",
        "trainer.devices": "1",
        "trainer.max_epochs": "-1",
        "trainer.logger": "false",
        "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
        "trainer.num_sanity_val_steps": "0",
        "trainer.check_val_every_n_epoch": "100000",
        "trainer.default_root_dir": str(out),
        "model": "prox24_lightning.pruner.BlockwisePruner",
        "model.model_name_or_path": model_dir,
        "model.method": method,
        "model.solver.beta": "1.3",
        "model.solver.lambda0": "0.05",
        "model.solver.momentum": "0.9",
        "model.solver.refine": "cg",
        "model.solver.refine_steps": "10",
        "data.calibration": f'{{"name": "text", "path": "{train}"}}',
        "data.calibration_mode": "packed",
        "data.nsamples": "4",
        "data.seqlen": "32",
        "data.batch_size": "2",
        "data.validation": f'{{"held_out": {{"name": "text", "path": "{held_out}"}}}}',
        "data.max_eval_windows": "2",
        "data.cache_dir": str(out / "cache"),
    }
    args.update(extra)
    callbacks = [
        "--trainer.callbacks+=prox24_lightning.callbacks.MaskCheckpoint",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={out / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
        "--trainer.callbacks.save_on_train_epoch_end=true",
        "--trainer.callbacks+=prox24_lightning.callbacks.ExportPruned",
        f"--trainer.callbacks.dirpath={out / 'export'}",
        "--trainer.callbacks.overwrite=true",
    ]
    return ["fit", *[f"--{k}={v}" for k, v in args.items()], *callbacks]


def _assert_2of4_model(export: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(export)
    masks = load_masks(export / "masks.safetensors")
    n = 0
    for name, block in find_blocks(model):
        for lname, module in find_linear_layers(block, prefix=name).items():
            w = get_weight_matrix(module)
            assert bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()), lname
            assert torch.equal(w != 0, masks[lname] & (w != 0))
            assert not bool(torch.signbit(w[w == 0]).any())
            n += 1
    assert n == len(masks) and n > 0


@pytest.mark.parametrize(
    "arch,method",
    [
        ("llama", "prox"),
        ("qwen2", "wanda"),
        ("mistral", "sparsegpt"),
        ("opt", "prox"),
        ("gpt2", "wanda"),
    ],
)
def test_fit_export_reload_validate(tmp_path, text_files, arch, method):
    model_dir = save_tiny_model(tmp_path / "model", arch, num_layers=2)
    out = tmp_path / "run"
    cli = cli_main(_args(model_dir, out, text_files, method, evaluate="both"))
    export = out / "export"
    assert check_export(export).ok
    _assert_2of4_model(export)
    report = (export / "sparsity_report.json").read_text()
    assert '"all_2of4": true' in report and '"perplexity"' in report
    assert set(cli._metrics) == {"dense", "pruned"}
    # validate the export with the same code that scored the dense model
    val = cli_main(
        [
            "validate",
            *[
                a
                for a in _args(str(export), tmp_path / "val", text_files, method)[1:]
                if "callbacks" not in a
            ],
        ]
    )
    ppl = val.trainer.callback_metrics["val/held_out_ppl"]
    assert (
        torch.isfinite(ppl) and abs(float(ppl) - cli._metrics["pruned"]["val/held_out_ppl"]) < 1e-3
    )


def test_resume_after_block_1_of_3_is_identical(tmp_path, text_files):
    model_dir = save_tiny_model(tmp_path / "model", "llama", num_layers=3)
    full = tmp_path / "full"
    cli_main(_args(model_dir, full, text_files, "prox", evaluate="none"))
    part = tmp_path / "part"
    cli_main(
        _args(model_dir, part, text_files, "prox", evaluate="none", **{"trainer.max_epochs": "2"})
    )
    assert not (part / "export").exists() or not (part / "export" / "config.json").exists()
    cli_main(
        _args(
            model_dir,
            part,
            text_files,
            "prox",
            evaluate="none",
            ckpt_path=str(part / "ckpt" / "last.ckpt"),
        )
    )
    m_full = load_masks(full / "export" / "masks.safetensors")
    m_part = load_masks(part / "export" / "masks.safetensors")
    assert m_full.keys() == m_part.keys() and len(m_full) == 21
    for k in m_full:
        assert torch.equal(m_full[k], m_part[k]), k
    a = AutoModelForCausalLM.from_pretrained(full / "export").state_dict()
    b = AutoModelForCausalLM.from_pretrained(part / "export").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    per_block = sorted(p.name for p in (part / "masks").glob("block_*.safetensors"))
    assert per_block == ["block_000.safetensors", "block_001.safetensors", "block_002.safetensors"]
