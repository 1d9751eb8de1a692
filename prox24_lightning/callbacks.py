"""Callbacks of the pruning run: mask checkpoints, export with report, sparsity table, and the
atomic checkpoint writer."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor

from .artifacts import atomic_dir, atomic_write, check_export, load_masks, save_masks, write_json
from .faults import maybe_fail
from .ops.masks import pack_mask, unpack_mask

__all__ = [
    "AtomicCheckpointIO",
    "BlockCheckpoint",
    "MaskCheckpoint",
    "ExportPruned",
    "install_atomic_checkpoint_io",
    "library_versions",
]


def library_versions() -> dict[str, str]:
    import datasets
    import lightning
    import numpy
    import safetensors
    import tokenizers
    import torchmetrics
    import transformers

    from . import __version__

    return {
        "prox24_lightning": __version__,
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "datasets": datasets.__version__,
        "torchmetrics": torchmetrics.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def machine_info() -> dict[str, Any]:
    """Where the run happened: bit-identical results are promised on the same machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_devices"] = [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ]
    return info


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic.

    Lightning's ``_atomic_save`` (2.6) streams through an fsspec transaction that writes to the
    system temp folder and *moves* the file into place: across file systems that is a copy, so a
    kill can leave a truncated ``last.ckpt`` under its final name. Here the checkpoint is written
    next to its target, fsynced and renamed with ``os.replace``. Remote paths use the parent
    class. The pruner installs it on its own (see :func:`install_atomic_checkpoint_io`); in YAML
    it can also be given explicitly as ``trainer.plugins``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)


class BlockCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes ``last.ckpt`` after every pruned block (training epoch).

    In Lightning 2.6 a plain ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes
    ``last.ckpt`` only when training ends (``last`` follows top-k saves, and none happen), and it
    skips epochs without optimizer steps (Wanda, SparseGPT, magnitude): a crash would lose every
    block. This subclass saves ``last`` at the end of each epoch, so ``--ckpt_path last``
    resumes at the first unfinished block. Defaults: ``save_last=True, save_top_k=0,
    save_on_train_epoch_end=True``; other arguments are ``ModelCheckpoint``'s.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        save_last: bool | None = True,
        save_top_k: int = 0,
        save_on_train_epoch_end: bool | None = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            save_last=save_last,
            save_top_k=save_top_k,
            save_on_train_epoch_end=save_on_train_epoch_end,
            **kwargs,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_save_on_train_epoch_end(trainer):
            super().on_train_epoch_end(trainer, pl_module)
            return
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        candidates = self._monitor_candidates(trainer)
        every = self._every_n_epochs
        if self.save_top_k != 0 and every >= 1 and (trainer.current_epoch + 1) % every == 0:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)  # no-op unless save_last


