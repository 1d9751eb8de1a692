"""``prox24 check``: verify that an export folder is what its report says (no Lightning here).

An export (written by ``ExportPruned`` or ``ExportFinetuned``) holds ``save_pretrained`` weights
(``model.safetensors``, or shards listed in ``model.safetensors.index.json``), the bit-packed
``masks.safetensors`` and ``sparsity_report.json``, whose ``layers`` lists every pruned layer.
:func:`check_export` verifies, collecting every problem rather than stopping at the first:

- every tensor of every weight file is free of NaN and Inf (embeddings and norms too);
- the layers of the report, the masks and the weights agree: a reported layer without a mask, a
  mask without a reported layer, and a mask or reported layer without a weight all fail;
- each pruned weight is exactly 2:4, zero outside its mask, holds no ``-0.0``, and its mask
  keeps exactly 2 of every 4;
- an empty masks file, a missing or unreadable report, and a truncated or corrupt file (named in
  the message) fail with a :class:`CheckResult`, never an exception.

Tensors are read one at a time (``safe_open``) and each mask is unpacked only for its layer, so
checking a 7B export needs memory for about one layer, not for the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .ops.masks import unpack_mask

__all__ = ["CheckResult", "check_export", "check_main", "check_weights"]

MASKS = "masks.safetensors"
REPORT = "sparsity_report.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class CheckResult:
    """Outcome of :func:`check_export` (or :func:`check_weights`).

    Attributes:
        ok: no problem found.
        layers: pruned layers whose weight was checked against its mask.
        problems: one line each, naming the layer, tensor or file.
        tensors: tensors of the weight files scanned for NaN/Inf (0 for :func:`check_weights`).
    """

    ok: bool
    layers: int = 0
    problems: list[str] = field(default_factory=list)
    tensors: int = 0

    def verdict(self) -> str:
        """One line: ``OK: ...`` or ``FAIL: n problem(s): <the first five>``."""
        if self.ok:
            scanned = f"; {self.tensors} tensors" if self.tensors else ""
            return (
                f"OK: {self.layers} layers exactly 2:4, match the masks{scanned}, no -0.0/NaN/Inf"
            )
        shown = "; ".join(self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        return f"FAIL: {len(self.problems)} problem(s): {shown}{more}"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _layer_problems(
    name: str, w: Tensor, mask: Tensor | None, *, check_finite: bool = True
) -> list[str]:
    """What is wrong with the ``[out, in]`` weight ``w`` of a pruned layer (``mask``: its kept
    entries, ``None`` when there is no mask to compare with)."""
    if w.dim() != 2:
        return [f"{name}: weight of shape {tuple(w.shape)} is not a matrix"]
    if mask is not None and tuple(w.shape) != tuple(mask.shape):
        return [f"{name}: shape {tuple(w.shape)} != mask {tuple(mask.shape)}"]
    if w.shape[1] % 4:
        return [f"{name}: {w.shape[1]} input features, not a multiple of 4, cannot be 2:4"]
    problems = []
    if check_finite and not bool(torch.isfinite(w).all()):
        problems.append(f"{name}: NaN or Inf")
    zero = w == 0
    if bool(torch.signbit(w[zero]).any()):
        problems.append(f"{name}: holds -0.0")
    over = (~zero).reshape(w.shape[0], -1, 4).sum(-1) > 2
    if bool(over.any()):
        problems.append(
            f"{name}: not 2:4 ({int(over.sum())} of {over.numel()} groups of 4 keep more than 2 "
            f"non-zeros; {float(zero.float().mean()):.1%} zeros)"
        )
    if mask is not None:
        outside = int((~zero & ~mask).sum())
        if outside:
            problems.append(
                f"{name}: non-zero weights outside the mask ({outside} of {int((~mask).sum())})"
            )
        kept = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        if bool((kept != 2).any()):
            problems.append(f"{name}: mask does not keep exactly 2 of 4")
    return problems


def check_weights(
    weights: Callable[[str], Tensor | None],
    masks: dict[str, Tensor],
    transposed: set[str] | frozenset[str] = frozenset(),
) -> CheckResult:
    """Check each masked weight (``weights(name)``, as stored): 2:4, zero outside its mask, no
    ``-0.0``, NaN or Inf. For in-memory models; :func:`check_export` checks a folder."""
    res = CheckResult(ok=True)
    for name, mask in masks.items():
        w = weights(name)
        if w is None:
            res.problems.append(f"{name}: missing from the checkpoint")
            continue
        w = w.T if name in transposed else w  # GPT-2 Conv1D stores [in, out]
        res.layers += w.dim() == 2 and tuple(w.shape) == tuple(mask.shape)
        res.problems += _layer_problems(name, w, mask)
    res.ok = not res.problems
    return res


# ---------------------------------------------------------------------------------------------
# check_export


def _read_report(folder: Path, problems: list[str]) -> dict[str, dict[str, Any]] | None:
    """The report's ``layers`` (name -> entry), or ``None`` with a problem recorded."""
    path = folder / REPORT
    if not path.is_file():
        problems.append(
            f"{REPORT} not found: every export writes one listing its pruned layers, "
            "so this folder is not a complete export"
        )
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.append(f"{REPORT}: unreadable ({_one_line(err)}); truncated or corrupt?")
        return None
    layers = report.get("layers") if isinstance(report, dict) else None
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        problems.append(f"{REPORT}: no 'layers' table of pruned layers")
        return None
    if not layers:
        problems.append(f"{REPORT}: lists no pruned layers")
    return layers


