"""A pruning run's folder, and the rule that no command silently loses the work in it.

A run keeps its state under ``trainer.default_root_dir``: ``checkpoints/last.ckpt`` (after every
block), ``masks/block_<k>.safetensors``, the block shards (``blocks/``) and ``export/``. Hours of
work live there, so :func:`guard_fit` decides what a ``prox24 fit`` may do with the folder before
anything is loaded:

* a folder holding a partial or finished run, given without ``--ckpt_path``: refused, naming the
  resume command and the explicit way to start over (``--overwrite true`` or another folder);
* ``--ckpt_path last`` (or a path) with nothing to resume: refused, instead of Lightning's fresh
  full run with exit status 0;
* a checkpoint that is not a complete torch file: refused, naming it;
* ``--overwrite true``: the run's own files (``last*.ckpt``, the mask files, the block shards)
  are deleted and the export is replaced at the end.

Nothing here imports Lightning: the CLI passes the folders its callbacks resolved.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunFolder", "RunFolderError", "guard_fit"]


class RunFolderError(RuntimeError):
    """A run folder that the requested command would lose work in, or cannot resume from."""


@dataclass(frozen=True)
class RunFolder:
    """Where one run's files live (the callbacks' resolved folders).

    Attributes:
        root: ``trainer.default_root_dir``.
        checkpoints: the folder of ``last.ckpt`` (``BlockCheckpoint.dirpath``), if any.
        masks: the per-block mask files' folder (``MaskCheckpoint``), if any.
        export: the export folder (``ExportPruned``), if any.
    """

    root: Path
    checkpoints: Path | None = None
    masks: Path | None = None
    export: Path | None = None

    @property
    def shards(self) -> Path:
        """The pruner's block shards (``PruneState.shard_dir`` of a fresh run)."""
        return self.root / "blocks"

    def last_checkpoints(self) -> list[Path]:
        """``last*.ckpt`` files, newest first (the one ``--ckpt_path last`` resumes)."""
        if self.checkpoints is None or not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob("last*.ckpt") if p.is_file()]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def mask_files(self) -> list[Path]:
        if self.masks is None or not self.masks.is_dir():
            return []
        return sorted(self.masks.glob("block_*.safetensors"))

    def has_export(self) -> bool:
        return self.export is not None and self.export.is_dir() and any(self.export.iterdir())


def _progress(folder: RunFolder) -> str:
    blocks = len(folder.mask_files())
    state = (
        f"a finished run (export in {folder.export})" if folder.has_export() else "a partial run"
    )
    return f"{state} with {blocks} pruned block(s)" if blocks else state


def _check_readable(path: Path) -> None:
    # torch.save writes a zip archive; a truncated or foreign file fails here in one line rather
    # than in torch's loader after the model was loaded.
    if not zipfile.is_zipfile(path):
        raise RunFolderError(
            f"checkpoint {path} is damaged or not a torch checkpoint; move it away and resume "
            "from the last good copy, or start over with --overwrite true"
        )


def guard_fit(
    folder: RunFolder, ckpt_path: str | None, *, overwrite: bool, resume_command: str
) -> None:
    """Refuse a ``prox24 fit`` that would lose or fake work (see the module docstring).

    Args:
        folder: The run's folders.
        ckpt_path: ``--ckpt_path`` as given (``None``, ``"last"`` or a file).
        overwrite: ``--overwrite``: start over, deleting the run's own checkpoint, mask and shard
            files.
        resume_command: The command line that resumes this run (for the message).

    Raises:
        RunFolderError: naming the folder, what it holds and the command to run instead.
    """
    lasts = folder.last_checkpoints()
    if overwrite:
        if ckpt_path is not None:
            raise RunFolderError(
                "--overwrite true (start over) and --ckpt_path (resume) contradict each other: drop one"
            )
        for path in [*lasts, *folder.mask_files()]:
            path.unlink()
        shutil.rmtree(folder.shards, ignore_errors=True)
        return
    if ckpt_path is None:
        start_over = "add --overwrite true, or choose another --trainer.default_root_dir"
        if folder.has_export():
            raise RunFolderError(
                f"{folder.root} holds {_progress(folder)}; nothing was changed.\n"
                f"  to prune again: {start_over}"
            )
        if lasts:
            raise RunFolderError(
                f"{folder.root} holds {_progress(folder)}; nothing was changed.\n"
                f"  resume it:  {resume_command}\n"
                f"  start over: {start_over}"
            )
        return
    if ckpt_path == "last":
        if not lasts:
            where = folder.checkpoints or folder.root
            raise RunFolderError(
                f"--ckpt_path last: nothing to resume in {where} (no last.ckpt); drop "
                "--ckpt_path to start a new run"
            )
        _check_readable(lasts[0])
        return
    if ckpt_path in ("best", "hpc", "registry"):
        return
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise RunFolderError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    _check_readable(path)
