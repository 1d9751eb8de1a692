"""Test-only fault injection: kill this process at a named point, deterministically.

Set ``PROX24_FAULT=<point>:<n>`` and the ``n``-th time (1-based, counted per process) that
:func:`maybe_fail` is called with ``point``, the process sends itself ``SIGKILL``: no exception
handler, ``finally`` block or atexit hook runs, exactly like a crash or an OOM kill. Without the
variable :func:`maybe_fail` does nothing.

Points:

* ``calibration``: each calibration batch (``training_step``), before the block runs on it;
* ``solver``: each solver iteration (after the optimizer step);
* ``write``: every atomic file write, after the temporary file is complete and before the
  rename; ``write<suffix>`` (``write.ckpt``, ``write.safetensors``, ``write.json``) counts only
  files with that suffix;
* ``export``: the export folder is complete (weights, masks, report) but not yet renamed.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV_VAR", "maybe_fail"]

ENV_VAR = "PROX24_FAULT"

_counts: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, int]:
    point, sep, n = spec.rpartition(":")
    if not sep or not point or not n.isdigit() or int(n) < 1:
        raise ValueError(f"{ENV_VAR}={spec!r}: expected <point>:<n> with n >= 1, e.g. solver:3")
    return point, int(n)


def maybe_fail(point: str) -> None:
    """SIGKILL this process if ``$PROX24_FAULT`` names ``point`` and this is its n-th call."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    target, n = _parse(spec)
    if target != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == n:
        os.kill(os.getpid(), signal.SIGKILL)
