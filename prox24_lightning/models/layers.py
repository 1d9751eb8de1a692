"""Transformer blocks and their prunable linear layers, found generically (no Lightning in here).

This module owns:

* :func:`find_blocks`, which lists the transformer blocks from ``model._no_split_modules``, the
  class names transformers itself uses to keep blocks whole when sharding; ``model.model.layers``
  is never hard-coded;
* :func:`find_linear_layers`, which lists the prunable ``nn.Linear`` / GPT-2 ``Conv1D`` layers
  inside a block;
* :func:`get_weight_matrix` / :func:`set_weight_matrix` (and :func:`in_features` /
  :func:`out_features`), which hide Conv1D's transposed layout.

The only architecture-specific code is the handling of GPT-2's ``Conv1D`` (weights stored as
``[in, out]``), which transformers still uses for GPT-2 and a few relatives.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "find_blocks",
    "find_linear_layers",
    "get_weight_matrix",
    "in_features",
    "is_conv1d",
    "out_features",
    "set_weight_matrix",
]


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of ``model``, in forward order, with their qualified names.

    Blocks are the modules whose class name is listed in ``_no_split_modules`` (the union over
    ``model`` and its sub-models, so wrappers around a ``PreTrainedModel`` work too). Only the
    outermost matches count: a listed class nested inside a block is part of that block. Blocks
    are returned in registration order, which is forward order for the ``ModuleList`` stacks
    every causal LM uses.

    Args:
        model: A transformers model (or a module containing one).

    Returns:
        ``[(name, block), ...]``, e.g. ``[("model.layers.0", LlamaDecoderLayer), ...]``.

    Raises:
        ValueError: If the model declares no ``_no_split_modules``, none of them occurs in it, or
            the matches are spread over several containers (e.g. a vision tower and a language
            model), where sequential replay would be wrong.
    """
    class_names: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if declared:
            class_names.update(declared)
    model_class = type(model).__name__
    if not class_names:
        raise ValueError(
            f"{model_class} declares no `_no_split_modules`, so its transformer blocks cannot be "
            "found generically. Only transformers models that support device_map sharding are "
            "supported."
        )

    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__ not in class_names:
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in blocks):
            continue  # nested inside a block we already have
        blocks.append((name, module))
    if not blocks:
        raise ValueError(
            f"{model_class} declares _no_split_modules={sorted(class_names)} but contains no "
            "module of those classes."
        )
    parents = {name.rpartition(".")[0] for name, _ in blocks}
    if len(parents) > 1:
        raise ValueError(
            f"{model_class}: blocks ({sorted(class_names)}) live in several containers "
            f"{sorted(parents)}; block-by-block replay needs a single stack."
        )
    return blocks


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (GPT-2 style, weight stored ``[in, out]``)."""
    return isinstance(module, Conv1D)


def find_linear_layers(
    block: nn.Module,
    *,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    prefix: str = "",
) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and transformers ``Conv1D`` inside ``block``, in module order.

    Embeddings and ``lm_head`` sit outside the transformer blocks, so searching a block never
    returns them: they are never pruned.

    Args:
        block: A transformer block (or any module).
        targets: Regexes; if given, keep only layers whose full name matches one (``re.search``).
        ignore: Regexes; drop layers whose full name matches one. Applied after ``targets``.
        prefix: Prepended to the names (with a dot), normally the block's name from
            :func:`find_blocks`, so patterns can address one block (``r"layers\\.0\\."``).

    Returns:
        ``{qualified_name: module}``, e.g. ``{"model.layers.0.self_attn.q_proj": Linear, ...}``.
    """
    include = [re.compile(p) for p in targets or []]
    exclude = [re.compile(p) for p in ignore or []]
    layers: dict[str, nn.Module] = {}
    for name, module in block.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        full = ".".join(part for part in (prefix, name) if part)
        if include and not any(p.search(full) for p in include):
            continue
        if any(p.search(full) for p in exclude):
            continue
        layers[full] = module
    return layers


def get_weight_matrix(module: nn.Module) -> Tensor:
    """The weight as ``[out_features, in_features]`` (a transposed view for ``Conv1D``).

    The result shares storage with the parameter; write through :func:`set_weight_matrix`.
    """
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


@torch.no_grad()
def set_weight_matrix(module: nn.Module, w: Tensor) -> None:
    """Write an ``[out_features, in_features]`` matrix into ``module`` in place.

    The values are cast to the parameter's dtype and device and stored in the module's own layout
    (transposed for ``Conv1D``), so the parameter object, and any optimizer or hook holding it,
    stays the same.
    """
    target = get_weight_matrix(module)
    if tuple(w.shape) != tuple(target.shape):
        raise ValueError(
            f"weight shape mismatch for {type(module).__name__}: expected [out, in] = "
            f"{list(target.shape)}, got {list(w.shape)}"
        )
    target.copy_(w)  # `target` is a view for Conv1D, so this writes the transposed layout


def in_features(module: nn.Module) -> int:
    """Input width of an ``nn.Linear`` or ``Conv1D`` (the dimension 2:4 groups run along)."""
    return get_weight_matrix(module).shape[1]


def out_features(module: nn.Module) -> int:
    """Output width of an ``nn.Linear`` or ``Conv1D``."""
    return get_weight_matrix(module).shape[0]
