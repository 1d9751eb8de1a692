"""Capturing what a model feeds its blocks, and replaying blocks on it (no Lightning in here).

This module owns :func:`capture_block_inputs`, which records what the model feeds a block (hidden
states plus every keyword argument) with a forward pre-hook, :func:`run_block` /
:func:`block_output`, which replay a block on captured inputs and unpack what it returns, and
:func:`block_kwargs_to`, which moves captured inputs between devices.

Per-architecture findings (transformers 5.24, checked with tiny random models, ``use_cache=False``,
batch of 2 sequences of equal length; see ``tests/test_models.py``):

* Llama, Qwen2, Qwen3, Mistral, Phi3 call each block as ``block(hidden_states, attention_mask=...,
  position_ids=[1, S], cache=None, use_cache=False, position_embeddings=(cos, sin))`` with cos/sin
  of shape ``[1, S, head_dim]``.
* OPT passes ``attention_mask``, ``cache``, ``use_cache`` and ``position_ids`` of shape ``[B, S]``
  (OPT derives positions from the attention mask, so they are per batch row).
* GPT-2 passes ``cache``, ``attention_mask`` and ``encoder_hidden_states`` *positionally*, then
  ``encoder_attention_mask``, ``use_cache`` and ``position_ids`` ``[1, S]`` as keywords; the
  positional ones are bound to their parameter names here.
* With SDPA attention and no padding the ``attention_mask`` is ``None`` (causal masking happens in the
  kernel); with ``attn_implementation="eager"`` it is a float ``[B, 1, S, S]`` tensor; with padding
  it is a ``[B, 1, S, S]`` bool (SDPA) or float (eager) tensor that depends on the batch's padding.
* For batches of the same shape without padding, the captured keyword arguments are identical
  between batches, but some depend on the batch *size* (eager masks, OPT ``position_ids``). The
  captured kwargs therefore belong to the captured batch: capture once per batch (cheap, the
  forward stops at the first block) rather than reusing one batch's kwargs for another.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from .layers import find_blocks

__all__ = ["block_kwargs_to", "block_output", "capture_block_inputs", "run_block"]

# Keyword arguments that carry a KV cache. They are dropped from captured block inputs: the
# pipeline replays blocks without caching, and a cache object would grow on every replay.
_CACHE_KWARGS = frozenset({"past_key_values", "past_key_value", "cache", "layer_past"})

# --------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the capture hook to abandon the forward pass after the first block's inputs."""


def _bind_block_inputs(
    block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    """Split a block call into hidden states and named keyword arguments.

    Extra positional arguments (GPT-2 passes ``cache, attention_mask, encoder_hidden_states``
    positionally) are named from the block's ``forward`` signature so they replay as keywords.
    """
    params = list(inspect.signature(block.forward).parameters.values())
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    kwargs = dict(kwargs)
    if args:
        hidden, extra = args[0], args[1:]
    else:
        first = positional[0] if positional else "hidden_states"
        if first not in kwargs:
            raise RuntimeError(
                f"{type(block).__name__} was called without positional arguments and without "
                f"{first!r}; cannot tell which input is the hidden states"
            )
        hidden, extra = kwargs.pop(first), ()
    if len(extra) > len(positional) - 1:
        raise RuntimeError(
            f"{type(block).__name__} got {len(extra) + 1} positional arguments but its forward "
            f"names only {positional}; cannot replay it with keyword arguments"
        )
    kwargs.update(zip(positional[1:], extra, strict=False))  # extra may be shorter
    if not isinstance(hidden, Tensor):
        raise RuntimeError(
            f"expected the hidden states of {type(block).__name__} to be a Tensor, "
            f"got {type(hidden).__name__}"
        )
    return hidden, kwargs


def capture_block_inputs(
    model: nn.Module,
    input_ids: Tensor,
    *,
    block: nn.Module | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Record what ``model`` feeds ``block`` for one batch, without running the rest of the model.

    A forward pre-hook (``with_kwargs=True``) on ``block`` records the hidden states and *all*
    keyword arguments the model passes (attention mask, position ids, rotary
    ``position_embeddings``, ...; whatever the architecture uses, no hard-coded list), then raises
    a private exception to skip the remaining blocks and the LM head. KV-cache arguments and
    ``Cache`` objects are dropped and the model is called with ``use_cache=False``.

    The kwargs belong to this batch: some depend on the batch size (eager attention masks,
    OPT's ``position_ids``) or its padding, so capture per batch. Run the model in eval mode (the
    caller's job) so dropout does not perturb the captured states.

    Args:
        model: The causal LM.
        input_ids: ``[B, S]`` token ids; moved to the input embedding's device.
        block: The block to capture in front of; defaults to the first of :func:`find_blocks`.
        attention_mask: Optional ``[B, S]`` padding mask.

    Returns:
        ``(hidden_states [B, S, H], block_kwargs)``; tensors are returned as the model made them.
    """
    if block is None:
        block = find_blocks(model)[0][1]
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden, named = _bind_block_inputs(module, args, kwargs)
        captured["hidden"] = hidden
        captured["kwargs"] = {
            k: v for k, v in named.items() if k not in _CACHE_KWARGS and not isinstance(v, Cache)
        }
        raise _StopForward

    device = _input_device(model)
    input_ids = input_ids.to(device) if device is not None else input_ids
    if attention_mask is not None and device is not None:
        attention_mask = attention_mask.to(device)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError(
            f"the forward pass of {type(model).__name__} never called block "
            f"{type(block).__name__}; is it part of this model?"
        )
    return captured["hidden"], captured["kwargs"]


def _input_device(model: nn.Module) -> torch.device | None:
    """Device of the input embedding, where ``input_ids`` must go (``None`` if unknown/meta)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, Tensor) and weight.device.type != "meta":
        return weight.device
    return None


def run_block(block: nn.Module, hidden_states: Tensor, block_kwargs: Mapping[str, Any]) -> Tensor:
    """Run one block on captured inputs and return its output hidden states (see
    :func:`block_output`). Gradient mode is left to the caller."""
    return block_output(block, block(hidden_states, **block_kwargs))


def block_output(block: nn.Module, out: Any) -> Tensor:
    """The hidden states in what ``block`` returned.

    transformers 5 decoder layers return a Tensor; older versions and some architectures return a
    tuple whose element 0 is the hidden states. (Indexing a Tensor with ``[0]`` would silently take
    the first batch row, the Wanda-on-transformers-5 bug, hence the explicit check.)
    """
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{type(block).__name__} returned {type(out).__name__}; expected a Tensor or a tuple "
            "starting with one"
        )
    return out


def block_kwargs_to(kwargs: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor in captured block kwargs to ``device``.

    Recurses into tuples, lists and dicts (``position_embeddings=(cos, sin)``); other values are
    kept. Used to offload cached activations to CPU between blocks.
    """
    return {k: _to_device(v, device) for k, v in kwargs.items()}


def _to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value
