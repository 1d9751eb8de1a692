"""Atomic file writes, mask (de)serialisation and the file hash (no Lightning here).

Every artifact is written to a temporary name in the same directory and renamed with
``os.replace``, so a crash can never leave a half-written file under the final name. Temporary
files left behind by a killed process (``.<name>.<random>.tmp``) are removed by the next write of
the same target. A write that fails because the disk is full raises
``OSError(ENOSPC, "no space left on device while writing <path>")`` naming the target, whatever
the writer's own wording (torch.save says ``basic_ios::clear: iostream error``). The export
checker is :mod:`prox24_lightning.check`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .faults import maybe_fail
from .ops.masks import pack_mask, unpack_mask

__all__ = [
    "atomic_write",
    "atomic_dir",
    "file_sha256",
    "save_masks",
    "load_masks",
    "write_json",
]


#: Temporary files older than this process were left by a killed writer: safe to delete.
_PROCESS_START = time.time()
# mkstemp/mkdtemp create private (0600/0700) entries; finished artifacts get the usual modes.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _remove_stale_temps(path: Path) -> None:
    """Delete ``.<name>.*.tmp`` siblings of ``path`` (and ``.<name>.old``) made before this
    process started: leftovers of a killed write, never a live one of this process."""
    for stale in [*path.parent.glob(f".{path.name}.*.tmp"), path.with_name(f".{path.name}.old")]:
        try:
            if stale.stat().st_mtime < _PROCESS_START:
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


# Writers that say "disk full" without OSError(ENOSPC): safetensors' Rust I/O error.
_DISK_FULL_WORDS = ("No space left on device", "StorageFull")
# torch.save's C++ stream only says that a write failed; on a full disk it is all one gets.
_WRITE_FAILED_WORDS = ("basic_ios::clear", "iostream error", "file write failed")
# Free space (for this user) below which a vague write failure is taken for a full disk: the
# failed write's temporary file is still there, so a disk that ran full is at (almost) zero.
_FULL_BELOW = 64 * 2**20


class _WriteError(OSError):
    """A write failure already said clearly (an inner atomic write's), passed on unchanged."""


def _write_error(err: BaseException, path: Path) -> OSError | None:
    """The clear error for a failed write of ``path``, or ``None`` to re-raise ``err`` as it is."""
    if isinstance(err, _WriteError):
        return None
    message = str(err)
    full = _WriteError(errno.ENOSPC, f"no space left on device while writing {path}")
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return full
    if any(w in message for w in _DISK_FULL_WORDS):
        return full
    if not any(w in message for w in _WRITE_FAILED_WORDS):
        return None
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    if free < _FULL_BELOW:
        return full
    return _WriteError(errno.EIO, f"write failed while writing {path} ({message})")


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds.

    Raises:
        OSError: ``ENOSPC`` naming ``path`` when the disk is full (see the module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        maybe_fail("write")
        maybe_fail("write" + path.suffix)
        os.replace(tmp, path)
    except Exception as err:  # OSError, torch's RuntimeError, safetensors' SafetensorError
        clear = _write_error(err, path)
        if clear is None:
            raise
        raise clear from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` (renamed) when the block succeeds.

    Raises:
        FileExistsError: If ``path`` holds files and not ``overwrite``.
        OSError: ``ENOSPC`` naming ``path`` when the disk is full.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{path} already holds files (an earlier export?); pass overwrite=True to replace it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except Exception as err:  # OSError, torch's RuntimeError, safetensors' SafetensorError
        clear = _write_error(err, path)
        if clear is None:
            raise
        raise clear from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes: the one content fingerprint of the project's files (block
    shards, token-cache sources, report provenance). Read in 16 MiB chunks, so multi-GB shards
    never sit in memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_masks(
    path: str | os.PathLike[str],
    masks: dict[str, Tensor],
    *,
    transposed: set[str] | frozenset[str] = frozenset(),
    **metadata: str,
) -> None:
    """Bit-packed masks in safetensors: ``<layer>`` (uint8 bits), ``<layer>.shape`` and
    ``<layer>.transposed`` (1 where the module stores its weight as ``[in, out]``, GPT-2's
    ``Conv1D``). Masks are always ``[out, in]``: groups of 4 run along the input dimension."""
    tensors: dict[str, Tensor] = {}
    for name, mask in masks.items():
        tensors[name] = pack_mask(mask.cpu())
        tensors[f"{name}.shape"] = torch.tensor(list(mask.shape), dtype=torch.int64)
        tensors[f"{name}.transposed"] = torch.tensor([int(name in transposed)], dtype=torch.uint8)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "prox24-packed-masks-v1", **metadata})
        _canonical_header(tmp)


def _canonical_header(path: Path) -> None:
    """Sort the JSON header of a safetensors file in place (same length, same offsets), so equal
    contents give byte-identical files: safetensors writes ``__metadata__`` in hash-map order."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
        if len(header) > size:  # pragma: no cover - the compact JSON never grows
            return
        f.seek(8)
        f.write(header.ljust(size, b" "))


def load_masks(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Inverse of :func:`save_masks` (bool ``[out, in]`` masks, ``True`` = kept weight)."""
    return load_masks_with_layout(path)[0]


def load_masks_with_layout(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], set[str]]:
    """Masks plus the names of layers whose stored weight is transposed (``[in, out]``)."""
    raw = load_file(str(path))
    masks, transposed = {}, set()
    for name, t in raw.items():
        if name.endswith((".shape", ".transposed")):
            continue
        masks[name] = unpack_mask(t, tuple(int(s) for s in raw[f"{name}.shape"].tolist()))
        flag = raw.get(f"{name}.transposed")
        if flag is not None and int(flag[0]):
            transposed.add(name)
    return masks, transposed


def write_export(
    dirpath: str | os.PathLike[str],
    model: Any,
    tokenizer: Any,
    masks: dict[str, Tensor],
    report: dict[str, Any],
    *,
    transposed: set[str] | frozenset[str] = frozenset(),
    method: str,
    adapter: Path | None = None,
    before_commit: Any = None,
) -> str:
    """Write a 2:4 export atomically and verify it; returns the checker's verdict.

    The folder holds ``save_pretrained`` weights (dense, exact ``+0.0`` zeros, nothing
    2:4-specific in ``config.json``: it loads anywhere as a normal model), the tokenizer,
    ``masks.safetensors`` and ``sparsity_report.json``; a LoRA ``adapter`` folder is moved in.
    Everything goes to a temporary folder that :func:`~prox24_lightning.check.check_export` must
    accept before it is renamed into place, so a failed or interrupted export leaves nothing
    half-written. ``before_commit`` (if given) is called just before the rename (tests inject
    faults there). Used by both the pruning and the finetuning export.
    """
    from .check import check_export

    with atomic_dir(dirpath, overwrite=True) as tmp:
        if adapter is not None:
            adapter.rename(tmp / "adapter")
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_masks(tmp / "masks.safetensors", masks, transposed=set(transposed), method=method)
        write_json(tmp / "sparsity_report.json", report)
        result = check_export(tmp)
        if not result.ok:
            raise RuntimeError(f"export check failed: {result.verdict()}")
        if before_commit is not None:
            before_commit()
    return result.verdict()
