""":class:`MaskedFinetuner`: the LightningModule that finetunes a 2:4 export under its masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..artifacts import load_masks_with_layout
from ..evaluation import PerplexityEvaluation
from ..models import get_weight_matrix, is_conv1d, load_causal_lm
from .checks import MaskMismatchError, apply_keep, check_masks_fit, mask_file_method
from .enforce import EnforceMask
from .lora import LoraSettings, dropped_fractions, is_peft_model, wrap_lora

__all__ = ["MaskedFinetuner", "default_optimizer"]


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with ``lr=1e-5`` and no weight decay (a conservative finetuning default)."""
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class MaskedFinetuner(PerplexityEvaluation, L.LightningModule):
    """Finetune a 2:4 export on the causal-LM loss while its masks stay fixed.

    Attach :class:`~prox24_lightning.finetune.EnforceMask` (keeps pruned weights at ``+0.0``) and
    :class:`~prox24_lightning.finetune.ExportFinetuned` (writes the result) as callbacks. The train
    loader must yield ``{"input_ids": [B, L]}`` (an optional ``attention_mask`` is honoured);
    labels are the inputs, which Hugging Face models shift internally. Validation logs
    ``val/<set>_ppl`` per evaluation set, as the pruner does, so ``--evaluate both`` reports
    perplexity before and after finetuning.

    Args:
        model_name_or_path: A pruned export folder (``save_pretrained`` + tokenizer + masks).
        masks_path: The mask file (default: ``<model_name_or_path>/masks.safetensors``).
        optimizer: Optimizer factory, e.g. ``{class_path: torch.optim.AdamW, init_args: {lr:
            1e-5}}`` in YAML. Gets the trainable parameters.
        scheduler: Optional LR scheduler factory; it is stepped every optimizer step.
        dtype: Weights dtype when loading. ``float32`` (default) keeps fp32 master weights, which
            is what AdamW wants; use ``precision: bf16-mixed`` for speed. ``auto`` keeps the
            checkpoint's dtype.
        lora: LoRA settings; ``None`` trains the weights themselves.
        trainable: ``all`` parameters (embeddings, norms, head included) or only the
            ``masked_layers``. Ignored with LoRA (only adapters train).
        mask_mismatch: What to do when the loaded weights have non-zeros outside the masks (the
            masks belong to another pruning of the same architecture, or the checkpoint is
            dense): ``error`` refuses, ``apply`` zeroes them (finetune a dense model under given
            masks).
        gradient_checkpointing: Recompute activations in the backward pass (less memory).
        trust_remote_code: Passed to ``from_pretrained``.
    """

    #: Labels for the CLI's ``--evaluate`` before/after perplexities.
    eval_labels: tuple[str, str] = ("pruned", "finetuned")

    def __init__(
        self,
        model_name_or_path: str,
        masks_path: str | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32",
        lora: LoraSettings | None = None,
        trainable: Literal["all", "masked_layers"] = "all",
        mask_mismatch: Literal["error", "apply"] = "error",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        # The factories are code, not hyper-parameters (the CLI's config.yaml records them).
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model_name_or_path = model_name_or_path
        self.masks_path = masks_path or str(Path(model_name_or_path) / "masks.safetensors")
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.dtype_name = dtype
        self.lora = lora
        self.lm: nn.Module | None = None
        self.tokenizer: Any = None
        #: bool ``[out, in]`` masks (CPU) from the mask file, ``True`` = kept weight.
        self.masks: dict[str, Tensor] = {}
        #: layers whose module stores the weight as ``[in, out]`` (GPT-2 ``Conv1D``).
        self.transposed: set[str] = set()
        #: method recorded in the mask file (``prox``, ``wanda``, ...), for the report.
        self.source_method: str | None = None
        #: per LoRA-merged layer: fraction of the adapter update dropped by re-masking.
        self.remask_dropped: dict[str, float] = {}
        self._layers: dict[str, nn.Module] = {}
        self._perplexity = nn.ModuleDict()

    # ------------------------------------------------------------------------------ model
    @property
    def method(self) -> str:
        """The pruning method of the source export, marked as finetuned."""
        return f"{self.source_method or 'unknown'}+finetune"

    def configure_model(self) -> None:
        """Load the export and its masks once (Lightning calls this for every fit/validate)."""
        if self.lm is not None:
            return
        lm, tok = load_causal_lm(
            self.model_name_or_path,
            dtype=self.dtype_name,
            trust_remote_code=self.hparams.trust_remote_code,
        )
        self.set_model(lm, tok)

    def set_model(self, lm: nn.Module, tokenizer: Any = None) -> None:
        """Use an already loaded model; loads and checks the masks against it."""
        masks, transposed = load_masks_with_layout(self.masks_path)
        self.source_method = mask_file_method(self.masks_path)
        self._layers = check_masks_fit(lm, masks, transposed)
        self._check_or_apply_support(masks)
        self.masks, self.transposed = masks, transposed
        if self.hparams.trainable == "masked_layers":
            lm.requires_grad_(False)
            for module in self._layers.values():
                module.requires_grad_(True)
        if self.hparams.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input gradients (frozen embeddings, LoRA).
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.lora is not None:
            lm = wrap_lora(lm, self.lora, sorted(masks))
        self.lm = lm
        self.tokenizer = tokenizer

    def _check_or_apply_support(self, masks: dict[str, Tensor]) -> None:
        """Refuse (or zero) non-zero weights outside the masks: the masks belong elsewhere."""
        bad: list[str] = []
        for name, mask in masks.items():
            w = get_weight_matrix(self._layers[name])
            outside = int(((w != 0) & ~mask.to(w.device)).sum())
            if not outside:
                continue
            if self.hparams.mask_mismatch == "apply":
                with torch.no_grad():
                    apply_keep(self._layers[name], mask)
            else:
                bad.append(f"{name} ({outside} of {mask.numel()} entries)")
        if bad:
            raise MaskMismatchError(
                f"the weights of {self.model_name_or_path} have non-zeros outside the masks of "
                f"{self.masks_path} in {len(bad)} layer(s), e.g. {'; '.join(bad[:3])}. The masks "
                "come from another pruning run or the checkpoint is dense; pass "
                "mask_mismatch='apply' to prune it with these masks"
            )

    def masked_weights(self) -> dict[str, tuple[nn.Parameter, Tensor]]:
        """``{layer: (weight parameter, bool keep-mask in the parameter's own layout)}``.

        The mask is ``[out, in]`` for ``nn.Linear`` and transposed to ``[in, out]`` for
        ``Conv1D``; it lives on the CPU (callers move it once).
        """
        out: dict[str, tuple[nn.Parameter, Tensor]] = {}
        for name, mask in self.masks.items():
            module = self._layers[name]
            keep = mask.t().contiguous() if is_conv1d(module) else mask
            out[name] = (module.weight, keep)
        return out

    # ---------------------------------------------------------------------------- training
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters (check trainable= and lora=)")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        # Finetuning is step-based (max_steps), so the schedule advances per optimizer step.
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_fit_start(self) -> None:
        if self.lora is None and not any(
            isinstance(c, EnforceMask) for c in self.trainer.callbacks
        ):
            rank_zero_warn(
                "MaskedFinetuner without an EnforceMask callback: optimizer steps will fill the "
                "pruned weights and the 2:4 pattern will be lost"
            )

    def on_train_start(self) -> None:
        # from_pretrained returns eval mode and Lightning keeps submodule modes; training needs
        # train mode (dropout, gradient checkpointing only act when training).
        assert self.lm is not None
        self.lm.train()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        assert self.lm is not None
        ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        labels = ids if attention_mask is None else ids.masked_fill(attention_mask == 0, -100)
        out = self.lm(input_ids=ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        loss = out.loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=ids.shape[0])
        return loss

    # ---------------------------------------------------------------------------- export
    @torch.no_grad()
    def export_model(self) -> nn.Module:
        """The model to save: LoRA merged, masks re-applied, ``-0.0`` normalised to ``+0.0``.

        With LoRA this merges in place (``self.lm`` becomes the plain merged model), so an
        evaluation after fit scores exactly what is exported.
        """
        assert self.lm is not None
        if self.lora is not None and is_peft_model(self.lm):
            self.remask_dropped = dropped_fractions(self.lm, self.masked_weights())
            self.lm = self.lm.merge_and_unload()
            # merge_and_unload puts the original Linear/Conv1D objects back, so _layers holds.
        for _, (weight, keep) in self.masked_weights().items():
            weight.masked_fill_(~keep.to(weight.device), 0.0)
            # A kept weight that landed on exactly -0.0 would fail the export check (and trips
            # sparse kernels that test the sign bit); +0.0 is the same value.
            weight.masked_fill_(weight == 0, 0.0)
        return self.lm
