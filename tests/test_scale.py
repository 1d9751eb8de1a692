"""Scale: checkpoints hold the run's state, not the model; cached activations are one copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import PROX_SOLVER, fit_args
from safetensors.torch import load_file

from prox24_lightning.artifacts import load_masks
from prox24_lightning.cli import cli_main
from prox24_lightning.testing import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {**PROX_SOLVER, "model.solver.refine_steps": "5", "evaluate": "none"}


def _run(model: str, out: Path, text: Path, offload: str, **extra: str) -> None:
    cli_main(
        fit_args(model, out, text, method="prox", **SETTINGS, **{"model.offload": offload}, **extra)
    )


@pytest.mark.parametrize("offload", ["false", "true"])
def test_checkpoint_stays_small_and_resume_is_identical(tmp_path, text_files, offload):
    """Tiny 8-block Llama: ``last.ckpt`` after 8 blocks is at most 1.25x its size after 2 and at
    most 0.25x the model's weight bytes; resumed from the 2-block checkpoint, the run ends with
    the uninterrupted run's masks and weights."""
    model = save_tiny_model(tmp_path / "model", "llama", num_layers=8)
    weight_bytes = sum(
        t.numel() * t.element_size() for t in load_file(f"{model}/model.safetensors").values()
    )
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(model, ref, text_files[0], offload)
    _run(model, run, text_files[0], offload, **{"trainer.max_epochs": "2"})
    ckpt = run / "checkpoints" / "last.ckpt"
    after_2 = ckpt.stat().st_size
    kept = tmp_path / "after_2.ckpt"
    shutil.copy(ckpt, kept)
    _run(model, run, text_files[0], offload, ckpt_path="last")
    after_8 = ckpt.stat().st_size
    assert after_8 <= 1.25 * after_2, (after_2, after_8)
    assert after_8 <= 0.25 * weight_bytes, (after_8, weight_bytes)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["prox24"]["pruned_blocks"] == list(range(8))
    assert not any(k.startswith("lm.") for k in state["state_dict"])

    def same(a: Path, b: Path) -> None:
        ma, mb = load_masks(a / "masks.safetensors"), load_masks(b / "masks.safetensors")
        assert ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in ma)
        wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)

    same(ref / "export", run / "export")
    # Resumed from the kept 2-block checkpoint (the shards of blocks 0-1 are the same files).
    again = tmp_path / "again"
    shutil.copytree(run, again, ignore=shutil.ignore_patterns("export", "checkpoints"))
    for k in range(2, 8):
        (again / "blocks" / f"block_{k:03d}.safetensors").unlink()
    (again / "checkpoints").mkdir()
    shutil.copy(kept, again / "checkpoints" / "last.ckpt")
    _run(model, again, text_files[0], offload, ckpt_path="last")
    same(ref / "export", again / "export")


class _CachePeak(L.Callback):
    """The activation cache's hidden-state bytes: the peak over the run and the dtype seen."""

    def __init__(self) -> None:
        self.peak, self.dtypes = 0, set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        cache = pl_module._cache
        self.peak = max(self.peak, cache.peak_bytes)
        self.dtypes |= (
            {h.dtype for _, h, _ in cache.items(cache.block)} if cache.block >= 0 else set()
        )


@pytest.mark.parametrize("offload", ["false", "true"])
def test_cached_activations_are_one_copy_in_the_model_dtype(tmp_path, text_files, offload):
    """Host memory for cached activations is at most one copy in the model's dtype plus one
    batch: each batch's output replaces its input (pruned propagation), with and without offload."""
    model = save_tiny_model(tmp_path / "model", "llama", num_layers=3, hidden_size=32)
    peak = _CachePeak()
    args = fit_args(
        model,
        tmp_path / "run",
        text_files[0],
        method="wanda",
        **{
            "model.dtype": "bfloat16",
            "model.offload": offload,
            "model.offload_activations": "true",
        },
        **{"data.nsamples": "8", "data.seqlen": "32", "data.batch_size": "2", "evaluate": "none"},
    )
    cli = cli_main(args, trainer_defaults={"callbacks": [peak]})
    assert cli.model.is_complete
    one_copy, one_batch = 8 * 32 * 32 * 2, 2 * 32 * 32 * 2  # bf16: 2 bytes
    assert peak.dtypes == {torch.bfloat16}
    assert one_copy <= cli.model._cache.peak_bytes <= one_copy + one_batch
