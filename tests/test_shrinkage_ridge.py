"""The shrinkage ridge: per-sequence Gram spread, Ledoit-Wolf intensity, and how a layer's ridge is
chosen (``ProxConfig.ridge_shrinkage``, ``ridge``, ``ridge_tokens``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prox24_lightning.calibration import GramCollector
from prox24_lightning.ops import GramAccumulator, GramSpread, shrinkage_ridge
from prox24_lightning.solvers import RECIPES, make_config, prune_weight
from prox24_lightning.solvers.layer import layer_ridge


def _sequences(seed: int, count: int, length: int, width: int, topic: float = 0.0) -> torch.Tensor:
    """``[count, length, width]`` fp32 activations with feature scales; ``topic`` adds a random
    direction shared by the tokens of each sequence (sequences that disagree)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(0.5 * torch.randn(width, generator=g))
    x = torch.randn(count, length, width, generator=g)
    x = x + topic * torch.randn(count, 1, width, generator=g)
    return x * scales


def _ledoit_wolf_ridge(x: torch.Tensor) -> float:
    """The textbook estimate from the explicit per-sequence Grams, in fp64."""
    x = x.double()
    grams = x.mT @ x  # [S, n, n]
    s, n = grams.shape[0], grams.shape[-1]
    mean = grams.mean(0)
    mu = float(torch.trace(mean)) / n
    b2 = float(sum((g - mean).square().sum() for g in grams)) / s**2
    d2 = float((mean - mu * torch.eye(n, dtype=torch.float64)).square().sum())
    alpha = min(b2 / d2, 1.0)
    return alpha / (1 - alpha)


@pytest.mark.parametrize("length, width", [(8, 24), (40, 12)])
def test_spread_sums_every_sequence_gram_in_fp32(length, width):
    """Both product orders (``X Xᵀ`` for short sequences, ``Xᵀ X`` for long ones) and several
    updates give ``sum_s ||H_s||_F^2`` of the fp64 reference; a 2-D input has no sequences."""
    x = _sequences(0, 7, length, width)
    acc = GramAccumulator(width, spread=True)
    acc.update(x[:3])
    acc.update(x[3:])
    ref = sum(float((s.double().T @ s.double()).square().sum()) for s in x)
    spread = acc.spread
    assert spread is not None and spread.sequences == 7
    assert math.isclose(spread.sum_sq, ref, rel_tol=1e-5)
    assert acc.gram.dtype == torch.float32 and acc.sequence_sq.dtype == torch.float64
    flat = GramAccumulator(width, spread=True)
    flat.update(x.reshape(-1, width))
    assert flat.spread is None and flat.n_tokens == 7 * length
    assert torch.allclose(flat.gram, acc.gram, rtol=1e-5, atol=1e-3)


def test_spread_chunks_agree(monkeypatch):
    """The per-sequence products run in chunks bounded in memory; any chunk size sums the same."""
    import prox24_lightning.ops.gram as gram_module

    x = _sequences(1, 9, 16, 20)
    whole = GramAccumulator(20, spread=True)
    whole.update(x)
    monkeypatch.setattr(gram_module, "_SPREAD_CHUNK_ELEMENTS", 1)
    chunked = GramAccumulator(20, spread=True)
    chunked.update(x)
    assert math.isclose(float(chunked.sequence_sq), float(whole.sequence_sq), rel_tol=1e-6)


def test_shrinkage_ridge_is_ledoit_wolf_and_scale_free():
    x = _sequences(2, 24, 32, 16, topic=0.5)
    acc = GramAccumulator(16, spread=True)
    acc.update(x)
    ridge = shrinkage_ridge(acc.gram, acc.spread)
    assert math.isclose(ridge, _ledoit_wolf_ridge(x), rel_tol=1e-4)
    # A Gram c times larger (and its spread c^2) gives the same ridge.
    c = 37.0
    scaled = GramSpread(acc.spread.sequences, acc.spread.sum_sq * c * c)
    assert math.isclose(shrinkage_ridge(acc.gram * c, scaled), ridge, rel_tol=1e-4)
    with pytest.raises(ValueError, match="2 sequences"):
        shrinkage_ridge(acc.gram, GramSpread(1, 1.0))


