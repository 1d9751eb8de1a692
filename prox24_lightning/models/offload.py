"""Offloading: a model whose weights live in a CPU store, onloaded part by part (no Lightning).

This module owns :class:`OffloadedModel`, which keeps the weights in a CPU store (the module tree
holds ``meta`` placeholders) and onloads one block, the embeddings (:data:`EMBED`), the head
(:data:`HEAD`) or the rest (:data:`REST`) at a time, for models larger than the accelerator, and
:func:`resident_bytes`, which counts what is onloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .capture import block_kwargs_to, block_output, capture_block_inputs
from .layers import find_blocks

__all__ = ["EMBED", "HEAD", "REST", "OffloadedModel", "resident_bytes"]

#: Part of an :class:`OffloadedModel`: the input embeddings (``get_input_embeddings()``).
EMBED = "embed"
#: Part of an :class:`OffloadedModel`: the output embeddings (``get_output_embeddings()``, the
#: LM head), which shares its tensor with :data:`EMBED` when the weights are tied.
HEAD = "head"
#: Part of an :class:`OffloadedModel`: every tensor outside the blocks that is neither the input
#: nor the output embedding (final norm, rotary frequencies, position embeddings, projections).
REST = "rest"


def resident_bytes(module: nn.Module, device: torch.device | str | None = None) -> int:
    """Bytes of the parameters and buffers of ``module`` that hold real (non-``meta``) data.

    Each tensor is counted once (tied weights are one tensor). With ``device``, only tensors on
    that device count. Under :class:`OffloadedModel` this is what the parts onloaded right now
    occupy, which is how the tests bound device memory even when compute and storage are both
    the CPU.
    """
    wanted = torch.device(device) if device is not None else None
    seen: set[tuple[torch.device, int, int]] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "meta" or (wanted is not None and t.device != wanted):
            continue
        key = (t.device, t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


class OffloadedModel:
    """A model whose tensors live in a CPU store, onloaded to the compute device part by part.

    Block-by-block pruning and evaluation only ever need one block, or the embeddings, or the head
    at a time; a model larger than the accelerator (Llama-2-70B in bf16 is 138 GB) therefore runs
    if everything else stays in host memory. As in accelerate's weights map, the module tree keeps
    its structure but every parameter and buffer is replaced by a ``meta`` tensor of the same
    shape and dtype, and the real tensors sit in :attr:`store` under their qualified names. So
    nothing can silently compute with an offloaded weight (a meta tensor raises), and
    :func:`resident_bytes` measures exactly what is onloaded even when compute and storage are both
    the CPU.

    Parts: one per block (named as in :func:`find_blocks`), :data:`EMBED`, :data:`HEAD` and
    :data:`REST`. Tied tensors (GPT-2's ``lm_head`` and ``wte``) are one store entry that belongs
    to both parts; onloads are reference counted, so nested :meth:`onload` calls share tensors.

    Args:
        model: The causal LM. Its tensors are moved to ``storage`` (a no-op when already there) and
            its module tree is left holding meta placeholders.
        storage: Where the real tensors live between uses.
    """

    def __init__(self, model: nn.Module, storage: torch.device | str = "cpu") -> None:
        self.model = model
        self.storage = torch.device(storage)
        self.blocks = find_blocks(model)
        #: qualified name (first seen) -> the real tensor, on :attr:`storage`.
        self.store: dict[str, Tensor] = {}
        self._slots: dict[str, list[tuple[nn.Module, str, bool]]] = {}
        self._alias: dict[str, str] = {}
        self._meta: dict[str, Tensor] = {}
        self._loaded: dict[str, tuple[Tensor, int]] = {}
        self.parts: dict[str, list[str]] = {name: [] for name, _ in self.blocks}
        self.parts.update({EMBED: [], HEAD: [], REST: []})

        prefixes = [(name, f"{name}.") for name, _ in self.blocks]
        special: dict[str, list[str]] = {}
        for part, getter in ((EMBED, "get_input_embeddings"), (HEAD, "get_output_embeddings")):
            get = getattr(model, getter, None)
            target = get() if callable(get) else None
            if target is not None:
                special[part] = [
                    f"{n}." if n else "" for n, m in model.named_modules() if m is target
                ]
        by_id: dict[int, str] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for kind in ("_parameters", "_buffers"):
                for attr, tensor in getattr(module, kind).items():
                    if tensor is None:
                        continue
                    qual = f"{mname}.{attr}" if mname else attr
                    key = by_id.setdefault(id(tensor), qual)
                    self._alias[qual] = key
                    slots = self._slots.setdefault(key, [])
                    if not any(m is module and a == attr for m, a, _ in slots):
                        slots.append((module, attr, kind == "_parameters"))
                    if key == qual:
                        self.store[key] = tensor.detach().to(self.storage)
                    for part in self._parts_of(qual, prefixes, special):
                        if key not in self.parts[part]:
                            self.parts[part].append(key)
        for key, slots in self._slots.items():
            real = self.store[key]
            placeholder = torch.empty_like(real, device="meta")
            is_param = slots[0][2]
            self._meta[key] = (
                nn.Parameter(placeholder, requires_grad=False) if is_param else placeholder
            )
            self._set_slots(key, self._meta[key])

    @staticmethod
    def _parts_of(
        qual: str, blocks: list[tuple[str, str]], special: dict[str, list[str]]
    ) -> list[str]:
        for name, prefix in blocks:
            if qual.startswith(prefix):
                return [name]
        hits = [part for part, pre in special.items() if any(qual.startswith(p) for p in pre)]
        return hits or [REST]

    def _set_slots(self, key: str, value: Tensor) -> None:
        for module, attr, is_param in self._slots[key]:
            (module._parameters if is_param else module._buffers)[attr] = value

    def key(self, name: str) -> str:
        """The store key of a parameter or buffer, given any of its qualified names."""
        try:
            return self._alias[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not a parameter or buffer of the offloaded model"
            ) from None

    @contextmanager
    def onload(
        self,
        parts: str | list[str] | tuple[str, ...],
        device: torch.device | str,
        *,
        writeback: bool = False,
    ) -> Iterator[None]:
        """Put the real tensors of ``parts`` into the module tree on ``device`` for a ``with``.

        Args:
            parts: Part names (block names, :data:`EMBED`, :data:`HEAD`, :data:`REST`).
            device: Compute device; onloading to :attr:`storage` copies nothing.
            writeback: After a normal exit, copy the (possibly modified) tensors back into the
                store; needed after pruning wrote new weights on an accelerator. Without it,
                in-place changes made on another device are dropped with the device copy.
        """
        device = torch.device(device)
        names = [parts] if isinstance(parts, str) else list(parts)
        keys = list(dict.fromkeys(k for p in names for k in self.parts[p]))
        mine: list[str] = []
        ok = False
        try:
            for key in keys:
                if key in self._loaded:
                    value, count = self._loaded[key]
                    self._loaded[key] = (value, count + 1)
                else:
                    data = self.store[key].to(device)
                    is_param = self._slots[key][0][2]
                    value = nn.Parameter(data, requires_grad=False) if is_param else data
                    self._set_slots(key, value)
                    self._loaded[key] = (value, 1)
                mine.append(key)
            yield
            ok = True
        finally:
            for key in reversed(mine):
                value, count = self._loaded[key]
                real = self.store[key]
                if writeback and ok and not _same_memory(value, real):
                    real.copy_(value.detach())
                if count > 1:
                    self._loaded[key] = (value, count - 1)
                else:
                    del self._loaded[key]
                    self._set_slots(key, self._meta[key])

    @torch.no_grad()
    def stream_through_blocks(
        self,
        batches: Iterable[Tensor],
        device: torch.device | str,
        *,
        num_blocks: int | None = None,
        cache_device: torch.device | str = "cpu",
        check_embedded: Callable[[Tensor], None] | None = None,
    ) -> tuple[list[tuple[Tensor, dict[str, Any]]], bool]:
        """Run token batches through the embeddings and the first blocks, one part at a time.

        1. The embeddings (and whatever else sits in front of the first block), onloaded once,
           capture every batch's first-block inputs; ``check_embedded`` sees each of them.
        2. Blocks ``0 .. num_blocks - 1``, each onloaded once, run over every batch in turn.

        Activations wait on ``cache_device`` between parts, so at most one part is on ``device``
        at a time. Each batch goes through the same operations as in the model's own forward.
        Used to rebuild a resumed run's calibration inputs and to evaluate block by block.

        Args:
            batches: ``[B, S]`` token ids per batch.
            device: Compute device.
            num_blocks: How many blocks to run (default: all).
            cache_device: Where the activations wait between parts.
            check_embedded: Called with each batch's first-block hidden states, on ``device``.

        Returns:
            Each batch's hidden states and block kwargs (on ``cache_device``) entering block
            ``num_blocks`` (leaving the last block by default), and whether the blocks return
            a tuple rather than a Tensor (``False`` when no block ran).
        """
        device = torch.device(device)
        blocks = self.blocks if num_blocks is None else self.blocks[:num_blocks]
        cache: list[tuple[Tensor, dict[str, Any]]] = []
        with self.onload([EMBED, REST], device):
            for ids in batches:
                hidden, kwargs = capture_block_inputs(self.model, ids.to(device))
                if check_embedded is not None:
                    check_embedded(hidden)
                cache.append((hidden.to(cache_device), block_kwargs_to(kwargs, cache_device)))
        returns_tuple = False
        for name, block in blocks:
            with self.onload(name, device):
                for i, (hidden, kwargs) in enumerate(cache):
                    out = block(hidden.to(device), **block_kwargs_to(kwargs, device))
                    returns_tuple = isinstance(out, (tuple, list))
                    cache[i] = (block_output(block, out).to(cache_device), kwargs)
        return cache, returns_tuple

    def materialized(self) -> AbstractContextManager[None]:
        """The whole model with its real tensors, on :attr:`storage` (no copy): for
        ``save_pretrained`` and other whole-model reads."""
        return self.onload(list(self.parts), self.storage)


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr()
