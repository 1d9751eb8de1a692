"""The fast solver recipe must not give up quality: local loss within 1% of the paper recipe."""

from __future__ import annotations

import pytest
import torch

from prox24_lightning.solvers import RECIPES, prune_weight


def _llm_like_layer(seed: int, d_in: int = 128, d_out: int = 32, n: int = 512, rank: int = 32):
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
    x = (0.7 * factors + 0.5 * torch.randn(n, d_in, generator=g)) * torch.exp(
        torch.randn(d_in, generator=g)
    )
    x[:, :3] *= 20  # outlier features
    return torch.randn(d_out, d_in, generator=g) * 0.05, x.T @ x


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_recipe_within_one_percent_of_paper(seed):
    w, h = _llm_like_layer(seed)
    paper = prune_weight(w, h, "prox", config=RECIPES["paper"])
    fast = prune_weight(w, h, "prox", config=RECIPES["fast"])
    assert fast.stats.loss_final <= paper.stats.loss_final * 1.01
    # and it is cheaper: at most a third of the paper recipe's GEMMs
    assert fast.stats.gemms * 3 <= paper.stats.gemms
    assert torch.equal(fast.mask.reshape(32, -1, 4).sum(-1), torch.full((32, 32), 2))


def test_recipes_are_the_documented_settings():
    p = RECIPES["paper"]
    assert (p.lambda0, p.beta, p.momentum, p.refine, p.refine_steps) == (
        0.01,
        1.01,
        0.0,
        "gd",
        1000,
    )
    assert p.switch_at == 1.0 and p.beta_tail is None
