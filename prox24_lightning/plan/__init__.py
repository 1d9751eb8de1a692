"""``prox24 plan``: what a pruning run needs (accelerator memory, host RAM, disk), from the
model's config alone, and the disk check ``prox24 fit`` makes before it loads anything.

The package's modules:

* :mod:`~prox24_lightning.plan.shapes`: the model's blocks, targeted layers and shared inputs,
  built from its config on the ``meta`` device (no weights are read);
* :mod:`~prox24_lightning.plan.estimate`: the formulas (in its docstring), :class:`RunSettings`
  and :class:`RunPlan` (the figures and their table);
* :mod:`~prox24_lightning.plan.runconfig`: :func:`plan_from_config`, the plan of a ``prox24 fit``
  config;
* this module: the disk refusal and :func:`plan_before_fit` (the start of ``prox24 fit``). Every
  public name of the package is importable from here. The ``prox24 plan`` command lives with the
  CLI (:mod:`prox24_lightning.command`), so this package never imports the CLI.

:func:`check_disk` refuses a run whose output disk (the filesystem of the root folder, found by
walking up to an existing parent) cannot hold the checkpoints and the export; the free space is
read by :func:`free_bytes` (patched in the tests).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .estimate import GB, RunPlan, RunSettings, plan_run
from .runconfig import _as_dict, plan_from_config
from .shapes import (
    BlockShape,
    LayerShape,
    ModelShape,
    load_model_config,
    model_shape,
    resolve_dtype,
)

__all__ = [
    "BlockShape",
    "InsufficientDiskSpace",
    "LayerShape",
    "ModelShape",
    "RunPlan",
    "RunSettings",
    "check_disk",
    "existing_parent",
    "free_bytes",
    "load_model_config",
    "model_shape",
    "plan_before_fit",
    "plan_from_config",
    "plan_run",
    "resolve_dtype",
]


class InsufficientDiskSpace(RuntimeError):
    """The output disk cannot hold a run's checkpoints and export."""


def existing_parent(path: str | os.PathLike[str]) -> Path:
    """``path`` or its nearest existing parent (the folder whose filesystem will hold it)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the filesystem of ``path`` (an existing path; tests patch this)."""
    return shutil.disk_usage(path).free


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:.1f} GB ({nbytes:,} bytes)"


def check_disk(plan: RunPlan, root: str | os.PathLike[str], *, resume: bool = False) -> int:
    """Refuse a run whose output disk cannot hold its checkpoints and export.

    The filesystem is that of ``root`` (``trainer.default_root_dir``), found by walking up to an
    existing parent. On a resume the files already under ``root`` count as written (they are part
    of what the run needs), so a run that filled most of its disk can still finish.

    Returns:
        The free bytes.

    Raises:
        InsufficientDiskSpace: naming the bytes needed (checkpoints, export) and free.
    """
    where = existing_parent(root)
    free = free_bytes(where)
    written = _tree_bytes(Path(root)) if resume and Path(root).is_dir() else 0
    needed = plan.disk_needed
    if free + written < needed:
        credit = f"; {_gb(written)} of it already written" if written else ""
        raise InsufficientDiskSpace(
            f"not enough disk space for this run under {root} (filesystem of {where}): it needs "
            f"{_gb(needed)} (checkpoints {plan.checkpoint_bytes / GB:.1f} GB + export "
            f"{plan.export_bytes / GB:.1f} GB{credit}), {_gb(free)} free. Free some space or "
            "point trainer.default_root_dir to a larger disk (`prox24 plan` prints the details)"
        )
    return free


def plan_before_fit(run_config: Any, log: Callable[[str], None] = print) -> RunPlan | None:
    """At the start of ``prox24 fit``, before anything is loaded: log the plan and check the
    output disk (:func:`check_disk`). A model that is not a ``BlockwisePruner`` is not planned;
    a config that cannot be read is reported and the run goes on (loading will say more).

    Raises:
        InsufficientDiskSpace: when the output disk cannot hold the checkpoints and export.
    """
    cfg = _as_dict(run_config)
    try:
        plan = plan_from_config(cfg)
    except FileNotFoundError:
        raise  # a missing model: the run would fail on it too, so say so now and only once
    except Exception as err:  # noqa: BLE001 - a plan must never break a run it cannot size
        warnings.warn(
            f"could not plan the run ({type(err).__name__}: {err}); disk not checked", stacklevel=2
        )
        return None
    if plan is None:
        return None
    log(plan.table())
    root = (cfg.get("trainer") or {}).get("default_root_dir") or os.getcwd()
    check_disk(plan, root, resume=cfg.get("ckpt_path") is not None)
    return plan
