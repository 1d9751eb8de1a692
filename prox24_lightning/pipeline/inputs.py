"""``BlockInputCache``: the calibration activations entering the block being pruned.

One entry per calibration batch: the hidden states and the block's keyword inputs (attention
mask, rotary embeddings, ...), as captured at block 0 by a pre-hook. The next block's inputs are
filled while the current block propagates, then :meth:`BlockInputCache.advance` makes them
current. Activations live on ``storage`` (the CPU when offloading) and are fetched to the compute
device batch by batch. The cache is derived state: it is never checkpointed, a resumed run
rebuilds it by replaying the pruned blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..models import block_kwargs_to

__all__ = ["BlockInputCache"]

BlockInputs = tuple[Tensor, dict[str, Any]]


class BlockInputCache:
    """Inputs of block :attr:`block` per calibration batch, and the next block's being filled.

    Args:
        storage: where cached activations wait between uses (the compute device, or the CPU).
    """

    def __init__(self, storage: torch.device | str) -> None:
        self.storage = torch.device(storage)
        #: the block whose inputs :meth:`fetch` returns (-1: none yet).
        self.block = -1
        self._current: dict[int, BlockInputs] = {}
        self._next: dict[int, BlockInputs] = {}

    def _stored(self, hidden: Tensor, kwargs: dict[str, Any]) -> BlockInputs:
        return hidden.to(self.storage), block_kwargs_to(kwargs, self.storage)

    def has(self, block: int, batch: int) -> bool:
        """Whether batch ``batch``'s inputs of block ``block`` are cached."""
        return self.block == block and batch in self._current

    def fetch(self, batch: int, device: torch.device | str) -> BlockInputs:
        """Batch ``batch``'s inputs of the current block, on ``device``."""
        hidden, kwargs = self._current[batch]
        return hidden.to(device), block_kwargs_to(kwargs, device)

    def put(self, block: int, batch: int, hidden: Tensor, kwargs: dict[str, Any]) -> None:
        """Cache batch ``batch``'s inputs of ``block`` (a fresh capture starts a new block)."""
        if self.block != block:
            self._current, self.block = {}, block
        self._current[batch] = self._stored(hidden, kwargs)

    def replace(self, block: int, inputs: list[BlockInputs]) -> None:
        """All inputs of ``block`` at once (already on :attr:`storage`), batch ``i`` at ``i``."""
        self._current, self.block = dict(enumerate(inputs)), block

    def put_next(self, batch: int, hidden: Tensor, kwargs: dict[str, Any]) -> None:
        """Cache batch ``batch``'s inputs of the next block (an output of the current one)."""
        self._next[batch] = self._stored(hidden, kwargs)

    def start_block(self) -> None:
        """Forget next-block inputs of an interrupted stage."""
        self._next = {}

    def items(self, block: int) -> Iterator[tuple[int, Tensor, dict[str, Any]]]:
        """``(batch, hidden, kwargs)`` of block ``block`` on :attr:`storage`; refuses a cache
        that does not hold that block (a stage that skipped batches)."""
        if self.block != block or not self._current:
            raise RuntimeError(
                "no cached block inputs: propagation needs the whole epoch in one process "
                "(limit_train_batches and the like must not skip batches)"
            )
        for i, (hidden, kwargs) in self._current.items():
            yield i, hidden, kwargs

    def advance(self) -> None:
        """The next block's inputs become current."""
        self._current, self._next = self._next, {}
        self.block += 1
