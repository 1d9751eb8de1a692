"""Does a mask file fit a model? Every mask resolved to its layer, or a named mismatch."""

from __future__ import annotations

from torch import Tensor, nn

from ..models import get_weight_matrix, is_conv1d

__all__ = ["MaskMismatchError", "apply_keep", "check_masks_fit", "mask_file_method"]


class MaskMismatchError(ValueError):
    """The mask file does not fit the model (missing layer, wrong shape or layout, other
    weights)."""


def check_masks_fit(
    lm: nn.Module, masks: dict[str, Tensor], transposed: set[str]
) -> dict[str, nn.Module]:
    """Resolve every mask to its layer, or raise :class:`MaskMismatchError` naming the problem.

    Args:
        lm: The causal LM (not yet wrapped by peft).
        masks: bool ``[out, in]`` masks by qualified layer name.
        transposed: Layers the mask file says store ``[in, out]`` weights (GPT-2 ``Conv1D``).

    Returns:
        ``{layer name: module}`` for every mask.
    """
    if not masks:
        raise MaskMismatchError("the mask file holds no masks")
    modules = dict(lm.named_modules())
    layers: dict[str, nn.Module] = {}
    for name, mask in masks.items():
        module = modules.get(name)
        if module is None:
            linear = [n for n, m in modules.items() if isinstance(m, nn.Linear) or is_conv1d(m)]
            raise MaskMismatchError(
                f"mask for layer {name!r}: the model has no such layer (it has {len(linear)} "
                f"linear layers, e.g. {linear[:3]}); is the mask file from another model?"
            )
        try:
            weight = get_weight_matrix(module)
        except TypeError:
            raise MaskMismatchError(
                f"mask for layer {name!r}: the module is a {type(module).__name__}, not a "
                "linear layer"
            ) from None
        if tuple(weight.shape) != tuple(mask.shape):
            raise MaskMismatchError(
                f"mask for layer {name!r} has shape {tuple(mask.shape)} but the layer's weight "
                f"is [out, in] = {tuple(weight.shape)}; is the mask file from another model?"
            )
        if (name in transposed) != is_conv1d(module):
            raise MaskMismatchError(
                f"mask for layer {name!r} was saved for a "
                f"{'transposed (Conv1D)' if name in transposed else 'Linear'} weight, but the "
                f"layer is a {type(module).__name__}"
            )
        layers[name] = module
    return layers


def mask_file_method(path: str) -> str | None:
    """The pruning method recorded in a mask file's metadata (``None`` if it names none)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("method")


def apply_keep(module: nn.Module, mask: Tensor) -> None:
    """Zero the pruned entries of ``module.weight`` in place with ``+0.0``."""
    keep = mask.t() if is_conv1d(module) else mask
    module.weight.masked_fill_(~keep.to(module.weight.device), 0.0)
