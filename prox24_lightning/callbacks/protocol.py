"""What the pruning callbacks use of a LightningModule, as a runtime-checkable protocol."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["BlockPruning"]


@runtime_checkable
class BlockPruning(Protocol):
    """What the pruning callbacks use of a module
    (:class:`~prox24_lightning.pruner.BlockwisePruner` has it)."""

    method: str
    tokenizer: Any
    #: called with ``(block index, {layer: PruneResult})`` when a block is done.
    block_pruned_listeners: list[Callable[[int, dict[str, Any]], None]]

    @property
    def report(self) -> dict[str, dict[str, Any]]: ...
    @property
    def masks(self) -> dict[str, Tensor]: ...
    @property
    def transposed(self) -> set[str]: ...
    @property
    def pruned_blocks(self) -> set[int]: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def is_complete(self) -> bool: ...
    def check_masks(self, masks: dict[str, Tensor], source: str) -> None: ...
    def full_model(self) -> AbstractContextManager[Any]: ...