def test_shrinkage_ridge_falls_with_independent_tokens_and_grows_when_sequences_disagree():
    """Independent tokens: four times the sequences, about a quarter of the ridge. Sequences that
    share a direction among their tokens get more ridge than independent ones at the same N."""

    def ridge_of(x: torch.Tensor) -> float:
        acc = GramAccumulator(x.shape[-1], spread=True)
        acc.update(x)
        return shrinkage_ridge(acc.gram, acc.spread)

    few, many = ridge_of(_sequences(3, 32, 16, 32)), ridge_of(_sequences(3, 128, 16, 32))
    assert 2.5 < few / many < 6.0
    assert ridge_of(_sequences(3, 32, 16, 32, topic=1.0)) > 3 * few
    # Isotropic inputs have nothing to learn beyond mu I: the intensity is capped.
    iso = torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(4))
    assert ridge_of(iso) == pytest.approx(1.0)


def test_layer_ridge_rules():
    x = _sequences(5, 16, 32, 16, topic=0.5)
    acc = GramAccumulator(16, spread=True)
    acc.update(x)
    default = RECIPES["default"]
    ridge, rule = layer_ridge(default, acc.gram, acc.n_tokens, acc.spread)
    assert rule == "shrinkage"
    assert ridge == pytest.approx(default.ridge_shrinkage * shrinkage_ridge(acc.gram, acc.spread))
    # Without the spread: the token rule, then the fixed ridge, then none.
    assert layer_ridge(default, acc.gram, 1024, None) == pytest.approx(
        (default.ridge * default.ridge_tokens / 1024, "tokens")
    )
    assert layer_ridge(default, acc.gram, None, None) == (default.ridge, "fixed")
    # 0 turns the estimate off (a YAML null keeps the recipe's value): the rules below it apply.
    off = make_config("prox", {"ridge_shrinkage": 0.0})
    assert layer_ridge(off, acc.gram, 1024, acc.spread)[1] == "tokens"
    plain = make_config("prox", {"ridge_shrinkage": 0.0, "ridge": 0.0})
    assert layer_ridge(plain, acc.gram, 1024, acc.spread) == (0.0, "none")
    assert layer_ridge(make_config("prox", {"recipe": "fast"}), acc.gram, 512, acc.spread) == (
        0.0,
        "none",
    )
    with pytest.raises(ValueError, match="ridge_shrinkage"):
        make_config("prox", {"ridge_shrinkage": -1.0})
    with pytest.raises(ValueError, match="mask_search_ridge"):
        make_config("prox", {"ridge_shrinkage": 1.0, "ridge": 0.0, "mask_search_ridge": 0.01})


def test_solve_reports_the_shrinkage_ridge_and_collector_hands_the_spread_on():
    """The collector's spread reaches the solve (the pipeline's path) and sets its ridge; the Gram's
    units are the ones the spread was summed in, whatever the token rescaling of the solve."""
    torch.manual_seed(0)
    block = nn.ModuleDict({"a": nn.Linear(16, 8, bias=False), "b": nn.Linear(16, 4, bias=False)})
    collector = GramCollector(dict(block.items()), spread=True)
    x = _sequences(6, 12, 10, 16, topic=0.5)
    with collector.forward_pass():
        block["a"](x)
        block["b"](x)
    spread = collector.spread_of("b")
    assert spread is not None and spread.sequences == 12
    assert collector.spread_of("a") == spread  # one input, one spread
    gram, tokens = collector.gram_of("a"), collector.tokens_of("a")
    res = prune_weight(block["a"].weight, gram, "prox", n_tokens=tokens, spread=spread)
    assert res.stats.extra["ridge_rule"] == "shrinkage"
    assert res.stats.extra["ridge"] == pytest.approx(2.0 * shrinkage_ridge(gram, spread))
    fallback = prune_weight(block["a"].weight, gram, "prox", n_tokens=tokens)
    assert fallback.stats.extra["ridge_rule"] == "tokens"


def test_spread_is_tracked_only_where_a_solver_uses_it():
    """The spread costs up to the Gram's own time: only a config with ``ridge_shrinkage`` (the
    default prox recipe) asks calibration for it; untracked, a Gram has no spread."""
    from prox24_lightning.solvers import needs_spread

    assert needs_spread(RECIPES["default"])
    assert not needs_spread(RECIPES["paper"]) and not needs_spread(make_config("alps"))
    assert not needs_spread(make_config("prox", {"ridge_shrinkage": 0.0}))
    acc = GramAccumulator(16)
    acc.update(_sequences(7, 4, 8, 16))
    assert acc.spread is None and float(acc.sequence_sq) == 0.0
