"""Finetuning a 2:4 export with its masks held fixed (full or LoRA).

After pruning, a short finetune on the language-modelling loss recovers part of the lost
quality, but only if the 2:4 pattern survives it. Three pieces:

* :class:`MaskedFinetuner` (automatic optimisation): loads a pruned export and its
  ``masks.safetensors`` (the masks come from the file, never from ``W == 0``: a kept weight can be
  exactly zero), checks that every mask fits a layer of the model, trains on the causal-LM loss
  and reports per-set perplexity like :class:`~prox24_lightning.pruner.BlockwisePruner`.
* :class:`EnforceMask` (callback): zeroes the gradients of pruned entries before every optimizer
  step and writes ``+0.0`` into them after every optimizer step, so AdamW's weight decay and
  moments, mixed precision, gradient accumulation and clipping cannot revive them.
* :class:`ExportFinetuned` (callback): ``save_pretrained`` + tokenizer + the *same* masks + a
  report, written atomically and verified with :func:`~prox24_lightning.artifacts.check_export`.

Optional LoRA (``pip install prox24_lightning[peft]``) trains adapters instead of the weights. A
merged adapter ``W + B A`` is dense, which destroys the 2:4 pattern (locuslab/wanda #83: 32.7 %
sparsity after merging). At export the adapters are therefore merged and the masks
**re-applied**, which discards the adapter's update on pruned entries: the exported model differs
slightly from "base + unmerged adapter". The report gives, per layer, the fraction of the
adapter update (Frobenius norm) that re-masking dropped.

Example::

    prox24 fit --config configs/finetune-demo.yaml --evaluate both
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from .artifacts import load_masks_with_layout, write_export
from .callbacks import ExportPruned
from .evaluation import PerplexityEvaluation
from .models import get_weight_matrix, is_conv1d, load_causal_lm
from .reports import build_finetune_report

__all__ = [
    "EnforceMask",
    "ExportFinetuned",
    "LoraSettings",
    "MaskMismatchError",
    "MaskedFinetuner",
    "default_optimizer",
]


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with ``lr=1e-5`` and no weight decay (a conservative finetuning default)."""
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


@dataclass
class LoraSettings:
    """LoRA adapters (through ``peft``) instead of full finetuning.

    Args:
        r: Adapter rank.
        alpha: Scaling numerator (``lora_alpha``); the update is ``alpha / r * B A``.
        dropout: Dropout on the adapter input.
        target_modules: Which linear layers get adapters: a regex matched against the full layer
            name (``re.fullmatch``, peft's convention for a string), a list of names or name
            suffixes (e.g. ``[q_proj, v_proj]``), or ``None`` for every masked layer.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] | None = None


class MaskMismatchError(ValueError):
    """The mask file does not fit the model (missing layer, wrong shape or layout, other weights)."""


class MaskedFinetuner(PerplexityEvaluation, L.LightningModule):
    """Finetune a 2:4 export on the causal-LM loss while its masks stay fixed.

    Attach :class:`EnforceMask` (keeps pruned weights at ``+0.0``) and :class:`ExportFinetuned`
    (writes the result) as callbacks. The train loader must yield ``{"input_ids": [B, L]}`` (an
    optional ``attention_mask`` is honoured); labels are the inputs, which Hugging Face models
    shift internally. Validation logs ``val/<set>_ppl`` per evaluation set, as the pruner does,
    so ``--evaluate both`` reports perplexity before and after finetuning.

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
        self.source_method = _mask_file_method(self.masks_path)
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
            lm = _wrap_lora(lm, self.lora, sorted(masks))
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
                    _apply_keep(self._layers[name], mask)
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
        if self.lora is not None and _is_peft_model(self.lm):
            self.remask_dropped = _dropped_fractions(self.lm, self.masked_weights())
            self.lm = self.lm.merge_and_unload()
            # merge_and_unload puts the original Linear/Conv1D objects back, so _layers holds.
        for _, (weight, keep) in self.masked_weights().items():
            weight.masked_fill_(~keep.to(weight.device), 0.0)
            # A kept weight that landed on exactly -0.0 would fail the export check (and trips
            # sparse kernels that test the sign bit); +0.0 is the same value.
            weight.masked_fill_(weight == 0, 0.0)
        return self.lm


# ---------------------------------------------------------------------------------- checks
def check_masks_fit(
    lm: nn.Module, masks: dict[str, Tensor], transposed: set[str]
) -> dict[str, nn.Module]:
    """Resolve every mask to its layer, or raise :class:`MaskMismatchError` naming the problem.

    Args:
        lm: The causal LM (not yet wrapped by peft).
        masks: bool ``[out, in]`` masks by qualified layer name.
        transposed: Layers the mask file says store ``[in, out]`` weights (GPT-2 ``Conv1D``).

    Returns:
        ``{layer name: module}`` for every mask.
    """
    if not masks:
        raise MaskMismatchError("the mask file holds no masks")
    modules = dict(lm.named_modules())
    layers: dict[str, nn.Module] = {}
    for name, mask in masks.items():
        module = modules.get(name)
        if module is None:
            linear = [n for n, m in modules.items() if isinstance(m, nn.Linear) or is_conv1d(m)]
            raise MaskMismatchError(
                f"mask for layer {name!r}: the model has no such layer (it has {len(linear)} "
                f"linear layers, e.g. {linear[:3]}); is the mask file from another model?"
            )
        try:
            weight = get_weight_matrix(module)
        except TypeError:
            raise MaskMismatchError(
                f"mask for layer {name!r}: the module is a {type(module).__name__}, not a "
                "linear layer"
            ) from None
        if tuple(weight.shape) != tuple(mask.shape):
            raise MaskMismatchError(
                f"mask for layer {name!r} has shape {tuple(mask.shape)} but the layer's weight "
                f"is [out, in] = {tuple(weight.shape)}; is the mask file from another model?"
            )
        if (name in transposed) != is_conv1d(module):
            raise MaskMismatchError(
                f"mask for layer {name!r} was saved for a "
                f"{'transposed (Conv1D)' if name in transposed else 'Linear'} weight, but the "
                f"layer is a {type(module).__name__}"
            )
        layers[name] = module
    return layers


