"""Perplexity of a causal language model, as a lean ``torchmetrics.Metric``.

Unlike ``torchmetrics.text.Perplexity``, this metric shifts logits and labels itself, always
computes in fp32, and never materialises a ``[B*T, V]`` softmax. A softmax of that size costs
about 1 GB per 2048-token sequence at a 128k vocabulary, and it overflows to ``inf`` in fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["Perplexity"]


class Perplexity(Metric):
    """Token-level perplexity ``exp(total NLL / total predicted tokens)``.

    ``update(logits, input_ids)`` scores the next-token predictions
    ``logits[:, :-1] -> input_ids[:, 1:]``. Targets equal to ``ignore_index`` count neither in
    the NLL nor in the number of tokens. The states ``nll`` (float64) and ``count`` are sums, so
    distributed synchronisation adds them up.

    **Same number as the Wanda/SparseGPT protocol.** The protocol computes
    ``exp(mean over windows of mean-CE(window))``. Every window has the same length L and
    contributes L - 1 targets, so the mean of per-window means equals
    ``total NLL / (n_windows * (L - 1))``, which is exactly what this metric computes.
    (The protocol's ``loss * seqlen / (n * seqlen)`` bookkeeping cancels.) With windows of
    unequal length or with ignored targets, this metric weights every token equally, which
    ``torchmetrics.text.Perplexity`` does too.

    Args:
        ignore_index: Target id excluded from the score (the Hugging Face label padding value).
        chunk_tokens: Positions scored per ``cross_entropy`` call. This bounds the fp32 copy of
            the logits to ``chunk_tokens x vocab``; the result changes only by fp32 rounding.
        **kwargs: Passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    nll: Tensor
    count: Tensor

    def __init__(self, ignore_index: int = -100, chunk_tokens: int = 8192, **kwargs) -> None:
        super().__init__(**kwargs)
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.ignore_index = ignore_index
        self.chunk_tokens = chunk_tokens
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
        target = input_ids[:, 1:].reshape(-1).to(device=logits.device, dtype=torch.long)
        nll = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, target.numel(), self.chunk_tokens):
            stop = start + self.chunk_tokens
            nll += F.cross_entropy(
                pred[start:stop].float(),
                target[start:stop],
                reduction="sum",
                ignore_index=self.ignore_index,
            ).double()
        self.nll += nll
        self.count += (target != self.ignore_index).sum()

    def compute(self) -> Tensor:
        """``exp(nll / count)`` as an fp32 scalar (``nan`` before any token was seen)."""
        return torch.exp(self.nll / self.count).float()
