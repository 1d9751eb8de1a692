"""Perplexity evaluation shared by every LightningModule of the package.

The pruner and the finetuner score models with the same code, so ``prox24 validate`` numbers for
a dense, a pruned and a finetuned model are directly comparable.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .metrics import Perplexity

__all__ = ["PerplexityEvaluation"]


class PerplexityEvaluation:
    """Mixin for a LightningModule holding a causal LM in ``self.lm``.

    Logs ``val/<set>_ppl`` per validation loader, named by the DataModule's ``val_names``.
    """

    lm: nn.Module | None
    _perplexity: nn.ModuleDict

    def _metric(self, name: str) -> Perplexity:
        if name not in self._perplexity:
            self._perplexity[name] = Perplexity().to(self.device)  # type: ignore[attr-defined]
        return self._perplexity[name]  # type: ignore[return-value]

    def _eval_name(self, dataloader_idx: int) -> str:
        dm = getattr(self.trainer, "datamodule", None)  # type: ignore[attr-defined]
        names = getattr(dm, "val_names", None)
        return names[dataloader_idx] if names else f"set{dataloader_idx}"

    def validation_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        assert self.lm is not None
        ids = batch["input_ids"]
        logits = self.lm(input_ids=ids, use_cache=False).logits
        name = self._eval_name(dataloader_idx)
        metric = self._metric(name)
        metric.update(logits, ids)
        self.log(f"val/{name}_ppl", metric, add_dataloader_idx=False, on_epoch=True)  # type: ignore[attr-defined]

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self.validation_step(batch, batch_idx, dataloader_idx)
