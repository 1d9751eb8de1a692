"""LoRA adapters through the optional ``peft``: settings, wrapping, and what re-masking drops.

A merged adapter ``W + B A`` is dense, so the export merges and re-applies the masks
(:meth:`~prox24_lightning.finetune.MaskedFinetuner.export_model`); :func:`dropped_fractions`
measures, per layer, how much of the adapter's update that discards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models import is_conv1d

__all__ = ["LoraSettings", "dropped_fractions", "is_peft_model", "wrap_lora"]


@dataclass
class LoraSettings:
    """LoRA adapters (through ``peft``) instead of full finetuning.

    Args:
        r: Adapter rank.
        alpha: Scaling numerator (``lora_alpha``); the update is ``alpha / r * B A``.
        dropout: Dropout on the adapter input.
        target_modules: Which linear layers get adapters: a regex matched against the full layer
            name (``re.fullmatch``, peft's convention for a string), a list of names or name
            suffixes (e.g. ``[q_proj, v_proj]``), or ``None`` for every masked layer.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] | None = None


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "LoRA finetuning needs the optional dependency peft: pip install "
            "'prox24_lightning[peft]' (or pip install peft)"
        ) from err
    return peft


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft wrapper (it can merge and unload its adapters)."""
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def wrap_lora(lm: nn.Module, settings: LoraSettings, masked: list[str]) -> nn.Module:
    """``lm`` with LoRA adapters on ``settings.target_modules`` (default: the ``masked`` layers)."""
    peft = _import_peft()
    targets = settings.target_modules
    if targets is None:
        targets = masked  # peft matches list entries exactly or as name suffixes
    elif isinstance(targets, str):
        re.compile(targets)  # fail early on a bad regex, with Python's message
    conv1d = any(is_conv1d(m) for m in lm.modules())
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=conv1d,  # GPT-2 Conv1D stores [in, out]
    )
    return peft.get_peft_model(lm, config)


def dropped_fractions(
    peft_model: nn.Module, masked: dict[str, tuple[nn.Parameter, Tensor]]
) -> dict[str, float]:
    """Per masked layer with an adapter: ``||delta on pruned entries|| / ||delta||``."""
    by_weight = {id(w): (name, keep) for name, (w, keep) in masked.items()}
    out: dict[str, float] = {}
    for module in peft_model.modules():
        base = getattr(module, "base_layer", None)
        get_delta = getattr(module, "get_delta_weight", None)
        if base is None or get_delta is None or id(getattr(base, "weight", None)) not in by_weight:
            continue
        name, keep = by_weight[id(base.weight)]
        delta = sum(get_delta(a).float() for a in module.active_adapters)
        total = float(torch.linalg.vector_norm(delta))
        dropped = float(torch.linalg.vector_norm(delta[~keep.to(delta.device)]))
        out[name] = dropped / total if total > 0 else 0.0
    return out
