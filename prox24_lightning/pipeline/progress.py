"""``SolveProgress``: a console progress bar for the layer solves of one block.

It reads ``block k/N``, the layers still solving (and how many are in the prox phase), the
iteration, the largest lambda and the smallest 2:4 fraction of the layers in the prox phase. It
is fed by :class:`~prox24_lightning.pipeline.BlockStage` every few iterations, from values the
solves already hold on the host (no extra device reads).
"""

from __future__ import annotations

from typing import Any

__all__ = ["SolveProgress"]


class SolveProgress:
    """A tqdm bar for block ``block`` of ``num_blocks`` solving ``num_layers`` layers."""

    def __init__(self, block: int, num_blocks: int, num_layers: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            desc=f"block {block + 1}/{num_blocks}: solving {num_layers} layers",
            unit="it",
            leave=False,
        )
        self._last = 0

    def __call__(self, block: int, iteration: int, infos: list[dict[str, Any]]) -> None:
        active = [i for i in infos if i["phase"] != "done"]
        prox = [i for i in active if i["phase"] == "prox"]
        frac = min((i["frac_2of4"] for i in prox), default=1.0)
        lam = max((i["lambda"] for i in prox), default=0.0)
        self._bar.update(iteration - self._last)
        self._last = iteration
        self._bar.set_postfix(
            layers=len(active), prox=len(prox), lam=f"{lam:.3g}", frac_2of4=f"{frac:.4f}"
        )

    def close(self) -> None:
        self._bar.close()
