"""Perplexity evaluation shared by every LightningModule of the package.

The pruner and the finetuner score models with the same code, so ``prox24 validate`` numbers for
a dense, a pruned and a finetuned model are directly comparable.

A module whose model is offloaded (``offloaded`` returns an
:class:`~prox24_lightning.models.OffloadedModel`) cannot run the whole model per batch: only one
block fits on the accelerator. Its validation steps only queue the (CPU) token ids, and at the
end of the epoch :func:`blockwise_logits` runs the model the other way round: the embeddings over
every queued batch, then each block in turn over every batch (activations wait on the CPU), then
the final norm and LM head. Same operations, same order within each batch, so the same perplexity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .metrics import Perplexity
from .models import (
    HEAD,
    REST,
    OffloadedModel,
)

__all__ = ["PerplexityEvaluation", "blockwise_logits"]


class _FinalHidden(nn.Module):
    """Stands in for a block while the tail (final norm + LM head) runs on stored hidden states.

    Every stand-in returns :attr:`output`, the output of the last real block, so whatever the
    model computes in front of its blocks is discarded and the tail sees exactly the blockwise
    result. Attribute lookups the model's forward makes on its layers (``attention_type`` and the
    like) fall through to the replaced block.
    """

    def __init__(self, block: nn.Module, as_tuple: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)
        self.as_tuple = as_tuple
        self.output: Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor]:
        assert self.output is not None
        return (self.output,) if self.as_tuple else self.output

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@contextmanager
def _blocks_replaced(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], as_tuple: bool
) -> Iterator[list[_FinalHidden]]:
    """Swap every block for a :class:`_FinalHidden` inside its container, restoring on exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    stubs: list[_FinalHidden] = []
    try:
        for name, block in blocks:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            stub = _FinalHidden(block, as_tuple)
            parent._modules[child] = stub
            swapped.append((parent, child, block))
            stubs.append(stub)
        yield stubs
    finally:
        for parent, child, block in swapped:
            parent._modules[child] = block


@torch.no_grad()
def blockwise_logits(
    offload: OffloadedModel,
    batches: Sequence[Tensor],
    device: torch.device | str,
    consume: Callable[[int, Tensor], None],
    *,
    cache_device: torch.device | str = "cpu",
) -> None:
    """Run an offloaded causal LM over ``batches`` one part at a time and hand over the logits.

    1. embeddings (and whatever else sits in front of the first block): capture each batch's
       first-block inputs, kept on ``cache_device``;
    2. each block, onloaded once, over every batch in turn (streamed through ``device``);
    3. final norm + LM head: the model's own forward with every block replaced by the stored
       output of the last one (:class:`_FinalHidden`), fed zero ``inputs_embeds`` so the input
       embedding stays offloaded. ``consume(i, logits)`` gets batch ``i``'s logits on ``device``.

    At most one block, or the embeddings, or the tail is on ``device`` at any time.

    Args:
        offload: The model, offloaded.
        batches: ``[B, S]`` token ids per batch.
        device: Compute device.
        consume: Called once per batch, in order, with the ``[B, S, V]`` logits.
        cache_device: Where the activations wait between blocks.
    """
    model, blocks = offload.model, offload.blocks
    device = torch.device(device)
    cache, as_tuple = offload.stream_through_blocks(batches, device, cache_device=cache_device)
    embedding = model.get_input_embeddings()
    width = embedding.weight.shape[-1]
    dtype = embedding.weight.dtype
    with offload.onload([REST, HEAD], device), _blocks_replaced(model, blocks, as_tuple) as stubs:
        for i in range(len(cache)):
            hidden, _ = cache[i]
            cache[i] = (torch.empty(0), {})  # release the batch's activations as we go
            final = hidden.to(device)
            for stub in stubs:
                stub.output = final
            dummy = torch.zeros(*final.shape[:2], width, dtype=dtype, device=device)
            consume(i, model(inputs_embeds=dummy, use_cache=False).logits)


class PerplexityEvaluation:
    """Mixin for a LightningModule holding a causal LM in ``self.lm``.

    Logs ``val/<set>_ppl`` per validation loader, named by the DataModule's ``val_names``. When
    the module's ``offloaded`` attribute is an :class:`~prox24_lightning.models.OffloadedModel`,
    the model is scored block by block at the end of the epoch (see the module docstring).
    """

    lm: nn.Module | None
    _perplexity: nn.ModuleDict
    _eval_queue: list[tuple[str, Tensor]]

    def _metric(self, name: str) -> Perplexity:
        if name not in self._perplexity:
            self._perplexity[name] = Perplexity().to(self.device)  # type: ignore[attr-defined]
            # Lightning maps Metric objects to attribute names once, at the first self.log; a
            # metric created later (the second evaluation set) would not be found in that map.
            self._metric_attributes = None
        return self._perplexity[name]  # type: ignore[return-value]

    def _eval_name(self, dataloader_idx: int) -> str:
        dm = getattr(self.trainer, "datamodule", None)  # type: ignore[attr-defined]
        names = getattr(dm, "val_names", None)
        return names[dataloader_idx] if names else f"set{dataloader_idx}"

    def _offloaded_model(self) -> OffloadedModel | None:
        offload = getattr(self, "offloaded", None)
        return offload if isinstance(offload, OffloadedModel) else None

    def validation_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        assert self.lm is not None
        ids = batch["input_ids"]
        name = self._eval_name(dataloader_idx)
        if self._offloaded_model() is not None:
            self._eval_queue.append((name, ids.detach().cpu()))
            return
        logits = self.lm(input_ids=ids, use_cache=False).logits
        metric = self._metric(name)
        metric.update(logits, ids)
        self.log(f"val/{name}_ppl", metric, add_dataloader_idx=False, on_epoch=True)  # type: ignore[attr-defined]

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self.validation_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self._eval_queue = []

    def on_test_epoch_start(self) -> None:
        self._eval_queue = []

    def on_validation_epoch_end(self) -> None:
        self._score_queued()

    def on_test_epoch_end(self) -> None:
        self._score_queued()

    def _score_queued(self) -> None:
        """Score the queued batches of an offloaded model, block by block, and log per set."""
        offload = self._offloaded_model()
        queue, self._eval_queue = getattr(self, "_eval_queue", []), []
        if offload is None or not queue:
            return
        names = [name for name, _ in queue]

        def update(i: int, logits: Tensor) -> None:
            self._metric(names[i]).update(logits, queue[i][1].to(logits.device))

        blockwise_logits(offload, [ids for _, ids in queue], self.device, update)  # type: ignore[attr-defined]
        for name in dict.fromkeys(names):
            metric = self._metric(name)
            # compute() sums the states over all ranks (torchmetrics), so every rank logs the
            # same global value; reset for the next epoch as Lightning does for logged metrics.
            self.log(f"val/{name}_ppl", metric.compute(), add_dataloader_idx=False)  # type: ignore[attr-defined]
            metric.reset()
