"""Atomic file writes and the 2:4 export checker (no Lightning here).

Every artifact is written to a temporary name in the same directory and renamed with
``os.replace``, so a crash can never leave a half-written file under the final name. Temporary
files left behind by a killed process (``.<name>.<random>.tmp``) are removed by the next write of
the same target.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    "save_masks",
    "load_masks",
    "write_json",
    "check_export",
    "CheckResult",
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


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds."""
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
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` (renamed) when the block succeeds."""
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


@dataclass
class CheckResult:
    """Outcome of :func:`check_export`."""

    ok: bool
    layers: int = 0
    problems: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        if self.ok:
            return f"OK: {self.layers} layers exactly 2:4, match the masks, no -0.0/NaN/Inf"
        shown = "; ".join(self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        return f"FAIL: {len(self.problems)} problem(s): {shown}{more}"


def check_weights(
    weights: Callable[[str], Tensor | None],
    masks: dict[str, Tensor],
    transposed: set[str] | frozenset[str] = frozenset(),
) -> CheckResult:
    """Check each masked weight: 2:4, equal to its mask's support, no -0.0, NaN or Inf."""
    res = CheckResult(ok=True)
    for name, mask in masks.items():
        w = weights(name)
        if w is None:
            res.problems.append(f"{name}: missing from the checkpoint")
            continue
        if name in transposed:  # GPT-2 Conv1D stores [in, out]
            w = w.T
        if tuple(w.shape) != tuple(mask.shape):
            res.problems.append(f"{name}: shape {tuple(w.shape)} != mask {tuple(mask.shape)}")
            continue
        w = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
        res.layers += 1
        if not bool(torch.isfinite(w).all()):
            res.problems.append(f"{name}: NaN or Inf")
        if bool(torch.signbit(w[w == 0]).any()):
            res.problems.append(f"{name}: holds -0.0")
        if bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) > 2).any()):
            res.problems.append(f"{name}: not 2:4")
        if bool((w[~mask] != 0).any()):
            res.problems.append(f"{name}: non-zero weights outside the mask")
        kept = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        if bool((kept != 2).any()):
            res.problems.append(f"{name}: mask does not keep exactly 2 of 4")
    res.ok = not res.problems
    return res


def check_export(path: str | os.PathLike[str]) -> CheckResult:
    """Verify an export folder: every layer in ``masks.safetensors`` is exactly 2:4 in the saved
    weights, agrees with its mask, and holds no ``-0.0``, NaN or Inf."""
    from safetensors import safe_open

    path = Path(path)
    mask_file = path / "masks.safetensors"
    if not mask_file.is_file():
        return CheckResult(ok=False, problems=[f"{mask_file} not found"])
    masks, transposed = load_masks_with_layout(mask_file)
    files = sorted(path.glob("*.safetensors"))
    files = [f for f in files if f.name != "masks.safetensors"]
    if not files:
        return CheckResult(ok=False, problems=[f"no weight files (*.safetensors) in {path}"])
    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                index[key] = f

    def weight(name: str) -> Tensor | None:
        key = f"{name}.weight"
        if key not in index:
            return None
        with safe_open(str(index[key]), framework="pt") as h:
            return h.get_tensor(key)

    return check_weights(weight, masks, transposed)
