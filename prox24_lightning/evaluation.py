"""Perplexity evaluation shared by every LightningModule of the package.

The pruner and the finetuner score models with the same code, so ``prox24 validate`` numbers for
a dense, a pruned and a finetuned model are directly comparable.

**Bounded memory.** A batch's logits are never materialised: ``[B, T, V]`` fp32 logits of 8
windows of 512 tokens at a 262k vocabulary are 4.3 GB, before cross-entropy's copies. Instead the
decoder's final hidden states ``[B, T, H]`` are computed once, and the causal LM's own forward is
then run on chunks of positions with its decoder replaced by a stand-in that returns the chunk's
hidden states (:func:`next_token_logits`). So the model's own head and final-logit transform
(Gemma-2's ``final_logit_softcapping``, Granite's ``logits_scaling``, Cohere's ``logit_scale``,
...) run on one chunk at a time, without any per-architecture code, and the peak is about
``chunk x vocab`` whatever the batch; the chunk is sized from a memory budget
(:func:`~prox24_lightning.metrics.tokens_per_chunk`). The decoder is the module
``get_decoder()`` names (the one the causal LM's forward calls), checked by a hook.

A module whose model is offloaded (``offloaded`` returns an
:class:`~prox24_lightning.models.OffloadedModel`) cannot run the whole model per batch: only one
block fits on the accelerator. Its validation steps only queue the (CPU) token ids, and at the
end of the epoch :func:`blockwise_logits` runs the model the other way round: the embeddings over
every queued batch, then each block in turn over every batch (activations wait on the CPU), then
the final norm and, chunk by chunk, the LM head. Same operations, same order within each batch,
so the same perplexity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .metrics import CHUNK_BYTES, Perplexity, next_token_nll, tokens_per_chunk
from .models import (
    HEAD,
    REST,
    OffloadedModel,
)

__all__ = ["PerplexityEvaluation", "blockwise_logits", "chunk_tokens_for", "next_token_logits"]


class _FinalHidden(nn.Module):
    """Stands in for a block while the tail (final norm + LM head) runs on stored hidden states.

    Every stand-in returns :attr:`output`, the output of the last real block, so whatever the
    model computes in front of its blocks is discarded and the tail sees exactly the blockwise
    result. Attribute lookups the model's forward makes on its layers (``attention_type`` and the
    like) fall through to the replaced block.
    """

    def __init__(self, block: nn.Module, as_tuple: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)
        self.as_tuple = as_tuple
        self.output: Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor]:
        assert self.output is not None
        return (self.output,) if self.as_tuple else self.output

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@contextmanager
def _blocks_replaced(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], as_tuple: bool
) -> Iterator[list[_FinalHidden]]:
    """Swap every block for a :class:`_FinalHidden` inside its container, restoring on exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    stubs: list[_FinalHidden] = []
    try:
        for name, block in blocks:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            stub = _FinalHidden(block, as_tuple)
            parent._modules[child] = stub
            swapped.append((parent, child, block))
            stubs.append(stub)
        yield stubs
    finally:
        for parent, child, block in swapped:
            parent._modules[child] = block


# ------------------------------------------------------------------------------ chunked head
class _HeadSkipped(Exception):
    """Raised by the decoder's output hook: the causal LM's head is not run on the whole batch."""


class _DecoderOutput(nn.Module):
    """Stands in for the decoder while the causal LM's head runs on one chunk: returns
    :attr:`output`, the decoder's own output with the chunk as ``last_hidden_state``.

    The decoder stays registered as a child (never called), so the model's parameters and
    buffers are what they were (``resident_bytes`` and the like see the same model). Attribute
    lookups fall through to it (a forward may read the decoder's ``config`` and the like).
    """

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.replaced = decoder
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        assert self.output is not None
        return self.output

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["replaced"], name)


def _decoder_of(lm: nn.Module) -> nn.Module:
    """The module the causal LM's forward calls for its final hidden states (``get_decoder()``:
    ``model`` for Llama, ``transformer`` for GPT-2, ``model.decoder`` for OPT)."""
    get = getattr(lm, "get_decoder", None)
    decoder = get() if callable(get) else None
    if not isinstance(decoder, nn.Module) or decoder is lm:
        raise RuntimeError(
            f"{type(lm).__name__} names no decoder (get_decoder()); chunked evaluation needs the "
            "module that computes the final hidden states"
        )
    return decoder


