"""``BlockInputCache``: the calibration activations entering the block being pruned.

One entry per calibration batch: the hidden states (in the model's dtype) and the block's
keyword inputs (attention mask, rotary embeddings, ...), as captured at block 0 by a pre-hook.
With pruned propagation each batch's output replaces its input in place
(:meth:`BlockInputCache.replace_batch`), so one copy of the activations is alive plus the batch
being computed; dense propagation needs the next block's inputs beside the current ones
(:meth:`BlockInputCache.put_next`) until :meth:`BlockInputCache.advance`. Activations live on
``storage`` and are fetched to the compute device batch by batch. The cache is derived state:
never checkpointed, a resumed run rebuilds it by replaying the pruned blocks.

**Pinned host buffers** (CPU storage, GPU compute, ``pin=True``): a batch's hidden states are
copied once, straight into a freshly allocated page-locked buffer, and both directions are
``non_blocking``. This is safe without explicit waits because the pipeline reads those buffers
only through copies to the device, which the current CUDA stream orders after the copy that
filled them, and because PyTorch's pinned-memory allocator records every non-blocking copy and
does not reuse a freed buffer until that copy is done. A reader on the host
(:meth:`BlockInputCache.items` without a device) waits for the stream first.
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

    def __init__(self, storage: torch.device | str, *, pin: bool = False) -> None:
        self.storage = torch.device(storage)
        #: page-locked host buffers (CPU storage, GPU compute): non-blocking copies.
        self.pin = pin and self.storage.type == "cpu" and torch.cuda.is_available()
        #: a non-blocking device-to-host copy may still be running (host reads must wait).
        self._copies_pending = False
        #: the block whose inputs :meth:`fetch` returns (-1: none yet).
        self.block = -1
        self._current: dict[int, BlockInputs] = {}
        self._next: dict[int, BlockInputs] = {}
        #: the most hidden-state bytes held at once (current + next), for tests and plans.
        self.peak_bytes = 0

    def _stored(self, hidden: Tensor, kwargs: dict[str, Any]) -> BlockInputs:
        if self.pin and not hidden.is_pinned():
            # One copy, straight into page-locked memory (not a pageable copy, then a pinned
            # one); asynchronous when it comes from the GPU (see the module docstring).
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            host.copy_(hidden, non_blocking=True)
            self._copies_pending |= hidden.is_cuda
            hidden = host
        else:
            hidden = hidden.to(self.storage)
        return hidden, block_kwargs_to(kwargs, self.storage)

    def _to(
        self, hidden: Tensor, kwargs: dict[str, Any], device: torch.device | str
    ) -> BlockInputs:
        """Inputs on ``device``; asynchronous from a pinned buffer (ordered on the stream)."""
        return hidden.to(device, non_blocking=self.pin), block_kwargs_to(kwargs, device)

    def nbytes(self) -> int:
        """Bytes of the hidden states held now (current and next block)."""
        held = [h for h, _ in self._current.values()] + [h for h, _ in self._next.values()]
        return sum(h.numel() * h.element_size() for h in held)

    def _track(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def has(self, block: int, batch: int) -> bool:
        """Whether batch ``batch``'s inputs of block ``block`` are cached."""
        return self.block == block and batch in self._current

    def fetch(self, batch: int, device: torch.device | str) -> BlockInputs:
        """Batch ``batch``'s inputs of the current block, on ``device``."""
        hidden, kwargs = self._current[batch]
        return self._to(hidden, kwargs, device)

    def put(self, block: int, batch: int, hidden: Tensor, kwargs: dict[str, Any]) -> None:
        """Cache batch ``batch``'s inputs of ``block`` (a fresh capture starts a new block)."""
        if self.block != block:
            self._current, self.block = {}, block
        self._current[batch] = self._stored(hidden, kwargs)
        self._track()

    def replace(self, block: int, inputs: list[BlockInputs]) -> None:
        """All inputs of ``block`` at once (already on :attr:`storage`), batch ``i`` at ``i``."""
        self._current, self.block = dict(enumerate(inputs)), block
        self._track()

    def put_next(self, batch: int, hidden: Tensor, kwargs: dict[str, Any]) -> None:
        """Cache batch ``batch``'s inputs of the next block (an output of the current one)."""
        self._next[batch] = self._stored(hidden, kwargs)
        self._track()

    def replace_batch(self, batch: int, hidden: Tensor) -> None:
        """Batch ``batch``'s output of the current block replaces its input (the input's last
        use): one copy of the activations stays alive. Call :meth:`advance` after all batches."""
        _, kwargs = self._current[batch]
        self._current[batch] = (None, kwargs)  # type: ignore[assignment]  # free first
        self._current[batch] = self._stored(hidden, kwargs)
        self._track()
        self._replaced = True

    def start_block(self) -> None:
        """Forget next-block inputs of an interrupted stage."""
        self._next = {}

    def items(
        self, block: int, device: torch.device | str | None = None
    ) -> Iterator[tuple[int, Tensor, dict[str, Any]]]:
        """``(batch, hidden, kwargs)`` of block ``block``, on ``device`` (copied as
        :meth:`fetch` does) or, without one, on :attr:`storage` once pending copies are done;
        refuses a cache that does not hold that block (a stage that skipped batches)."""
        if self.block != block or not self._current:
            raise RuntimeError(
                "no cached block inputs: propagation needs the whole epoch in one process "
                "(limit_train_batches and the like must not skip batches)"
            )
        if device is None and self._copies_pending:
            torch.cuda.current_stream().synchronize()  # the host reads the buffers itself
            self._copies_pending = False
        for i in list(self._current):
            hidden, kwargs = self._current[i]
            if device is not None:
                hidden, kwargs = self._to(hidden, kwargs, device)
            yield i, hidden, kwargs

    def advance(self) -> None:
        """The next block's inputs become current (already in place after
        :meth:`replace_batch`)."""
        if not getattr(self, "_replaced", False):
            self._current = self._next
        self._next, self._replaced = {}, False
        self.block += 1
