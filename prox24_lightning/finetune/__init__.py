"""Finetuning a 2:4 export with its masks held fixed (full or LoRA).

After pruning, a short finetune on the language-modelling loss recovers part of the lost
quality, but only if the 2:4 pattern survives it. The pieces, one module each:

* :class:`MaskedFinetuner` (:mod:`.module`, automatic optimisation): loads a pruned export and
  its ``masks.safetensors`` (the masks come from the file, never from ``W == 0``: a kept weight
  can be exactly zero), checks that every mask fits a layer of the model (:mod:`.checks`), trains
  on the causal-LM loss and reports per-set perplexity like
  :class:`~prox24_lightning.pruner.BlockwisePruner`.
* :class:`EnforceMask` (:mod:`.enforce`, callback): zeroes the gradients of pruned entries before
  every optimizer step and writes ``+0.0`` into them after every optimizer step, so AdamW's weight
  decay and moments, mixed precision, gradient accumulation and clipping cannot revive them.
* :class:`ExportFinetuned` (:mod:`.export`, callback): ``save_pretrained`` + tokenizer + the
  *same* masks + a report, written atomically and verified with
  :func:`~prox24_lightning.artifacts.check_export`.

Optional LoRA (:mod:`.lora`, ``pip install prox24_lightning[peft]``) trains adapters instead of
the weights. A merged adapter ``W + B A`` is dense, which destroys the 2:4 pattern. At export the
adapters are therefore merged and the masks **re-applied**, which discards the adapter's update
on pruned entries: the exported model differs slightly from "base + unmerged adapter". The report
gives, per layer, the fraction of the adapter update (Frobenius norm) that re-masking dropped.

Every name is re-exported here: YAML configs name them as ``prox24_lightning.finetune.X``.

Example::

    prox24 fit --config configs/finetune-demo.yaml --evaluate both
"""

from .checks import MaskMismatchError, check_masks_fit
from .enforce import EnforceMask
from .export import ExportFinetuned
from .lora import LoraSettings
from .module import MaskedFinetuner, default_optimizer

__all__ = [
    "EnforceMask",
    "ExportFinetuned",
    "LoraSettings",
    "MaskMismatchError",
    "MaskedFinetuner",
    "check_masks_fit",
    "default_optimizer",
]
