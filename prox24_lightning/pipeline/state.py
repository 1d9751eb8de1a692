"""``PruneState``: what a pruning run has done so far, and its checkpoint form.

Per pruned layer: the report row and the bool ``[out, in]`` mask; the layers stored transposed
(GPT-2 ``Conv1D``); the finished blocks; the targeted layers left dense and why; the solves each
rank ran. :meth:`PruneState.to_checkpoint` / :meth:`PruneState.load_checkpoint` move it in and out
of a checkpoint, and :func:`compare_fingerprints` refuses to resume a run of another
configuration. Plain Python and PyTorch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models import OffloadedModel
from ..ops.masks import is_2of4
from ..solvers import PruneResult
from .shards import read_shard, shard_path, write_shard

__all__ = [
    "PruneState",
    "compare_fingerprints",
    "layer_report",
    "restore_pruned_weights",
    "run_fingerprint",
]


@dataclass
class PruneState:
    """The progress of one pruning run (restored on resume)."""

    #: per pruned layer: stats and sparsity, in pruning order.
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per pruned layer: the bool ``[out, in]`` mask (CPU), filled as blocks finish.
    masks: dict[str, Tensor] = field(default_factory=dict)
    #: layers whose module stores the weight as ``[in, out]`` (GPT-2 ``Conv1D``).
    transposed: set[str] = field(default_factory=set)
    #: indices of the blocks already pruned.
    pruned_blocks: set[int] = field(default_factory=set)
    #: targeted layers left dense, with the reason (e.g. input size not divisible by 4).
    skipped: dict[str, str] = field(default_factory=dict)
    #: layer solves run by each rank so far (index = global rank); without DDP, one entry.
    solves_per_rank: list[int] = field(default_factory=list)
    #: per pruned block: the SHA-256 of its shard (:mod:`.shards`), and the shards' folder.
    shards: dict[int, str] = field(default_factory=dict)
    shard_dir: str | None = None

    def record(
        self,
        block: int,
        results: dict[str, PruneResult],
        tokens: dict[str, int],
        transposed: set[str],
    ) -> None:
        """Add a finished block's layers (``tokens``: calibration tokens per layer)."""
        for name, result in results.items():
            self.masks[name] = result.mask.cpu()
            if name in transposed:
                self.transposed.add(name)
            self.report[name] = layer_report(block, result, tokens[name])
        self.pruned_blocks.add(block)

    def is_complete(self, num_blocks: int) -> bool:
        """Every block pruned: only then is there a model to export."""
        return num_blocks > 0 and self.pruned_blocks >= set(range(num_blocks))

    def to_checkpoint(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint entry: the run's position and an index of the block shards. Weights,
        masks and report rows live in the shards, so its size does not grow with the model."""
        return {
            "pruned_blocks": sorted(self.pruned_blocks),
            "shards": {str(k): v for k, v in sorted(self.shards.items())},
            "shard_dir": self.shard_dir,
            "transposed": sorted(self.transposed),
            "skipped": self.skipped,
            "fingerprint": fingerprint,
            "solves_per_rank": self.solves_per_rank,
        }

    def require_masks(self, where: str) -> None:
        """After a resume: every pruned layer has its mask (restored by the mask callback)."""
        missing = [n for n in self.report if n not in self.masks]
        if missing:
            raise ValueError(
                f"{where} holds no masks for the pruned layers {missing[:3]} (written without "
                "the MaskCheckpoint callback?); resume with the callbacks of the first run"
            )

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        """The run's position and shard index (:meth:`apply_shard` then restores each block)."""
        self.report, self.masks = {}, {}
        self.pruned_blocks = set(state.get("pruned_blocks", []))
        self.shards = {int(k): v for k, v in state.get("shards", {}).items()}
        self.shard_dir = state.get("shard_dir")
        self.transposed = set(state.get("transposed", []))
        self.skipped = dict(state.get("skipped", {}))
        self.solves_per_rank = list(state.get("solves_per_rank", []))

    def write_shard(self, block: int, layers: dict[str, nn.Module], run_dir: str | Path) -> None:
        """Block ``block``'s new weights, masks and report rows into its shard, once (call on
        one process: the run folder is shared); the SHA-256 goes into the checkpoint."""
        self.shard_dir = self.shard_dir or str(Path(run_dir) / "blocks")
        names = [n for n in layers if n in self.report and self.report[n]["block"] == block]
        weights = {f"{n}.weight": layers[n].weight for n in names}
        masks = {n: self.masks[n] for n in names}
        rows = {n: self.report[n] for n in names}
        self.shards[block] = write_shard(self.shard_dir, block, weights, masks, rows)

    def apply_shards(
        self,
        run_dir: str | Path,
        model: nn.Module | None,
        offloaded: OffloadedModel | None,
        check: Callable[[dict[str, Tensor], str], None],
    ) -> None:
        """After :meth:`load_checkpoint`: each pruned block's shard (SHA-256 checked) into the
        model (the CPU store with offload), the masks (``check``-ed) and the report.

        The run folder is the unit: its own ``blocks/`` first (a copied or moved run resumes
        from its copy), the recorded folder otherwise.
        """
        here = Path(run_dir) / "blocks"
        folder = self.shard_dir = str(here) if here.is_dir() else self.shard_dir or str(here)
        for k in sorted(self.pruned_blocks):
            weights, masks, rows = read_shard(folder, k, self.shards.get(k))
            restore_pruned_weights({}, weights, model, offloaded, in_place=True)
            self.masks.update(masks)
            self.report.update(rows)
            check(masks, f"block shard {shard_path(folder, k)}")


def compare_fingerprints(saved: dict[str, Any], now: dict[str, Any], where: str) -> None:
    """Refuse to resume from ``where`` when a setting that decides the masks differs."""
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


def layer_report(block: int, result: PruneResult, tokens: int) -> dict[str, Any]:
    """One row of ``sparsity_report.json``'s ``layers``."""
    w = result.weight
    s = result.stats
    return {
        "block": block,
        "shape": list(w.shape),
        "sparsity": float((w == 0).float().mean()),
        "is_2of4": is_2of4(w),
        "calibration_tokens": tokens,
        **{f: v for f, v in s.as_dict().items() if f != "extra"},
        "lipschitz": s.extra.get("lipschitz"),
        # recorded by the process that ran the solve (each layer is solved on one rank)
        "solved_by_rank": s.extra.get("solved_by_rank"),
        # the ridge of the layer's objective and the rule that set it (ProxConfig.ridge_shrinkage)
        **({k: s.extra[k] for k in ("ridge", "ridge_rule")} if "ridge" in s.extra else {}),
        # prox: the prox phase's [step, lambda, frac_2of4] rows (a few dozen)
        **({"trace": [list(row) for row in s.extra["trace"]]} if s.extra.get("trace") else {}),
    }


def run_fingerprint(
    settings: dict[str, Any],
    model: nn.Module | None,
    world_size: int | None = None,
    precision: str | None = None,
    calibration: Tensor | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Everything that decides the masks: a checkpoint only resumes a run with equal values.

    ``settings`` are the run's own (model path, method, solver config, targets, ...); the model's
    parameter shapes, the process count, the precision and the calibration tokens are added.
    """
    fp = dict(settings)
    if model is not None:
        shapes = "".join(f"{n}:{tuple(t.shape)};" for n, t in model.state_dict().items())
        fp["model_shapes_sha256"] = hashlib.sha256(shapes.encode()).hexdigest()
    if world_size is not None:
        fp["world_size"] = world_size
        fp["precision"] = precision
        if isinstance(calibration, Tensor):
            fp["calibration_tokens"] = list(calibration.shape)
            fp["calibration_sha256"] = hashlib.sha256(
                calibration.contiguous().cpu().numpy().tobytes()
            ).hexdigest()
            fp["batch_size"] = batch_size
    return fp


def restore_pruned_weights(
    checkpoint: dict[str, Any],
    pruned: dict[str, Tensor] | None,
    model: nn.Module | None,
    offloaded: OffloadedModel | None,
    *,
    in_place: bool = False,
) -> None:
    """Put pruned weights (``{"<layer>.weight": tensor}``) into the model and make
    ``checkpoint["state_dict"]`` agree with it.

    ``in_place`` copies ``pruned`` straight into the model's tensors (the CPU store with
    offload), one shard at a time. Otherwise the checkpoint's ``state_dict`` is completed for
    Lightning's strict ``load_state_dict``: without offload its missing ``lm.*`` entries are the
    model's own tensors (no copy), with offload the ``lm.*`` entries are dropped (the offloaded
    model is not a submodule).
    """
    if in_place:
        params = dict(model.state_dict()) if offloaded is None and model is not None else {}
        with torch.no_grad():
            for name, tensor in (pruned or {}).items():
                if offloaded is not None:
                    offloaded.store[offloaded.key(name)].copy_(tensor)
                else:
                    params[name].copy_(tensor)
        return
    sd = checkpoint.setdefault("state_dict", {})
    if offloaded is not None:
        for k in [k for k in sd if k.startswith("lm.")]:
            del sd[k]
    elif model is not None:
        for name, tensor in model.state_dict().items():
            sd.setdefault(f"lm.{name}", tensor)
        sd.update({f"lm.{name}": tensor for name, tensor in (pruned or {}).items()})
