"""Tests of :class:`prox24_lightning.metrics.Perplexity`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity as TMPerplexity

from prox24_lightning.metrics import BYTES_PER_LOGIT, Perplexity, tokens_per_chunk

V = 50


def batches(n: int = 3, b: int = 2, t: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, t, V, generator=g) * 3, torch.randint(0, V, (b, t), generator=g))
        for _ in range(n)
    ]


def test_equals_protocol_and_direct_computation() -> None:
    data = batches()
    metric = Perplexity()
    for logits, ids in data:
        metric.update(logits, ids)
    # Wanda/SparseGPT eval_ppl: per window, loss = mean shifted CE, nll = loss * seqlen;
    # ppl = exp(sum nll / (n_windows * seqlen)), i.e. exp of the mean window loss.
    nlls = []
    for logits, ids in data:
        for lg, x in zip(logits, ids, strict=True):
            loss = F.cross_entropy(lg[:-1], x[1:])
            nlls.append(loss.double() * x.numel())
    seqlen = data[0][1].shape[1]
    protocol = torch.exp(torch.stack(nlls).sum() / (len(nlls) * seqlen))
    # Direct: exp(total NLL / total predicted tokens).
    logits = torch.cat([lg for lg, _ in data])
    ids = torch.cat([x for _, x in data])
    direct = torch.exp(
        F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="mean")
    )
    result = metric.compute()
    assert result.dtype == torch.float32 and result.ndim == 0
    torch.testing.assert_close(result.double(), protocol, rtol=1e-6, atol=0)
    torch.testing.assert_close(result, direct, rtol=1e-6, atol=0)
    assert metric.count.item() == ids[:, 1:].numel()


def test_equals_torchmetrics_perplexity_with_ignore_index() -> None:
    data = batches(seed=1)
    data[1][1][0, 4:] = -100  # label padding
    ours, ref = Perplexity(), TMPerplexity(ignore_index=-100)
    for logits, ids in data:
        ours.update(logits, ids)
        ref.update(logits[:, :-1].float(), ids[:, 1:])  # torchmetrics does not shift
    torch.testing.assert_close(ours.compute(), ref.compute(), rtol=1e-5, atol=0)
    assert ours.count.item() == sum((x[:, 1:] != -100).sum().item() for _, x in data)


def test_low_precision_logits_are_upcast() -> None:
    (logits, ids) = batches(n=1, b=2, t=33)[0]
    half = logits.to(torch.bfloat16)
    metric = Perplexity()
    metric.update(half, ids)
    expected = torch.exp(
        F.cross_entropy(half[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1))
    )
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-6, atol=0)
    assert math.isfinite(metric.compute().item())


def test_chunking_does_not_change_the_result() -> None:
    data = batches(seed=2)
    whole, chunked = Perplexity(), Perplexity(chunk_bytes=5 * V * BYTES_PER_LOGIT)
    assert tokens_per_chunk(V, chunked.chunk_bytes) == 5
    for logits, ids in data:
        whole.update(logits, ids)
        chunked.update(logits, ids)
    # Only the fp32 summation order differs.
    torch.testing.assert_close(whole.compute(), chunked.compute(), rtol=1e-6, atol=0)


def test_states_add_up_like_distributed_sync() -> None:
    (a, b) = batches(n=2, seed=3)
    left, right, both = Perplexity(), Perplexity(), Perplexity()
    left.update(*a)
    right.update(*b)
    both.update(*a)
    both.update(*b)
    left.merge_state(right)  # the same sum reduction as dist_reduce_fx="sum"
    torch.testing.assert_close(left.compute(), both.compute(), rtol=1e-12, atol=0)


def test_reset_and_shape_errors() -> None:
    metric = Perplexity()
    with pytest.raises(ValueError, match="expected logits"):
        metric.update(torch.randn(2, 5, V), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_bytes"):
        Perplexity(chunk_bytes=0)
    metric.update(*batches(n=1)[0])
    metric.reset()
    assert metric.count.item() == 0 and metric.nll.item() == 0.0
    # A perfect predictor has perplexity 1.
    ids = torch.randint(0, V, (1, 6))
    logits = torch.full((1, 6, V), -1e4)
    logits[0, torch.arange(5), ids[0, 1:]] = 1e4
    metric.update(logits, ids)
    assert metric.compute().item() == pytest.approx(1.0)
