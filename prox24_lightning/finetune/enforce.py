"""The callback that keeps every pruned weight at exactly ``+0.0`` while finetuning."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

__all__ = ["EnforceMask"]


class EnforceMask(L.Callback):
    """Keep every pruned weight at exactly ``+0.0`` while finetuning.

    Two mechanisms, both needed:

    * ``on_before_optimizer_step`` zeroes the gradients of pruned entries. Lightning calls it
      after the backward passes of all accumulated batches and after AMP unscaling, and *before*
      gradient clipping, so the clipping norm counts only weights that can move.
    * a step post-hook on every optimizer writes ``+0.0`` into the pruned entries after each real
      ``optimizer.step()`` (also with gradient accumulation, where steps are rarer than batches).
      A zero gradient alone is not enough: AdamW's decoupled weight decay, moments carried over
      from a resumed checkpoint, or a custom optimizer can still move them. ``masked_fill_`` is
      used, never ``w * mask``, which would leave ``-0.0`` where ``w`` was negative.

    The module must provide ``masked_weights() -> {name: (parameter, keep-mask)}`` (see
    :meth:`~prox24_lightning.finetune.MaskedFinetuner.masked_weights`). Frozen weights (LoRA) are
    skipped.

    Args:
        verify: Also assert after every step that every pruned weight is ``+0.0`` (slower).
    """

    def __init__(self, verify: bool = False) -> None:
        self.verify = verify
        self._targets: list[tuple[nn.Parameter, Tensor]] = []
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        get = getattr(pl_module, "masked_weights", None)
        if get is None:
            raise TypeError(
                f"EnforceMask needs a module with masked_weights(); {type(pl_module).__name__} "
                "has none"
            )
        # Pruned-entry masks (True = must stay zero) on the parameter's device, built once.
        self._targets = [(w, (~keep).to(w.device)) for w, keep in get().values() if w.requires_grad]
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        self._apply()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for w, pruned in self._targets:
            if w.grad is not None:
                w.grad.masked_fill_(pruned, 0.0)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._apply()

    @torch.no_grad()
    def _apply(self) -> None:
        for w, pruned in self._targets:
            w.masked_fill_(pruned, 0.0)
            if self.verify:
                zero = w[pruned]
                if bool((zero != 0).any()) or bool(torch.signbit(zero).any()):
                    raise AssertionError("EnforceMask: a pruned weight is not +0.0 after masking")

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        self._remove_hooks()
