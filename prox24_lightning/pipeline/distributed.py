"""Collectives of the pipeline in plain ``torch.distributed`` (no Lightning).

The layer solves of a block are independent, so they are spread over the ranks
(:func:`assign_layers`); each solved weight and mask is then broadcast from the rank that owns it
(:func:`broadcast_`, raw bytes, so bit-exact), and all ranks hold the same model. Sums of the
calibration statistics go through a :class:`Collective` (the Lightning strategy, adapted by the
pruner), so the pipeline itself never touches a trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "Collective",
    "SingleProcess",
    "all_gather_objects",
    "assign_layers",
    "broadcast_",
    "is_distributed",
]


class Collective(Protocol):
    """What the pipeline needs of a process group: its size, this rank and reductions."""

    world_size: int
    rank: int

    def reduce(self, tensor: Tensor, op: str) -> Tensor:
        """The ``op`` (``"sum"`` or ``"max"``) of ``tensor`` over all ranks."""
        ...


class SingleProcess:
    """The :class:`Collective` of a run without a process group."""

    world_size = 1
    rank = 0

    def reduce(self, tensor: Tensor, op: str) -> Tensor:
        return tensor


def assign_layers(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Spread independent layer solves over ``world_size`` ranks, balancing the summed cost.

    Greedy longest-first: layers in decreasing cost (ties keep the mapping's order) each go to the
    least loaded rank (ties: the lowest rank). Pure and deterministic, so every rank computes the
    same assignment without communicating.

    Args:
        costs: ``{layer: cost}``, e.g. ``d_out * d_in**2``, the GEMM ``W H`` of one iteration.
        world_size: Number of ranks.

    Returns:
        ``{layer: owner rank}``, in the order of ``costs``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0.0] * world_size
    owner: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: -costs[n]):  # sorted() is stable
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += costs[name]
    return {name: owner[name] for name in costs}


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_(tensor: Tensor, src: int) -> Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s, in place (no-op without a group).

    The raw bytes travel (any dtype, bool included, on gloo and NCCL alike), so the copy is
    bit-exact. ``tensor`` must have the same shape and dtype on every rank and live on a device
    the backend serves (CPU for gloo, the rank's GPU for NCCL).
    """
    if not is_distributed():
        return tensor
    buf = tensor if tensor.is_contiguous() else tensor.contiguous()
    flat = buf.reshape(-1)
    payload = flat.view(torch.uint8) if flat.numel() else flat
    torch.distributed.broadcast(payload, src=src)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), indexed by rank; ``[obj]`` without a group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
