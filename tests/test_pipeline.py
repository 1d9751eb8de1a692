"""End to end on tiny random models: the real CLI prunes, exports, reloads, validates, resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import PROX_SOLVER, callback, fit_args
from transformers import AutoModelForCausalLM

from prox24_lightning.artifacts import load_masks
from prox24_lightning.check import check_export
from prox24_lightning.cli import cli_main
from prox24_lightning.models import find_blocks, find_linear_layers, get_weight_matrix
from prox24_lightning.testing import save_tiny_model

#: What every run here adds to ``fit_args``: the prox schedule, 10 CG steps, 2 evaluation
#: windows, and no ``evaluate`` unless a call asks for one.
SETTINGS = {
    **PROX_SOLVER,
    "model.solver.refine_steps": "10",
    "data.max_eval_windows": "2",
    "evaluate": None,
}


def _args(
    model_dir: str, out: Path, text: tuple[Path, Path], method: str, **extra: str | None
) -> list[str]:
    """Mask files, Lightning's ``ModelCheckpoint`` (``last.ckpt`` after every block) and the
    export under ``out``."""
    train, held_out = text
    callbacks = [
        *callback("prox24_lightning.callbacks.MaskCheckpoint"),
        *callback(
            "lightning.pytorch.callbacks.ModelCheckpoint",
            dirpath=out / "ckpt",
            save_last="true",
            save_top_k="0",
            save_on_train_epoch_end="true",
        ),
        *callback(
            "prox24_lightning.callbacks.ExportPruned", dirpath=out / "export", overwrite="true"
        ),
    ]
    overrides = {**SETTINGS, **extra}
    return fit_args(
        model_dir, out, train, method=method, validation=held_out, callbacks=callbacks, **overrides
    )


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
    full, part = tmp_path / "full", tmp_path / "part"

    def fit(out: Path, **extra: str) -> None:
        cli_main(_args(model_dir, out, text_files, "prox", evaluate="none", **extra))

    fit(full)
    fit(part, **{"trainer.max_epochs": "2"})
    assert not (part / "export").exists() or not (part / "export" / "config.json").exists()
    fit(part, ckpt_path=str(part / "ckpt" / "last.ckpt"))
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