def install_atomic_checkpoint_io(strategy: Any) -> None:
    """Replace a strategy's default ``TorchCheckpointIO`` by :class:`AtomicCheckpointIO`
    (custom checkpoint IO plugins are left alone)."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class MaskCheckpoint(L.Callback):
    """Save each block's masks as soon as it is pruned, and keep them in the callback state.

    Writes ``<dirpath>/block_<k>.safetensors`` (bit-packed, atomically) when block ``k`` is done;
    the packed masks are also the callback's ``state_dict`` so a Lightning checkpoint carries
    them and ``--ckpt_path last`` restores them into the pruner.

    Args:
        dirpath: folder for the per-block mask files (default: ``<log dir>/masks``).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._packed: dict[str, dict[str, Any]] = {}

    def _dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "masks"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if hasattr(pl_module, "block_pruned_listeners"):
            listener = self._make_listener(trainer)
            pl_module.block_pruned_listeners.append(listener)

    def _make_listener(self, trainer: L.Trainer):
        def on_block_pruned(block: int, results: dict[str, Any]) -> None:
            masks = {name: r.mask.cpu() for name, r in results.items()}
            for name, m in masks.items():
                self._packed[name] = {"bits": pack_mask(m), "shape": list(m.shape), "block": block}
            if trainer.is_global_zero:
                save_masks(self._dir(trainer) / f"block_{block:03d}.safetensors", masks)

        return on_block_pruned

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a resume the masks come from the checkpoint's callback state.
        if hasattr(pl_module, "masks"):
            for name, m in self.masks().items():
                pl_module.masks.setdefault(name, m)
        if self._packed and hasattr(pl_module, "check_masks"):
            pl_module.check_masks(self.masks(), f"checkpoint {trainer.ckpt_path}")
        if trainer.is_global_zero and self._packed:
            self._verify_files(trainer, pl_module)

    def _verify_files(self, trainer: L.Trainer, pl_module: Any) -> None:
        """On resume: each finished block's mask file must hold the checkpoint's masks (a file
        from another model or run is refused); a missing file is written again."""
        by_block: dict[int, dict[str, Tensor]] = {}
        for name, m in self.masks().items():
            by_block.setdefault(int(self._packed[name]["block"]), {})[name] = m
        for block, masks in sorted(by_block.items()):
            path = self._dir(trainer) / f"block_{block:03d}.safetensors"
            if not path.exists():
                save_masks(path, masks)
                continue
            on_disk = load_masks(path)
            if hasattr(pl_module, "check_masks"):
                pl_module.check_masks(on_disk, f"mask file {path}")
            for name, m in masks.items():
                other = on_disk.get(name)
                if other is None:
                    detail = "missing from the file"
                elif other.shape != m.shape:
                    detail = f"shape {tuple(other.shape)} in the file, {tuple(m.shape)} resumed"
                elif not torch.equal(other, m):
                    detail = "different mask bits"
                else:
                    continue
                raise ValueError(
                    f"mask file {path} does not match the checkpoint being resumed at layer "
                    f"{name}: {detail}; it comes from another run or model: move it away or "
                    "use another dirpath"
                )

    def masks(self) -> dict[str, Tensor]:
        return {n: unpack_mask(p["bits"], tuple(p["shape"])) for n, p in self._packed.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self._packed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._packed = dict(state_dict.get("masks", {}))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ExportPruned(L.Callback):
    """At the end of pruning: ``save_pretrained`` + tokenizer + masks + report, then a check.

    The folder holds dense weights with exact ``+0.0`` zeros (loads anywhere as a normal model;
    nothing 2:4-specific is written into ``config.json``), ``masks.safetensors`` (bit-packed) and
    ``sparsity_report.json`` (per layer: sparsity, is-2:4, iterations, lambda, local losses,
    seconds, for prox the prox phase's ``trace`` of ``[step, lambda, frac_2of4]`` rows; plus the
    run's config and library versions). It is written to a temporary folder
    and renamed, then verified with :func:`~prox24_lightning.artifacts.check_export`.

    Args:
        dirpath: export folder (default: ``<trainer.default_root_dir>/export``).
        overwrite: replace an existing export instead of refusing.
        print_table: print the per-layer sparsity table at the end.
    """

    def __init__(
        self, dirpath: str | None = None, overwrite: bool = False, print_table: bool = True
    ) -> None:
        self._dirpath = Path(dirpath) if dirpath else None
        self.overwrite = overwrite
        self.print_table = print_table
        self.report: dict[str, Any] = {}
        #: the full run config (set by the ``prox24`` CLI), recorded in the report.
        self.run_config: dict[str, Any] | None = None
        self._root: Path | None = None

    @property
    def dirpath(self) -> Path:
        if self._dirpath is not None:
            return self._dirpath
        if self._root is None:
            raise RuntimeError("ExportPruned has no dirpath before Trainer.setup")
        return self._root / "export"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._root = Path(trainer.default_root_dir)
        listeners = getattr(pl_module, "block_pruned_listeners", None)
        if listeners is not None and not any(getattr(f, "_prox24_trace", False) for f in listeners):
            listeners.append(_trace_listener(pl_module))
        # Refuse before hours of work, not after: an existing export is never silently replaced.
        if stage == "fit" and not self.overwrite and self.dirpath.exists():
            if trainer.ckpt_path is None and any(self.dirpath.iterdir()):
                raise FileExistsError(
                    f"{self.dirpath} already holds an export (or other files); set overwrite: "
                    "true on ExportPruned or choose another dirpath"
                )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "lm", None) is None or not getattr(pl_module, "report", None):
            return
        if not getattr(pl_module, "is_complete", True):
            rank_zero_info(
                f"pruned blocks {sorted(pl_module.pruned_blocks)} of {pl_module.num_blocks}: "
                "no export yet (resume with --ckpt_path last to finish)"
            )
            return
        self._export(trainer, pl_module)
        trainer.strategy.barrier()

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: Any) -> None:
        lm = pl_module.lm
        masks: dict[str, Tensor] = dict(pl_module.masks)
        missing = [n for n in pl_module.report if n not in masks]
        if missing:
            raise RuntimeError(f"no masks for pruned layers {missing[:3]}...; cannot export")
        self.report = build_report(trainer, pl_module, config=self.run_config)
        # An offloaded model holds meta placeholders; ``full_model`` puts its real weights back.
        full_model = getattr(pl_module, "full_model", None)
        with atomic_dir(self.dirpath, overwrite=True) as tmp:
            with full_model() if callable(full_model) else nullcontext():
                lm.save_pretrained(tmp, safe_serialization=True)
            if pl_module.tokenizer is not None:
                pl_module.tokenizer.save_pretrained(tmp)
            save_masks(
                tmp / "masks.safetensors",
                masks,
                transposed=set(getattr(pl_module, "transposed", set())),
                method=str(pl_module.method),
            )
            write_json(tmp / "sparsity_report.json", self.report)
            result = check_export(tmp)
            if not result.ok:
                raise RuntimeError(f"export check failed: {result.verdict()}")
            maybe_fail("export")
        rank_zero_info(f"export written to {self.dirpath}: {result.verdict()}")
        if self.print_table:
            print(format_table(self.report))

    def update_report(self, **fields: Any) -> None:
        """Merge ``fields`` (e.g. perplexities measured after fit) into the written report."""
        path = self.dirpath / "sparsity_report.json"
        if not path.exists():
            return
        report = json.loads(path.read_text())
        report.update(fields)
        write_json(path, report)
        self.report = report


