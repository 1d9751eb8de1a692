"""``SolveProgress``: a console progress bar for the layer solves of one block.

It reads ``block k/N``, the layers still solving (and how many are in the prox phase), the
iteration, the largest lambda and the smallest 2:4 fraction of the layers in the prox phase. It
is fed by :class:`~prox24_lightning.pipeline.BlockStage` every few iterations, from values the
solves already hold on the host (no extra device reads).

The bar opens at the first report, not with the stage: during calibration there is nothing to
show, and a block solved in fewer iterations than one report interval leaves no bar behind (its
console line, printed by the pruner when the block is done, says what happened).
"""

from __future__ import annotations

from typing import Any

__all__ = ["SolveProgress"]


class SolveProgress:
    """A tqdm bar for block ``block`` of ``num_blocks`` solving ``num_layers`` layers."""

    def __init__(self, block: int, num_blocks: int, num_layers: int) -> None:
        self._desc = f"block {block + 1}/{num_blocks}: solving {num_layers} layers"
        self._bar: Any = None
        self._last = 0

    def __call__(self, block: int, iteration: int, infos: list[dict[str, Any]]) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm

            # Starts at this iteration: the rate then covers only the iterations it has seen.
            self._bar = tqdm(desc=self._desc, unit="it", leave=False, initial=iteration)
            self._last = iteration
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
        if self._bar is not None:
            self._bar.close()
            self._bar = None
