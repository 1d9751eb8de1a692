"""``PrunableModel``: the causal LM being pruned, resident or offloaded, and its first inputs.

It owns the model's placement: resident (the whole model where the driver put it) or offloaded
(:class:`~prox24_lightning.models.OffloadedModel`: real tensors in a CPU store, one part at a
time on the compute device). Whichever it is, :meth:`PrunableModel.onloaded` makes one part
usable, :meth:`PrunableModel.materialized` the whole model (for export), and
:meth:`PrunableModel.first_inputs` / :meth:`PrunableModel.inputs_of_block` give the calibration
activations entering a block (captured by a pre-hook on the first block, then replayed through
the blocks before it: the pruned ones on a resume).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ..models import OffloadedModel, capture_block_inputs, find_blocks, run_block

__all__ = ["PrunableModel"]

BlockInputs = tuple[Tensor, dict[str, Any]]


class PrunableModel:
    """A loaded causal LM, its blocks, and (with ``offload``) its CPU store.

    Args:
        model: the model (requires no grad, in eval mode).
        offload: keep the weights in host memory and onload one part at a time.
    """

    def __init__(self, model: nn.Module, *, offload: bool) -> None:
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.offloaded: OffloadedModel | None = OffloadedModel(model, "cpu") if offload else None
        #: ``[(qualified name, block module)]`` in forward order.
        self.blocks: list[tuple[str, nn.Module]] = (
            self.offloaded.blocks if self.offloaded is not None else find_blocks(model)
        )

    def onloaded(
        self, part: str, device: torch.device | None = None, *, writeback: bool = False
    ) -> AbstractContextManager[Any]:
        """Offload mode: ``part`` on ``device`` (default: readable in the CPU store, which
        copies nothing) for a ``with`` block; ``writeback`` keeps its changes. Resident: no-op."""
        if self.offloaded is None:
            return nullcontext()
        target = self.offloaded.storage if device is None else device
        return self.offloaded.onload(part, target, writeback=writeback)

    def materialized(self) -> AbstractContextManager[Any]:
        """The whole model with real tensors (offload mode: on the CPU, no copy)."""
        return self.offloaded.materialized() if self.offloaded is not None else nullcontext()

    @torch.no_grad()
    def inputs_of_block(
        self,
        input_ids: Tensor,
        block: int,
        check: Callable[[Tensor], None] | None = None,
    ) -> BlockInputs:
        """One batch's inputs of ``block`` with the whole model resident: capture the first
        block's inputs (``check`` sees them) and run the blocks before ``block``."""
        hidden, kwargs = capture_block_inputs(self.model, input_ids)
        if check is not None:
            check(hidden)
        for j in range(block):
            hidden = run_block(self.blocks[j][1], hidden, kwargs)
        return hidden, kwargs

    @torch.no_grad()
    def stream_inputs_of_block(
        self,
        batches: Iterable[Tensor],
        block: int,
        device: torch.device,
        storage: torch.device,
        check: Callable[[Tensor], None] | None = None,
    ) -> list[BlockInputs]:
        """Offload mode: every batch's inputs of ``block`` (on ``storage``), each model part
        onloaded once (the embeddings for all batches, then each block before ``block``)."""
        assert self.offloaded is not None
        cache, _ = self.offloaded.stream_through_blocks(
            batches, device, num_blocks=block, cache_device=storage, check_embedded=check
        )
        return cache