def _trace_listener(pl_module: Any) -> Any:
    """A ``block_pruned_listeners`` entry that copies each prox layer's prox-phase trace
    (``PruneStats.extra["trace"]``: ``[step, lambda, frac_2of4]`` rows) into the pruner's
    per-layer report, so ``sparsity_report.json`` has ``layers[<name>]["trace"]``. The report is
    checkpointed by the pruner, so the traces survive ``--ckpt_path last``."""

    def record_traces(block: int, results: dict[str, Any]) -> None:
        report = getattr(pl_module, "report", None)
        if not isinstance(report, dict):
            return
        for name, result in results.items():
            trace = getattr(getattr(result, "stats", None), "extra", {}).get("trace")
            if trace and isinstance(report.get(name), dict):
                report[name].setdefault("trace", [list(row) for row in trace])

    record_traces._prox24_trace = True  # type: ignore[attr-defined]
    return record_traces


_DATA_KEYS = (
    "tokenizer_name",
    "calibration",
    "calibration_mode",
    "nsamples",
    "seqlen",
    "seed",
    "batch_size",
    "validation",
    "eval_seqlen",
    "max_eval_windows",
    "eval_batch_size",
)


def _data_report(dm: Any) -> dict[str, Any]:
    """The data settings, and what each source read: local files with their SHA-256, or the hub
    dataset; plus a hash of the calibration tokens actually used."""
    from dataclasses import asdict, is_dataclass

    from .data.sources import source_provenance

    data: dict[str, Any] = {}
    for key in _DATA_KEYS:
        if hasattr(dm, key):
            value = getattr(dm, key)
            if is_dataclass(value) and not isinstance(value, type):
                value = asdict(value)
            elif isinstance(value, dict):
                value = {k: asdict(v) if is_dataclass(v) else v for k, v in value.items()}
            data[key] = value
    sources: dict[str, Any] = {}
    if getattr(dm, "calibration", None) is not None:
        sources["calibration"] = dm.calibration
    for name, src in (getattr(dm, "validation", None) or {}).items():
        sources[f"validation/{name}"] = src
    files: dict[str, Any] = {}
    for name, src in sources.items():
        try:
            files[name] = source_provenance(src)
        except (OSError, ValueError) as err:  # a source that vanished after the run read it
            files[name] = {"error": str(err)}
    data["files"] = files
    tokens = getattr(dm, "calibration_data", None)
    if isinstance(tokens, Tensor):
        data["calibration_tokens"] = list(tokens.shape)
        data["calibration_tokens_sha256"] = hashlib.sha256(
            tokens.contiguous().cpu().numpy().tobytes()
        ).hexdigest()
    return data


