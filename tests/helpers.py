"""Shared scaffolding of the tests that run the real ``prox24`` CLI on tiny models.

The ``text_files`` fixture built on these lives in ``conftest.py``. Test modules import this file
as ``helpers``: ``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path``.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

#: Vocabulary of the random calibration and evaluation text.
WORDS = (
    "the cat sat on a mat while dogs ran far away and birds sang in trees near the river bank "
    "under a bright sky people walked slowly home after work"
).split()
#: The shorter vocabulary some tests were written with (their text stays as it was).
SHORT_WORDS = WORDS[:16]

#: The paper recipe with an accelerated prox phase and a conjugate-gradient refit; callers add
#: ``refine_steps``.
PROX_SOLVER = {
    "model.solver.recipe": "paper",
    "model.solver.beta": "1.3",
    "model.solver.lambda0": "0.05",
    "model.solver.momentum": "0.9",
    "model.solver.refine": "cg",
}


def random_words(rng: random.Random, n: int, words: Sequence[str] = WORDS) -> str:
    """``n`` words drawn from ``words`` with ``rng``, space separated."""
    return " ".join(rng.choice(words) for _ in range(n))


def callback(class_path: str, **init_args: object) -> list[str]:
    """Append a callback to ``trainer.callbacks``; each ``init_args`` item sets an argument of
    the callback just appended."""
    return [
        f"--trainer.callbacks+={class_path}",
        *(f"--trainer.callbacks.{k}={v}" for k, v in init_args.items()),
    ]


def block_checkpoints(out: Path, overwrite: str = "true") -> list[str]:
    """Per-block mask files in ``out/masks``, block checkpoints in ``out/ckpt``, the export in
    ``out/export``."""
    return [
        *callback("prox24_lightning.callbacks.MaskCheckpoint", dirpath=out / "masks"),
        *callback("prox24_lightning.callbacks.BlockCheckpoint", dirpath=out / "ckpt"),
        *callback(
            "prox24_lightning.callbacks.ExportPruned", dirpath=out / "export", overwrite=overwrite
        ),
    ]


def fit_args(
    model: str | Path,
    out: Path,
    calibration: Path,
    /,
    *,
    method: str | None = "wanda",
    validation: Path | None = None,
    callbacks: Sequence[str] = (),
    **overrides: str | None,
) -> list[str]:
    """Arguments of ``prox24 fit``: the ``BlockwisePruner`` on ``model`` with ``method``, on CPU,
    seed 0, no logger, progress bar, model summary, sanity check or validation epochs, run
    folder ``out``, 4 packed samples of 32 tokens from the text file ``calibration`` (batches of
    2), ``validation`` as the ``held_out`` set (none by default), ``evaluate: none``.

    ``overrides`` are LightningCLI keys (``**{"data.nsamples": "8"}``, ``ckpt_path=...``): they
    replace or add to those settings, and ``None`` drops one. ``callbacks`` come last.
    """
    held_out = {"held_out": {"name": "text", "path": str(validation)}} if validation else {}
    args: dict[str, str | None] = {
        "seed_everything": "0",
        "trainer.accelerator": "cpu",
        "trainer.devices": "1",
        "trainer.max_epochs": "-1",
        "trainer.logger": "false",
        "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
        "trainer.num_sanity_val_steps": "0",
        "trainer.check_val_every_n_epoch": "100000",
        "trainer.default_root_dir": str(out),
        "model": "prox24_lightning.pruner.BlockwisePruner",
        "model.model_name_or_path": str(model),
        "model.method": method,
        "data.calibration": json.dumps({"name": "text", "path": str(calibration)}),
        "data.calibration_mode": "packed",
        "data.nsamples": "4",
        "data.seqlen": "32",
        "data.batch_size": "2",
        "data.validation": json.dumps(held_out),
        "data.cache_dir": str(out / "cache"),
        "evaluate": "none",
    }
    args.update(overrides)
    return ["fit", *(f"--{k}={v}" for k, v in args.items() if v is not None), *callbacks]


def prox24_command() -> list[str]:
    """The installed ``prox24`` console script (``make install`` puts it next to python), or the
    module entry point where it is not installed."""
    exe = Path(sys.executable).with_name("prox24")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "prox24_lightning"]