@dataclass
class _MaskEntry:
    key: str
    shape: tuple[int, ...]
    transposed: bool


def _read_mask_index(handle: Any, problems: list[str]) -> dict[str, _MaskEntry]:
    """Layer -> (packed key, shape, layout) from an open masks file; the bits stay on disk."""
    keys = set(handle.keys())
    entries = {}
    for name in sorted(k for k in keys if not k.endswith((".shape", ".transposed"))):
        try:
            if f"{name}.shape" not in keys:
                raise ValueError(f"no {name}.shape entry")
            shape = tuple(int(s) for s in handle.get_tensor(f"{name}.shape").tolist())
            flag = handle.get_tensor(f"{name}.transposed") if f"{name}.transposed" in keys else None
            transposed = flag is not None and bool(int(flag.reshape(-1)[0]))
        except Exception as err:
            problems.append(f"{MASKS}: entry {name} unreadable ({_one_line(err)})")
            continue
        if len(shape) != 2:
            problems.append(f"{MASKS}: mask {name} has shape {shape}, not a matrix")
            continue
        entries[name] = _MaskEntry(name, shape, transposed)
    return entries


def _load_mask(handle: Any, entry: _MaskEntry) -> Tensor:
    packed = handle.get_tensor(entry.key)
    numel = entry.shape[0] * entry.shape[1]
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"{packed.numel()} {packed.dtype} values do not pack {numel} bits of shape {entry.shape}"
        )
    return unpack_mask(packed, entry.shape)


