"""Perplexity of a causal language model, as a lean ``torchmetrics.Metric``, and the chunk rule
that bounds its memory.

Unlike ``torchmetrics.text.Perplexity``, this metric shifts logits and labels itself, always
computes in fp32, and never materialises a ``[B*T, V]`` softmax. A softmax of that size costs
about 1 GB per 2048-token sequence at a 128k vocabulary, and it overflows to ``inf`` in fp16.

Scoring works on chunks of positions sized from a memory budget (:func:`tokens_per_chunk`):
``chunk x vocab x`` :data:`BYTES_PER_LOGIT` stays under ``chunk_bytes`` whatever the batch.
:mod:`~prox24_lightning.evaluation` applies the model's head to such chunks of hidden states and
adds each batch's sums with :meth:`Perplexity.add_nll`, so no ``[B, T, V]`` tensor ever exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["BYTES_PER_LOGIT", "CHUNK_BYTES", "Perplexity", "next_token_nll", "tokens_per_chunk"]

#: Bytes held per (position, vocabulary entry) while one chunk is scored: an upper bound of 4
#: fp32 copies of the logits. The head's output, the final-logit transform's temporaries (Gemma's
#: softcap makes two), the fp32 upcast and cross-entropy's log-softmax are each one copy at most,
#: and not all are alive at once.
BYTES_PER_LOGIT = 16
#: Default memory budget of one chunk's logits and cross-entropy temporaries.
CHUNK_BYTES = 256 * 2**20


def tokens_per_chunk(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that ``positions x vocab x BYTES_PER_LOGIT <= chunk_bytes`` (at
    least one position).

    Args:
        vocab: Logits per position.
        chunk_bytes: The memory budget of one chunk.
    """
    if vocab < 1 or chunk_bytes < 1:
        raise ValueError(f"need vocab >= 1 and chunk_bytes >= 1, got {vocab} and {chunk_bytes}")
    return max(1, chunk_bytes // (vocab * BYTES_PER_LOGIT))


def next_token_nll(
    logits: Tensor, targets: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Summed NLL (float64) and number of scored targets of aligned predictions.

    Args:
        logits: ``[N, V]`` predictions, in any float dtype (upcast to fp32 here).
        targets: ``[N]`` target ids of the same positions; ``ignore_index`` entries are skipped.
    """
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected logits [N, V] and targets [N], got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    targets = targets.to(device=logits.device, dtype=torch.long)
    nll = F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=ignore_index)
    return nll.double(), (targets != ignore_index).sum()


class Perplexity(Metric):
    """Token-level perplexity ``exp(total NLL / total predicted tokens)``.

    ``update(logits, input_ids)`` scores the next-token predictions
    ``logits[:, :-1] -> input_ids[:, 1:]``; :meth:`add_nll` adds sums computed elsewhere (the
    chunked head of :mod:`~prox24_lightning.evaluation`, with :func:`next_token_nll`). Targets
    equal to ``ignore_index`` count neither in the NLL nor in the number of tokens. The states
    ``nll`` (float64) and ``count`` are sums, so distributed synchronisation adds them up.

    **Same number as the Wanda/SparseGPT protocol.** The protocol computes
    ``exp(mean over windows of mean-CE(window))``. Every window has the same length L and
    contributes L - 1 targets, so the mean of per-window means equals
    ``total NLL / (n_windows * (L - 1))``, which is exactly what this metric computes.
    (The protocol's ``loss * seqlen / (n * seqlen)`` bookkeeping cancels.) With windows of
    unequal length or with ignored targets, this metric weights every token equally, which
    ``torchmetrics.text.Perplexity`` does too.

    Args:
        ignore_index: Target id excluded from the score (the Hugging Face label padding value).
        chunk_bytes: Memory budget of one ``cross_entropy`` call in :meth:`update`: positions are
            scored :func:`tokens_per_chunk` at a time; the result changes only by fp32 rounding.
        **kwargs: Passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    nll: Tensor
    count: Tensor

    def __init__(self, ignore_index: int = -100, chunk_bytes: int = CHUNK_BYTES, **kwargs) -> None:
        super().__init__(**kwargs)
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.ignore_index = ignore_index
        self.chunk_bytes = chunk_bytes
        # float64: millions of per-token losses summed in fp32 lose digits of the final ppl.
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, input_ids: Tensor) -> None:
        """Add the next-token NLL of a batch.

        Args:
            logits: ``[B, T, V]`` model outputs, in any float dtype (upcast to fp32 here).
            input_ids: ``[B, T]`` token ids of the same windows; ``ignore_index`` entries are
                skipped.
        """
        if logits.ndim != 3 or input_ids.ndim != 2 or logits.shape[:2] != input_ids.shape:
            raise ValueError(
                f"expected logits [B, T, V] and input_ids [B, T], got {tuple(logits.shape)} and "
                f"{tuple(input_ids.shape)}"
            )
        vocab = logits.shape[-1]
        pred = logits[:, :-1].reshape(-1, vocab)
        target = input_ids[:, 1:].reshape(-1)
        step = tokens_per_chunk(vocab, self.chunk_bytes)
        for start in range(0, target.numel(), step):
            nll, count = next_token_nll(
                pred[start : start + step], target[start : start + step], self.ignore_index
            )
            self.nll += nll
            self.count += count

    def add_nll(self, nll: Tensor | float, count: Tensor | int) -> None:
        """Add a summed next-token NLL and the number of targets it scored (ignored ones
        excluded), e.g. a batch's :func:`next_token_nll` sums over its chunks."""
        # Through torchmetrics' update wrapper, as update() is: it counts the call (compute()
        # warns before any) and drops a cached compute() result. Wrapped per call, so nothing
        # unpicklable is stored on the metric.
        self._wrap_update(self._add)(nll, count)

    def _add(self, nll: Tensor | float, count: Tensor | int) -> None:
        self.nll += torch.as_tensor(nll, dtype=torch.float64, device=self.nll.device)
        self.count += torch.as_tensor(count, dtype=torch.long, device=self.count.device)

    def compute(self) -> Tensor:
        """``exp(nll / count)`` as an fp32 scalar (``nan`` before any token was seen)."""
        return torch.exp(self.nll / self.count).float()
