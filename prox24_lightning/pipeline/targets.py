"""Which layers a run prunes, and the checks made before any work and on resume.

* :class:`TargetSelector`: the targeted linear layers of a block (``targets`` / ``ignore``
  regexes; layers whose input size is not a multiple of 4 are left dense with a warning, or
  refused);
* :func:`check_weights_finite`: no targeted weight holds NaN or Inf (before calibration);
* :func:`check_masks`: masks from a checkpoint or file belong to this model (known layer, shape,
  exactly 2:4, and for pruned layers no weight outside the mask).

The model may be offloaded: ``onloaded(block_name)`` is a context manager that makes a block's
real tensors readable (a no-op when the whole model is resident).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..models import find_linear_layers, get_weight_matrix, in_features

__all__ = ["TargetSelector", "check_masks", "check_weights_finite"]

Blocks = Sequence[tuple[str, nn.Module]]
Onloaded = Callable[[str], AbstractContextManager[None]]


@dataclass
class TargetSelector:
    """The linear layers of a block that are pruned.

    Args:
        targets: regexes; only layers whose qualified name matches one are pruned.
        ignore: regexes of layers to leave dense.
        on_indivisible: ``warn`` (leave a layer whose input size is not divisible by 4 dense)
            or ``error``.
        skipped: filled with the layers left dense and why (shared with the run's state).
        warn: how a skipped layer is announced (once per layer).
    """

    targets: list[str] | None = None
    ignore: list[str] | None = None
    on_indivisible: Literal["warn", "error"] = "warn"
    skipped: dict[str, str] = field(default_factory=dict)
    warn: Callable[[str], None] = warnings.warn

    def layers(self, name: str, block: nn.Module) -> dict[str, nn.Module]:
        """``{qualified name: module}`` of the targeted layers of block ``name``."""
        layers = find_linear_layers(block, targets=self.targets, ignore=self.ignore, prefix=name)
        if not layers:
            raise ValueError(
                f"block {name} ({type(block).__name__}) has no linear layers to prune "
                f"(targets={self.targets}, ignore={self.ignore})"
            )
        keep: dict[str, nn.Module] = {}
        for lname, module in layers.items():
            d_in = in_features(module)
            if d_in % 4:
                msg = f"layer {lname} has {d_in} input features, not divisible by 4: cannot be 2:4"
                if self.on_indivisible == "error":
                    raise ValueError(msg + " (set on_indivisible: warn to leave it dense)")
                if lname not in self.skipped:
                    self.warn(msg + "; left dense")
                self.skipped[lname] = f"{d_in} input features, not divisible by 4"
                continue
            keep[lname] = module
        return keep


def check_weights_finite(blocks: Blocks, selector: TargetSelector, onloaded: Onloaded) -> None:
    """Fail fast, before calibration: every block has linear layers, indivisible ones are
    refused or skipped per the selector, and no targeted weight holds NaN or Inf."""
    for k, (bname, block) in enumerate(blocks):
        with onloaded(bname):
            for lname, module in selector.layers(bname, block).items():
                if not bool(torch.isfinite(get_weight_matrix(module)).all()):
                    raise FloatingPointError(
                        f"NaN or Inf in the weights of layer {lname} (block {k}, {bname}); "
                        "fix the checkpoint before pruning"
                    )


def check_masks(
    masks: dict[str, Tensor],
    source: str,
    blocks: Blocks,
    pruned: Collection[str],
    onloaded: Onloaded,
    model_name: str,
) -> None:
    """Refuse masks that do not belong to this model: unknown layer, wrong shape, not 2:4, or
    (for the ``pruned`` layers) weights outside the mask."""
    layers: dict[str, nn.Module] = {}
    block_of: dict[str, str] = {}
    for bname, block in blocks:
        for lname, module in find_linear_layers(block, prefix=bname).items():
            layers[lname], block_of[lname] = module, bname
    for name, mask in masks.items():
        if name not in layers:
            raise ValueError(
                f"{source}: mask for {name!r}, which is not a linear layer of {model_name} "
                "(masks from another model?)"
            )
        with onloaded(block_of[name]):
            w = get_weight_matrix(layers[name])
            if tuple(mask.shape) != tuple(w.shape):
                raise ValueError(
                    f"{source}: mask for {name} has shape {tuple(mask.shape)} but the layer's "
                    f"[out, in] weight has shape {tuple(w.shape)} (masks from another model?)"
                )
            if bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) != 2).any()):
                raise ValueError(f"{source}: mask for {name} does not keep exactly 2 of every 4")
            if name in pruned and bool(((w != 0) & ~mask.to(w.device)).any()):
                raise ValueError(
                    f"{source}: mask for {name} disagrees with the pruned weights "
                    "(non-zero weights outside the mask)"
                )
