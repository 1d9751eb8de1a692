"""Per-block shards: what pruning one block produced, written once, when the block is done.

``<run folder>/blocks/block_NNN.safetensors`` holds, for every layer pruned in block ``NNN``:
its new weight in the module's own layout (``<layer>.weight``, as in ``state_dict``), its mask
bit-packed (``<layer>.mask``, ``<layer>.mask_shape``), and, in the file's metadata, the layers'
report rows. The Lightning checkpoint then holds only the run's state and each shard's SHA-256,
so ``last.ckpt`` stays small and constant however many blocks are done, and no block's weights
are rewritten after it is pruned. A resume loads the original model and applies the shards,
refusing any whose bytes changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..artifacts import atomic_write, file_sha256
from ..ops.masks import pack_mask, unpack_mask

__all__ = ["BlockShard", "read_shard", "shard_path", "write_shard"]

BlockShard = tuple[dict[str, Tensor], dict[str, Tensor], dict[str, dict[str, Any]]]


def shard_path(directory: str | Path, block: int) -> Path:
    return Path(directory) / f"block_{block:03d}.safetensors"


def write_shard(
    directory: str | Path,
    block: int,
    weights: dict[str, Tensor],
    masks: dict[str, Tensor],
    report: dict[str, dict[str, Any]],
) -> str:
    """Write block ``block``'s shard atomically; returns its SHA-256.

    Args:
        weights: ``{"<layer>.weight": tensor}`` in the module's layout (any device).
        masks: ``{"<layer>": bool [out, in] mask}``.
        report: ``{"<layer>": report row}`` (JSON-serialisable).
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    for name, mask in masks.items():
        tensors[f"{name}.mask"] = pack_mask(mask.cpu())
        tensors[f"{name}.mask_shape"] = torch.tensor(list(mask.shape), dtype=torch.int64)
    path = shard_path(directory, block)
    meta = {"block": str(block), "report": json.dumps(report, default=str)}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return file_sha256(path)


def read_shard(directory: str | Path, block: int, sha256: str | None) -> BlockShard:
    """``(weights, masks, report)`` of block ``block``; refuses a shard whose SHA-256 differs
    from the checkpoint's (another run's file, or one changed since)."""
    path = shard_path(directory, block)
    if not path.is_file():
        raise FileNotFoundError(
            f"block shard {path} is missing: the checkpoint says block {block} is pruned, but "
            "its weights are gone; restore the run folder or start again without --ckpt_path"
        )
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(
            f"block shard {path} differs from the one the checkpoint recorded (SHA-256 "
            "mismatch): it comes from another run or was changed; refusing to resume"
        )
    weights: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        for key in keys:
            if key.endswith(".weight"):
                weights[key] = f.get_tensor(key)
        for key in keys:
            if key.endswith(".mask"):
                name = key.removesuffix(".mask")
                shape = tuple(int(d) for d in f.get_tensor(f"{name}.mask_shape").tolist())
                masks[name] = unpack_mask(f.get_tensor(key), shape)
    return weights, masks, json.loads(meta.get("report", "{}"))