def build_report(
    trainer: L.Trainer, pl_module: Any, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``sparsity_report.json`` contents: per-layer stats, a summary, and everything needed to
    reproduce the run (config, seed, data files and hashes, library versions, machine)."""
    layers = pl_module.report
    total = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    zeros = sum(v["sparsity"] * v["shape"][0] * v["shape"][1] for v in layers.values())
    dm = getattr(trainer, "datamodule", None)
    dead = {n: int(v.get("dead_features", 0)) for n, v in layers.items()}
    skipped = dict(getattr(pl_module, "skipped", {}) or {})
    seed = os.environ.get("PL_GLOBAL_SEED")
    return {
        "model": pl_module.model_name_or_path,
        "method": pl_module.method,
        "seed": int(seed) if seed is not None and seed.lstrip("-").isdigit() else seed,
        "hparams": dict(pl_module.hparams),
        "fingerprint": pl_module.fingerprint() if hasattr(pl_module, "fingerprint") else None,
        "config": config,
        "trainer": {
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "accelerator": type(trainer.accelerator).__name__,
        },
        "data": _data_report(dm) if dm is not None else {},
        "versions": library_versions(),
        "machine": machine_info(),
        "summary": {
            "layers": len(layers),
            "all_2of4": all(v["is_2of4"] for v in layers.values()),
            "sparsity": zeros / total if total else 0.0,
            "loss_final_sum": sum(v["loss_final"] for v in layers.values()),
            # The layers of a block are solved in lockstep (one optimizer step advances all), so a
            # layer's seconds span its whole block: the solver time is the sum of block maxima.
            "solver_seconds": sum(
                max(v["seconds"] for v in layers.values() if v["block"] == b)
                for b in {v["block"] for v in layers.values()}
            ),
            "dead_features": sum(dead.values()),
            "layers_with_dead_features": sorted(n for n, d in dead.items() if d),
            "forced_2of4": sorted(n for n, v in layers.items() if v.get("forced_2of4")),
            "skipped_layers": skipped,
            "solves_per_rank": list(getattr(pl_module, "solves_per_rank", []) or []),
        },
        "layers": layers,
    }


def format_table(report: dict[str, Any]) -> str:
    rows = [
        "| layer | shape | sparsity | 2:4 | iters | lambda | loss before GD | loss after | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in report["layers"].items():
        rows.append(
            f"| {name} | {v['shape'][0]}x{v['shape'][1]} | {v['sparsity']:.3f} | "
            f"{'yes' if v['is_2of4'] else 'NO'} | {v['iterations_to_2of4']} | "
            f"{v['final_lambda']:.3g} | {v['loss_method']:.4g} | {v['loss_final']:.4g} | "
            f"{v['seconds']:.2f} |"
        )
    s = report["summary"]
    rows.append(
        f"\n{s['layers']} layers, sparsity {s['sparsity']:.4f}, all 2:4: {s['all_2of4']}, "
        f"summed local loss {s['loss_final_sum']:.4g}, solver time {s['solver_seconds']:.1f} s"
    )
    if s.get("dead_features"):
        rows.append(
            f"{s['dead_features']} dead input features (never active on the calibration data) "
            f"in {len(s['layers_with_dead_features'])} layers; pruned first"
        )
    if s.get("skipped_layers"):
        rows.append(f"left dense: {', '.join(s['skipped_layers'])}")
    return "\n".join(rows)


__all__ += ["build_report", "format_table", "load_masks", "_sha256"]