def _slots_of(lm: nn.Module, child: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every ``(parent, name)`` under which ``lm`` holds ``child``."""
    return [
        (parent, name)
        for parent in lm.modules()
        for name, module in parent._modules.items()
        if module is child
    ]


@contextmanager
def _decoder_replaced(
    decoder: nn.Module, slots: list[tuple[nn.Module, str]]
) -> Iterator[_DecoderOutput]:
    """Swap ``decoder`` for a :class:`_DecoderOutput` in its ``slots`` (:func:`_slots_of`),
    restoring on exit."""
    stub = _DecoderOutput(decoder)
    try:
        for parent, name in slots:
            parent._modules[name] = stub
        yield stub
    finally:
        for parent, name in slots:
            parent._modules[name] = decoder


@torch.no_grad()
def _decoder_output(lm: nn.Module, decoder: nn.Module, **inputs: Any) -> Any:
    """What ``decoder`` returns inside ``lm(**inputs)``; the forward stops there, so the head
    never runs on the whole batch and the decoder is called exactly as the causal LM calls it."""
    captured: list[Any] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output)
        raise _HeadSkipped

    handle = decoder.register_forward_hook(hook)
    try:
        lm(**inputs, use_cache=False)
    except _HeadSkipped:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(
            f"the forward of {type(lm).__name__} never called its decoder "
            f"{type(decoder).__name__} (get_decoder()); chunked evaluation cannot split it"
        )
    return captured[0]


def _last_hidden(output: Any) -> Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)):
        hidden = output[0]
    if not isinstance(hidden, Tensor) or hidden.ndim != 3:
        raise TypeError(
            f"expected the decoder to return [B, T, H] last_hidden_state, got {type(output)}"
        )
    return hidden


def _with_hidden(output: Any, hidden: Tensor) -> Any:
    """The decoder's ``output`` with ``hidden`` as its last hidden state (same output type)."""
    if dataclasses.is_dataclass(output) and hasattr(output, "last_hidden_state"):
        return dataclasses.replace(output, last_hidden_state=hidden)
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    raise TypeError(f"cannot substitute the hidden states of a {type(output).__name__}")


def _vocab_size(lm: nn.Module) -> int:
    """Logits per position: the LM head's rows (real or ``meta``), else ``config.vocab_size``."""
    get = getattr(lm, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    vocab = getattr(getattr(lm, "config", None), "vocab_size", None)
    if not vocab:
        raise RuntimeError(f"cannot tell the vocabulary size of {type(lm).__name__}")
    return int(vocab)


def chunk_tokens_for(lm: nn.Module, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk of ``lm``'s head within ``chunk_bytes`` (see
    :func:`~prox24_lightning.metrics.tokens_per_chunk`)."""
    return tokens_per_chunk(_vocab_size(lm), chunk_bytes)


def _head_chunks(
    lm: nn.Module, decoder: nn.Module, output: Any, input_ids: Tensor, chunk_tokens: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(logits [n, V], targets [n])`` of the next-token predictions
    ``positions [:, :-1] -> input_ids[:, 1:]``, ``chunk_tokens`` positions at a time, in
    row-major order. Each chunk is the causal LM's own forward with ``decoder`` answering
    ``output`` restricted to the chunk's positions (as one ``[1, n, H]`` sequence; the head and the
    logit transform act per position). The decoder is swapped back before each chunk is yielded.
    """
    hidden = _last_hidden(output)
    pred = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    ids = input_ids.to(hidden.device)
    inputs, targets = ids[:, :-1].reshape(-1), ids[:, 1:].reshape(-1)
    slots = _slots_of(lm, decoder)
    for start in range(0, targets.numel(), chunk_tokens):
        stop = start + chunk_tokens
        with torch.no_grad(), _decoder_replaced(decoder, slots) as stub:
            stub.output = _with_hidden(output, pred[start:stop].unsqueeze(0))
            # The chunk's own input ids: the decoder stand-in ignores them, but a forward that
            # reads their shape sees one consistent [1, n] sequence.
            logits = lm(input_ids=inputs[start:stop].unsqueeze(0), use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])
        yield logits, targets[start:stop]
        del logits  # before the next chunk's logits exist: one chunk alive at a time


def next_token_logits(
    lm: nn.Module, input_ids: Tensor, chunk_tokens: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """The next-token logits of a batch chunk by chunk, never all at once.

    Runs the decoder once over ``input_ids`` (the causal LM's forward, stopped before its head),
    then the causal LM's own forward on ``chunk_tokens`` positions at a time with the decoder
    answering those positions' final hidden states, so the head and any final-logit transform
    are the model's own.

    Args:
        lm: A Hugging Face causal LM (``get_decoder()`` names the module its forward calls).
        input_ids: ``[B, T]`` token ids.
        chunk_tokens: Positions per chunk; default :func:`chunk_tokens_for` ``(lm)``.

    Yields:
        ``(logits [n, V], targets [n])``: the predictions at positions ``[:, :-1]`` (row-major)
        and their targets ``input_ids[:, 1:]``.
    """
    decoder = _decoder_of(lm)
    step = chunk_tokens or chunk_tokens_for(lm)
    output = _decoder_output(lm, decoder, input_ids=input_ids)
    yield from _head_chunks(lm, decoder, output, input_ids, step)


@torch.no_grad()
def blockwise_logits(
    offload: OffloadedModel,
    batches: Sequence[Tensor],
    device: torch.device | str,
    consume: Callable[[int, Tensor, Tensor], None],
    *,
    chunk_tokens: int | None = None,
    cache_device: torch.device | str = "cpu",
) -> None:
    """Run an offloaded causal LM over ``batches`` one part at a time and hand over the
    next-token logits chunk by chunk.

    1. embeddings (and whatever else sits in front of the first block): capture each batch's
       first-block inputs, kept on ``cache_device``;
    2. each block, onloaded once, over every batch in turn (streamed through ``device``);
    3. final norm: the model's forward with every block replaced by the stored output of the last
       one (:class:`_FinalHidden`), fed zero ``inputs_embeds`` so the input embedding stays
       offloaded, stopped at the decoder's output;
    4. LM head and final-logit transform: the model's own forward on ``chunk_tokens`` positions at
       a time (as :func:`next_token_logits`).

    At most one block, or the embeddings, or the tail is on ``device`` at any time, and at most
    one chunk of logits exists.

    Args:
        offload: The model, offloaded.
        batches: ``[B, S]`` token ids per batch.
        device: Compute device.
        consume: Called for each chunk, batch by batch in order, with the batch index, the
            ``[n, V]`` logits of positions ``[:, :-1]`` (row-major) and their ``[n]`` targets
            ``ids[:, 1:]``, both on ``device``.
        chunk_tokens: Positions per chunk; default :func:`chunk_tokens_for` ``(offload.model)``.
        cache_device: Where the activations wait between blocks.
    """
    model, blocks = offload.model, offload.blocks
    device = torch.device(device)
    decoder = _decoder_of(model)
    step = chunk_tokens or chunk_tokens_for(model)
    cache, as_tuple = offload.stream_through_blocks(batches, device, cache_device=cache_device)
    embedding = model.get_input_embeddings()
    width = embedding.weight.shape[-1]
    dtype = embedding.weight.dtype
    with offload.onload([REST, HEAD], device), _blocks_replaced(model, blocks, as_tuple) as stubs:
        for i in range(len(cache)):
            hidden, _ = cache[i]
            cache[i] = (torch.empty(0), {})  # release the batch's activations as we go
            final = hidden.to(device)
            for stub in stubs:
                stub.output = final
            dummy = torch.zeros(*final.shape[:2], width, dtype=dtype, device=device)
            output = _decoder_output(model, decoder, inputs_embeds=dummy)
            for stub in stubs:
                stub.output = None
            del final, dummy, hidden
            ids = batches[i].to(device)
            for logits, targets in _head_chunks(model, decoder, output, ids, step):
                consume(i, logits, targets)
                del logits  # one chunk alive at a time


class PerplexityEvaluation:
    """Mixin for a LightningModule holding a causal LM in ``self.lm``.

    Logs ``val/<set>_ppl`` per validation loader, named by the DataModule's ``val_names``. Each
    batch is scored chunk by chunk of positions (see the module docstring), the chunk sized so
    its logits and cross-entropy temporaries stay within :attr:`eval_chunk_bytes`. When the
    module's ``offloaded`` attribute is an :class:`~prox24_lightning.models.OffloadedModel`, the
    model is scored block by block at the end of the epoch.
    """

    lm: nn.Module | None
    _perplexity: nn.ModuleDict
    _eval_queue: list[tuple[str, Tensor]]
    #: Memory budget of one chunk's logits (see :func:`~prox24_lightning.metrics.tokens_per_chunk`).
    eval_chunk_bytes: int = CHUNK_BYTES

    def _metric(self, name: str) -> Perplexity:
        if name not in self._perplexity:
            metric = Perplexity(chunk_bytes=self.eval_chunk_bytes)
            self._perplexity[name] = metric.to(self.device)  # type: ignore[attr-defined]
            # Lightning maps Metric objects to attribute names once, at the first self.log; a
            # metric created later (the second evaluation set) would not be found in that map.
            self._metric_attributes = None
        return self._perplexity[name]  # type: ignore[return-value]

    def _eval_name(self, dataloader_idx: int) -> str:
        dm = getattr(self.trainer, "datamodule", None)  # type: ignore[attr-defined]
        names = getattr(dm, "val_names", None)
        return names[dataloader_idx] if names else f"set{dataloader_idx}"

    def _offloaded_model(self) -> OffloadedModel | None:
        offload = getattr(self, "offloaded", None)
        return offload if isinstance(offload, OffloadedModel) else None

    def validation_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        assert self.lm is not None
        ids = batch["input_ids"]
        name = self._eval_name(dataloader_idx)
        if self._offloaded_model() is not None:
            self._eval_queue.append((name, ids.detach().cpu()))
            return
        metric = self._metric(name)
        step = chunk_tokens_for(self.lm, self.eval_chunk_bytes)
        _add_chunks(metric, next_token_logits(self.lm, ids, step))
        self.log(f"val/{name}_ppl", metric, add_dataloader_idx=False, on_epoch=True)  # type: ignore[attr-defined]

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self.validation_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self._eval_queue = []

    def on_test_epoch_start(self) -> None:
        self._eval_queue = []

    def on_validation_epoch_end(self) -> None:
        self._score_queued()

    def on_test_epoch_end(self) -> None:
        self._score_queued()

    def _score_queued(self) -> None:
        """Score the queued batches of an offloaded model, block by block, and log per set."""
        offload = self._offloaded_model()
        queue, self._eval_queue = getattr(self, "_eval_queue", []), []
        if offload is None or not queue:
            return
        names = [name for name, _ in queue]

        def update(i: int, logits: Tensor, targets: Tensor) -> None:
            metric = self._metric(names[i])
            metric.add_nll(*next_token_nll(logits, targets, metric.ignore_index))

        step = chunk_tokens_for(offload.model, self.eval_chunk_bytes)
        device = self.device  # type: ignore[attr-defined]
        blockwise_logits(offload, [ids for _, ids in queue], device, update, chunk_tokens=step)
        for name in dict.fromkeys(names):
            metric = self._metric(name)
            # compute() sums the states over all ranks (torchmetrics), so every rank logs the
            # same global value; reset for the next epoch as Lightning does for logged metrics.
            self.log(f"val/{name}_ppl", metric.compute(), add_dataloader_idx=False)  # type: ignore[attr-defined]
            metric.reset()


def _add_chunks(metric: Perplexity, chunks: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Add one batch's chunks to ``metric`` as a single update (the sums of its chunks)."""
    nll: Tensor | float = 0.0
    count: Tensor | int = 0
    for logits, targets in chunks:
        chunk_nll, chunk_count = next_token_nll(logits, targets, metric.ignore_index)
        nll, count = nll + chunk_nll, count + chunk_count
        del logits  # the chunk's logits go before the next chunk's are made
    metric.add_nll(nll, count)