def _mask_file_method(path: str) -> str | None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("method")


def _apply_keep(module: nn.Module, mask: Tensor) -> None:
    """Zero the pruned entries of ``module.weight`` in place with ``+0.0``."""
    keep = mask.t() if is_conv1d(module) else mask
    module.weight.masked_fill_(~keep.to(module.weight.device), 0.0)


# ------------------------------------------------------------------------------------ LoRA
def _import_peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "LoRA finetuning needs the optional dependency peft: pip install "
            "'prox24_lightning[peft]' (or pip install peft)"
        ) from err
    return peft


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def _wrap_lora(lm: nn.Module, settings: LoraSettings, masked: list[str]) -> nn.Module:
    peft = _import_peft()
    targets = settings.target_modules
    if targets is None:
        targets = masked  # peft matches list entries exactly or as name suffixes
    elif isinstance(targets, str):
        re.compile(targets)  # fail early on a bad regex, with Python's message
    conv1d = any(is_conv1d(m) for m in lm.modules())
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=conv1d,  # GPT-2 Conv1D stores [in, out]
    )
    return peft.get_peft_model(lm, config)


def _dropped_fractions(
    peft_model: nn.Module, masked: dict[str, tuple[nn.Parameter, Tensor]]
) -> dict[str, float]:
    """Per masked layer with an adapter: ``||delta on pruned entries|| / ||delta||``."""
    by_weight = {id(w): (name, keep) for name, (w, keep) in masked.items()}
    out: dict[str, float] = {}
    for module in peft_model.modules():
        base = getattr(module, "base_layer", None)
        get_delta = getattr(module, "get_delta_weight", None)
        if base is None or get_delta is None or id(getattr(base, "weight", None)) not in by_weight:
            continue
        name, keep = by_weight[id(base.weight)]
        delta = sum(get_delta(a).float() for a in module.active_adapters)
        total = float(torch.linalg.vector_norm(delta))
        dropped = float(torch.linalg.vector_norm(delta[~keep.to(delta.device)]))
        out[name] = dropped / total if total > 0 else 0.0
    return out


# ------------------------------------------------------------------------------- callbacks
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
    :meth:`MaskedFinetuner.masked_weights`). Frozen weights (LoRA) are skipped.

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


class ExportFinetuned(ExportPruned):
    """At the end of finetuning: save model + tokenizer + the same masks + a report, checked.

    Like :class:`~prox24_lightning.callbacks.ExportPruned` (and a subclass of it, so the CLI
    merges ``--evaluate`` perplexities into ``sparsity_report.json``): written to a temporary
    folder, verified with :func:`~prox24_lightning.artifacts.check_export` (exactly 2:4, agrees
    with the masks, no ``-0.0``/NaN/Inf), then renamed into place. With LoRA the adapters are
    merged and the masks re-applied first (see :meth:`MaskedFinetuner.export_model`).

    Args:
        dirpath: export folder (default: ``<trainer.default_root_dir>/export``).
        overwrite: replace an existing export instead of refusing.
        save_adapter: with LoRA, also save the unmerged adapter to ``<dirpath>/adapter``.
    """

    def __init__(
        self, dirpath: str | None = None, overwrite: bool = False, save_adapter: bool = False
    ) -> None:
        super().__init__(dirpath=dirpath, overwrite=overwrite, print_table=False)
        self.save_adapter = save_adapter

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, MaskedFinetuner):
            raise TypeError(f"ExportFinetuned needs a MaskedFinetuner, got {type(pl_module)}")
        if pl_module.lm is None:
            return
        adapter = self._save_adapter(pl_module)
        # Every rank merges and re-masks, so an evaluation after fit scores the exported model
        # on all of them; only rank 0 writes.
        pl_module.export_model()
        self._export(trainer, pl_module, adapter)
        trainer.strategy.barrier()

    @rank_zero_only
    def _save_adapter(self, pl_module: MaskedFinetuner) -> Path | None:
        if not (self.save_adapter and _is_peft_model(pl_module.lm)):
            return None
        # Saved before merging (merging unloads the adapter); moved into the export below.
        self.dirpath.parent.mkdir(parents=True, exist_ok=True)
        adapter = Path(
            tempfile.mkdtemp(prefix=f".{self.dirpath.name}.adapter.", dir=self.dirpath.parent)
        )
        pl_module.lm.save_pretrained(adapter)
        return adapter

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: Any, adapter: Path | None = None) -> None:
        try:
            self._write(trainer, pl_module, adapter)
        finally:
            if adapter is not None:
                shutil.rmtree(adapter, ignore_errors=True)

    def _write(self, trainer: L.Trainer, pl_module: Any, adapter: Path | None) -> None:
        self.report = build_finetune_report(trainer, pl_module, config=self.run_config)
        verdict = write_export(
            self.dirpath,
            pl_module.lm,
            pl_module.tokenizer,
            pl_module.masks,
            self.report,
            transposed=pl_module.transposed,
            method=pl_module.method,
            adapter=adapter,
        )
        rank_zero_info(f"finetuned export written to {self.dirpath}: {verdict}")
