"""Offload mode (``model.offload: true``): one block on the compute device at a time, same results.

How device memory is counted on a CPU-only machine, where compute and storage are both "cpu":
offloaded parameters and buffers are ``meta`` tensors inside the module tree (their real data is
in the :class:`~prox24_lightning.models.OffloadedModel` CPU store), so the bytes *resident on
the compute device* are the bytes of the model's non-meta parameters and buffers
(:func:`~prox24_lightning.models.resident_bytes`, tied storages counted once). Activations,
Gram matrices and solver state are not parameters or buffers and are not counted. The meter below
samples that number at every block forward (calibration, propagation, input capture, evaluation),
at every LM-head forward, at every calibration batch and at every solver step (Lightning's
``on_before_optimizer_step`` runs inside each ``opt.step``). Export writes the whole model from the
CPU store after fit and is outside the measured steps.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import PROX_SOLVER, block_checkpoints, fit_args
from safetensors.torch import load_file
from torch import nn

from prox24_lightning.artifacts import load_masks
from prox24_lightning.check import check_export
from prox24_lightning.cli import cli_main
from prox24_lightning.evaluation import blockwise_logits
from prox24_lightning.models import (
    EMBED,
    HEAD,
    REST,
    OffloadedModel,
    find_blocks,
    resident_bytes,
)
from prox24_lightning.testing import save_tiny_model, tiny_causal_lm

#: What every run here adds to ``fit_args``: the prox schedule, 5 CG steps, 4 evaluation windows.
SETTINGS = {**PROX_SOLVER, "model.solver.refine_steps": "5", "data.max_eval_windows": "4"}


def part_bytes(offload: OffloadedModel, part: str) -> int:
    """Bytes of the store tensors of one part (tied tensors counted once)."""
    return sum(offload.store[k].nbytes for k in offload.parts[part])


def _args(model: str, out: Path, text: tuple[Path, Path], method: str, **extra: str) -> list[str]:
    train, held_out = text
    callbacks = block_checkpoints(out)
    overrides = {**SETTINGS, **extra}
    return fit_args(
        model, out, train, method=method, validation=held_out, callbacks=callbacks, **overrides
    )


def _assert_same_export(a: Path, b: Path, n_layers: int) -> None:
    """Masks equal and exported weights bit-identical."""
    ma, mb = load_masks(a / "masks.safetensors"), load_masks(b / "masks.safetensors")
    assert ma.keys() == mb.keys() and len(ma) == n_layers
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ---------------------------------------------------------------------------- OffloadedModel
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_blockwise_logits_equal_the_full_forward(arch):
    """Embeddings, then each block over all batches, then norm + head chunk by chunk: the
    model's next-token logits (positions ``[:, :-1]``, row-major) and their targets."""
    lm = tiny_causal_lm(arch, num_layers=3)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, 400, (2, 24), generator=g) for _ in range(3)]
    with torch.no_grad():
        expected = [lm(input_ids=ids, use_cache=False).logits for ids in batches]
    offload = OffloadedModel(lm)
    assert resident_bytes(lm) == 0  # everything is a meta placeholder now
    got: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    blockwise_logits(
        offload,
        batches,
        "cpu",
        lambda i, logits, targets: got.setdefault(i, []).append((logits, targets)),
        chunk_tokens=10,
    )
    assert sorted(got) == [0, 1, 2]
    for i, ref in enumerate(expected):
        assert [len(t) for _, t in got[i]] == [10, 10, 10, 10, 6]  # 2 x 23 positions
        logits = torch.cat([lg for lg, _ in got[i]])
        targets = torch.cat([t for _, t in got[i]])
        torch.testing.assert_close(
            logits, ref[:, :-1].reshape(-1, ref.shape[-1]), rtol=1e-5, atol=1e-5
        )
        assert torch.equal(targets, batches[i][:, 1:].reshape(-1))
    assert resident_bytes(lm) == 0
    with offload.materialized():
        with torch.no_grad():
            again = lm(input_ids=batches[0], use_cache=False).logits
    assert torch.equal(again, expected[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stream_through_blocks_gives_each_blocks_inputs(arch):
    """``num_blocks=k``: the hidden states entering block k, as the model's own forward has them
    (``output_hidden_states[k]``); the embedding check sees every batch once."""
    lm = tiny_causal_lm(arch, num_layers=3)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(4, 400, (2, 16), generator=g) for _ in range(2)]
    with torch.no_grad():
        expected = [lm(input_ids=ids, output_hidden_states=True).hidden_states for ids in batches]
    offload = OffloadedModel(lm)
    for k in range(3):
        seen: list[torch.Tensor] = []
        cache, _ = offload.stream_through_blocks(
            iter(batches), "cpu", num_blocks=k, check_embedded=seen.append
        )
        assert len(cache) == len(seen) == len(batches)
        for i, (hidden, kwargs) in enumerate(cache):
            torch.testing.assert_close(hidden, expected[i][k], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(seen[i], expected[i][0], rtol=1e-5, atol=1e-5)
            assert isinstance(kwargs, dict)
        assert resident_bytes(lm) == 0


def test_onload_parts_refcounts_and_writeback():
    lm = tiny_causal_lm("gpt2", num_layers=2)  # tied wte / lm_head
    total = resident_bytes(lm)
    offload = OffloadedModel(lm)
    (b0, block0), _ = find_blocks(lm)
    tied = offload.key("lm_head.weight")
    assert tied == offload.key("transformer.wte.weight")
    assert tied in offload.parts[EMBED] and tied in offload.parts[HEAD]
    assert sum(part_bytes(offload, p) for p in offload.parts) - part_bytes(offload, HEAD) == total
    with offload.onload(b0, "cpu"):
        assert resident_bytes(lm) == part_bytes(offload, b0)
        with offload.onload([b0, EMBED], "cpu"):  # nested: shared, not duplicated
            assert resident_bytes(lm) == part_bytes(offload, b0) + part_bytes(offload, EMBED)
        assert resident_bytes(lm) == part_bytes(offload, b0)
        assert lm.lm_head.weight.device.type == "meta"
    assert resident_bytes(lm) == 0
    with offload.onload([HEAD, REST], "cpu"):
        assert lm.transformer.wte.weight is lm.lm_head.weight  # still tied
    # Writeback: on an accelerator the onloaded tensor is a copy of the store entry. Simulate the
    # copy by swapping the parameter's data for new memory and check what reaches the store.
    key = offload.key(f"{b0}.attn.c_attn.weight")
    before = offload.store[key].clone()
    for writeback in (False, True):
        with offload.onload(b0, "cpu", writeback=writeback):
            block0.attn.c_attn.weight.data = torch.full_like(before, 7.0)
        assert torch.equal(
            offload.store[key], torch.full_like(before, 7.0) if writeback else before
        )
    with pytest.raises(RuntimeError), offload.onload(b0, "cpu", writeback=True):
        block0.attn.c_attn.weight.data = torch.zeros_like(before)
        raise RuntimeError("a failed stage does not write back")
    assert torch.equal(offload.store[key], torch.full_like(before, 7.0))
    with pytest.raises(KeyError, match="not a parameter or buffer"):
        offload.key("nope.weight")


# ------------------------------------------------------------------------ resident memory meter
class ResidentMeter(L.Callback):
    """Samples :func:`resident_bytes` of the pruner's model at every block / head forward,
    calibration batch and solver step (see the module docstring)."""

    def __init__(self) -> None:
        self.samples: list[tuple[str, int]] = []
        self._hooked: set[int] = set()

    def _hook(self, pl_module: Any) -> None:
        lm = pl_module.lm
        if lm is None or id(lm) in self._hooked:
            return
        self._hooked.add(id(lm))

        def sample(what: str):
            def pre_hook(module: nn.Module, args: Any) -> None:
                self.samples.append((what, resident_bytes(lm)))

            return pre_hook

        for name, block in find_blocks(lm):
            block.register_forward_pre_hook(sample(name))
        lm.get_output_embeddings().register_forward_pre_hook(sample("lm_head"))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._hook(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._hook(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.samples.append(("batch", resident_bytes(pl_module.lm)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.samples.append(("solver", resident_bytes(pl_module.lm)))

    @property
    def peak(self) -> int:
        return max(b for _, b in self.samples)


WIDE = dict(hidden_size=64, intermediate_size=256)  # blocks (245 kB) outweigh the embedding


def _metered_fit(tmp_path: Path, text, num_layers: int, offload: bool):
    model = save_tiny_model(tmp_path / f"m{num_layers}", "llama", num_layers=num_layers, **WIDE)
    meter = ResidentMeter()
    out = tmp_path / f"run{num_layers}-{offload}"
    extra = {"model.offload": str(offload).lower(), "evaluate": "both"}
    cli = cli_main(
        _args(model, out, text, "wanda", **extra), trainer_defaults={"callbacks": [meter]}
    )
    return cli, meter


def test_device_resident_bytes_are_one_block_and_do_not_grow_with_depth(tmp_path, text_files):
    peaks: dict[int, int] = {}
    for n in (2, 8):
        cli, meter = _metered_fit(tmp_path, text_files, n, offload=True)
        offload = cli.model.offloaded
        assert isinstance(offload, OffloadedModel)
        kinds = {what for what, _ in meter.samples}
        # every phase was measured: each block, the head (evaluation), batches and solver steps
        assert {name for name, _ in offload.blocks} | {"lm_head", "batch", "solver"} <= kinds
        block = max(part_bytes(offload, name) for name, _ in offload.blocks)
        embed, head, rest = (part_bytes(offload, p) for p in (EMBED, HEAD, REST))
        # The tight claim: one block, or the embeddings (+ rest), or the head (+ rest).
        assert meter.peak <= max(block, embed + rest, head + rest)
        # The brief's bound: one block plus embeddings and head, plus small things.
        assert meter.peak <= block + embed + head + rest
        with offload.materialized():
            total = resident_bytes(cli.model.lm)
        assert meter.peak <= total - (n - 1) * block  # never more than one block's worth
        # calibration and solving see exactly block k, nothing else
        assert all(b == block for what, b in meter.samples if what in ("batch", "solver"))
        peaks[n] = meter.peak
        assert check_export(Path(cli.trainer.default_root_dir) / "export").ok
    assert peaks[8] <= 1.25 * peaks[2]

    # Without offload the whole model is resident at every sample: the meter can tell the two.
    cli, meter = _metered_fit(tmp_path, text_files, 2, offload=False)
    whole = resident_bytes(cli.model.lm)
    assert whole > 2 * peaks[2]
    assert {b for _, b in meter.samples} == {whole}


class SolveWatcher(L.Callback):
    """At every solver step: the raw Grams still held by the block's collector, and the layer
    solves alive (instances of the spied ``LayerSolve``) next to the optimizer's layer groups."""

    def __init__(self, live: weakref.WeakSet) -> None:
        self.live = live
        self.steps: list[tuple[int, int, int, int]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        gc.collect()  # count what is still referenced, not what awaits the cycle collector
        collector = pl_module._stage.collector if pl_module._stage is not None else None
        groups = len(optimizer.param_groups) - 1  # minus the idle group
        grams = len(collector.grams) if collector is not None else 0
        self.steps.append((trainer.current_epoch, grams, len(self.live), groups))


def test_grams_and_solves_are_released_as_layers_finish(tmp_path, text_files, monkeypatch):
    import prox24_lightning.pipeline.stage as stage_mod

    live: weakref.WeakSet = weakref.WeakSet()

    class Spy(stage_mod.LayerSolve):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            live.add(self)

    monkeypatch.setattr(stage_mod, "LayerSolve", Spy)
    model = save_tiny_model(tmp_path / "model", "llama", num_layers=2)
    watcher = SolveWatcher(live)
    extra = {"model.offload": "true", "model.solver.refine_steps": "0"}
    cli_main(
        _args(model, tmp_path / "run", text_files, "prox", **extra),
        trainer_defaults={"callbacks": [watcher]},
    )
    for block in (0, 1):
        steps = [s for s in watcher.steps if s[0] == block]
        # The raw Grams are gone once the solves hold their normalised copies.
        assert all(grams == 0 for _, grams, _, _ in steps)
        # Solves are dropped (optimizer group and all) as their layer finishes, not at the end.
        alive = [n for _, _, n, _ in steps]
        assert all(n == groups for _, _, n, groups in steps), [s for s in steps if s[2] != s[3]]
        assert alive[0] == 7 and alive[-1] < 7 and alive == sorted(alive, reverse=True)
    assert len(live) == 0


# -------------------------------------------------------------------- equal to the normal mode
@pytest.mark.parametrize(("arch", "method"), [("llama", "prox"), ("gpt2", "wanda")])
def test_offload_fit_export_and_perplexity_equal_the_normal_run(tmp_path, text_files, arch, method):
    model = save_tiny_model(tmp_path / "model", arch, num_layers=2)
    runs = {}
    for offload in ("false", "true"):
        out = tmp_path / offload
        cli = cli_main(
            _args(model, out, text_files, method, evaluate="both", **{"model.offload": offload})
        )
        assert check_export(out / "export").ok
        assert sorted(p.name for p in (out / "masks").glob("*.safetensors")) == [
            "block_000.safetensors",
            "block_001.safetensors",
        ]
        runs[offload] = cli
    assert runs["true"].model.offloaded is not None and runs["false"].model.offloaded is None
    _assert_same_export(
        tmp_path / "false" / "export", tmp_path / "true" / "export", 14 if arch == "llama" else 8
    )
    for label in ("dense", "pruned"):
        a = runs["false"]._metrics[label]["val/held_out_ppl"]
        b = runs["true"]._metrics[label]["val/held_out_ppl"]
        assert abs(a - b) <= 1e-4 * a, (label, a, b)
    assert runs["false"]._metrics["dense"] != runs["false"]._metrics["pruned"]


def test_offload_resume_is_identical_in_either_direction(tmp_path, text_files):
    """Stopped after 2 of 3 blocks, resumed with ``--ckpt_path``: offload -> offload, no offload
    -> offload and offload -> no offload all give the uninterrupted run's masks and weights."""
    model = save_tiny_model(tmp_path / "model", "llama", num_layers=3, hidden_size=32,
                            intermediate_size=64)  # fmt: skip
    ref = tmp_path / "ref"

    def fit(out: Path, **extra: str) -> None:
        cli_main(_args(model, out, text_files, "prox", **extra))

    fit(ref)
    for first, second in (("true", "true"), ("false", "true"), ("true", "false")):
        out = tmp_path / f"{first}-{second}"
        fit(out, **{"model.offload": first, "trainer.max_epochs": "2"})
        assert not (out / "export").exists()
        state = torch.load(out / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
        assert state["prox24"]["pruned_blocks"] == [0, 1]
        # Either mode: the model is not in the checkpoint; each block's weights are in its shard.
        assert not any(k.startswith("lm.") for k in state["state_dict"])
        assert sorted(state["prox24"]["shards"]) == ["0", "1"]
        assert sorted(p.name for p in (out / "blocks").iterdir()) == [
            "block_000.safetensors",
            "block_001.safetensors",
        ]
        fit(out, ckpt_path=str(out / "ckpt" / "last.ckpt"), **{"model.offload": second})
        _assert_same_export(ref / "export", out / "export", 21)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_onload_holds_one_part_and_writes_back():
    """On a real accelerator the onloaded tensors are copies: they are released on exit, only
    the onloaded part is on the device, and writeback carries in-place changes to the store."""
    lm = tiny_causal_lm("llama", num_layers=4, hidden_size=64, intermediate_size=256)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, 400, (2, 24), generator=g) for _ in range(2)]
    with torch.no_grad():
        expected = [lm(input_ids=ids, use_cache=False).logits for ids in batches]
    offload = OffloadedModel(lm)
    base = torch.cuda.memory_allocated()
    got: dict[int, list[torch.Tensor]] = {}
    blockwise_logits(
        offload, batches, "cuda", lambda i, x, t: got.setdefault(i, []).append(x.float().cpu())
    )
    for i, ref in enumerate(expected):
        logits = torch.cat(got[i])  # the chunks of positions [:, :-1], row-major
        torch.testing.assert_close(
            logits, ref[:, :-1].reshape(-1, ref.shape[-1]), rtol=1e-4, atol=1e-4
        )
    assert resident_bytes(lm) == 0 and torch.cuda.memory_allocated() == base
    name, block = offload.blocks[0]
    key = offload.key(f"{name}.mlp.down_proj.weight")
    before = offload.store[key].clone()
    for writeback in (False, True):
        with offload.onload(name, "cuda", writeback=writeback):
            assert resident_bytes(lm, "cuda") == part_bytes(offload, name) == resident_bytes(lm)
            block.mlp.down_proj.weight.mul_(0)  # in place, on the device copy
        assert torch.equal(offload.store[key], torch.zeros_like(before) if writeback else before)
    assert torch.cuda.memory_allocated() == base