def _weight_files(folder: Path, problems: list[str]) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files ``from_pretrained`` would load, and the index's key -> file map (if
    sharded). Stray ``*.safetensors`` beside them are problems: they are not what loads."""
    present = {p.name for p in folder.glob("*.safetensors") if p.name != MASKS}
    weight_map: dict[str, str] | None = None
    if (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
        if (folder / INDEX).exists():
            problems.append(f"both {WEIGHTS} and {INDEX}: which weights load is ambiguous")
    elif (folder / INDEX).exists():
        try:
            index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise ValueError("'weight_map' is not a table")
        except Exception as err:
            problems.append(f"{INDEX}: unreadable ({_one_line(err)}); truncated or corrupt?")
            return [folder / f for f in sorted(present)], None
        files = sorted(set(map(str, weight_map.values())))
        for f in files:
            if not (folder / f).is_file():
                problems.append(f"{f}: listed in {INDEX} but not found")
        files = [f for f in files if (folder / f).is_file()]
    else:
        problems.append(f"no {WEIGHTS} or {INDEX} in {folder}: no safetensors weights to check")
        return [], None
    for stray in sorted(present - set(files)):
        problems.append(f"{stray}: not among the weights that load ({', '.join(files)}); stray?")
    return [folder / f for f in files], weight_map


def _tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as h:
        for key in sorted(h.keys()):
            yield key, h.get_tensor(key)


def _nonfinite(key: str, file: str, t: Tensor) -> str | None:
    if not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all()):
        return None
    nan = int(torch.isnan(t).sum())
    return f"{key}: {nan} NaN and {int((~torch.isfinite(t)).sum()) - nan} Inf values (in {file})"


def check_export(path: str | os.PathLike[str]) -> CheckResult:
    """Verify an export folder (see the module docstring); never raises."""
    try:
        return _check_export(Path(path))
    except Exception as err:  # a bug or an OS error: still one clear line, not a traceback
        return CheckResult(ok=False, problems=[f"{path}: check failed ({_one_line(err)})"])


def _check_export(folder: Path) -> CheckResult:
    from safetensors import safe_open

    if not folder.is_dir():
        return CheckResult(
            ok=False, problems=[f"{folder}: no such export folder ({MASKS} not found)"]
        )
    res = CheckResult(ok=True)
    problems = res.problems
    with ExitStack() as stack:
        masks: dict[str, _MaskEntry] = {}
        mask_handle = None
        if not (folder / MASKS).is_file():
            problems.append(f"{MASKS} not found in {folder}")
        else:
            try:
                mask_handle = stack.enter_context(safe_open(str(folder / MASKS), framework="pt"))
                masks = _read_mask_index(mask_handle, problems)
                if not masks and not problems:
                    problems.append(f"{MASKS}: holds no masks (an export has at least one)")
            except Exception as err:
                problems.append(f"{MASKS}: unreadable ({_one_line(err)}); truncated or corrupt?")
        reported = _read_report(folder, problems)
        if reported is not None:
            for name in sorted(set(masks) - set(reported)):
                problems.append(f"{name}: has a mask but is not listed as pruned in {REPORT}")
        files, weight_map = _weight_files(folder, problems)

        pruned = set(masks) | set(reported or ())
        seen: set[str] = set()
        where: dict[str, str] = {}
        unreadable = False
        for file in files:
            try:
                for key, tensor in _tensors(file):
                    res.tensors += 1
                    if key in where:
                        problems.append(f"{key}: in both {where[key]} and {file.name}")
                    where[key] = file.name
                    layer = key.removesuffix(".weight")
                    is_pruned = key.endswith(".weight") and layer in pruned
                    if is_pruned:
                        seen.add(layer)
                    try:
                        if (p := _nonfinite(key, file.name, tensor)) is not None:
                            problems.append(p)
                        if is_pruned:
                            problems += _check_layer(layer, tensor, masks, mask_handle, reported)
                            res.layers += layer in masks
                    except Exception as err:  # not the file's fault: name the tensor
                        problems.append(f"{key}: check failed ({_one_line(err)})")
            except Exception as err:
                unreadable = True
                problems.append(
                    f"{file.name}: unreadable ({_one_line(err)}); truncated or corrupt?"
                )
    if weight_map is not None and not unreadable:
        listed = {k: f for k, f in weight_map.items() if (folder / f).is_file()}
        for key in sorted(k for k, f in listed.items() if where.get(k) != f):
            problems.append(f"{key}: listed in {INDEX} for {weight_map[key]} but not in it")
    if not unreadable:  # a layer may sit in the file that could not be read
        for name in sorted(pruned - seen):
            source = MASKS if name in masks else REPORT
            problems.append(f"{name}: in {source} but no weight {name}.weight in the checkpoint")
    res.ok = not problems
    return res


def _shape(value: Any) -> tuple[int, ...] | None:
    ok = isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)
    return tuple(value) if ok else None


def _check_layer(
    name: str,
    stored: Tensor,
    masks: dict[str, _MaskEntry],
    handle: Any,
    reported: dict[str, dict[str, Any]] | None,
) -> list[str]:
    """Problems of one pruned layer (in the report, the masks, or both)."""
    entry = masks.get(name)
    claim = (reported or {}).get(name)
    shape = _shape(claim.get("shape")) if claim is not None else None
    if entry is not None:
        transposed = entry.transposed
    else:  # no mask to say so: a Conv1D weight is [in, out], the report's shape [out, in]
        transposed = shape is not None and shape != tuple(stored.shape) == shape[::-1]
    w = stored.T if transposed and stored.dim() == 2 else stored
    problems = []
    if claim is not None:
        if shape is None:
            problems.append(f"{name}: {REPORT} gives no valid shape ({claim.get('shape')!r})")
        elif shape != tuple(w.shape):
            problems.append(f"{name}: shape {tuple(w.shape)} != {REPORT} {shape}")
        if claim.get("is_2of4") is False:
            problems.append(f"{name}: {REPORT} says it is not 2:4")
    if entry is None:
        found = _layer_problems(name, w, None, check_finite=False)
        state = "; ".join(p.removeprefix(f"{name}: ") for p in found) or "its weight is 2:4"
        return [
            *problems,
            f"{name}: listed as pruned in {REPORT} but has no mask in {MASKS} ({state})",
        ]
    try:
        mask = _load_mask(handle, entry)
    except Exception as err:
        return [*problems, f"{MASKS}: mask {name} unreadable ({_one_line(err)})"]
    return problems + _layer_problems(name, w, mask, check_finite=False)


def check_main(argv: list[str]) -> int:
    """``prox24 check EXPORT_DIR``: print the verdict; exit status 0 (ok), 1 (problems) or 2
    (usage)."""
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(
            "usage: prox24 check EXPORT_DIR\n\nVerify that every layer in masks.safetensors is "
            "exactly 2:4 in the saved weights, agrees with its mask, and has no -0.0/NaN/Inf."
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    result = check_export(argv[0])
    print(result.verdict())
    return 0 if result.ok else 1
