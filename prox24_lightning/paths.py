"""Where the project keeps its on-disk caches: one rule for the token cache and the GGUF cache.

The root is ``$PROX24_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/prox24_lightning``, else
``~/.cache/prox24_lightning``. The token cache (:mod:`prox24_lightning.data`) lives under the root;
converted GGUF models (:mod:`prox24_lightning.models`) under ``<root>/converted``, where the root
ignores ``$PROX24_CACHE_DIR`` (as it always has: that variable only moves the token cache).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_DIR_ENV", "default_cache_dir"]

#: Environment variable that moves the token cache root.
CACHE_DIR_ENV = "PROX24_CACHE_DIR"


def default_cache_dir(*subdirs: str, use_env: bool = True) -> Path:
    """Root of the project's caches, optionally a folder below it.

    Args:
        subdirs: Path components appended to the root (``"converted"`` for GGUF conversions).
        use_env: Honour ``$PROX24_CACHE_DIR`` (the token cache does, the GGUF cache does not).

    Returns:
        ``$PROX24_CACHE_DIR`` (with ``use_env``), else ``$XDG_CACHE_HOME/prox24_lightning``, else
        ``~/.cache/prox24_lightning``; then ``subdirs``. ``~`` is expanded.
    """
    env = os.environ.get(CACHE_DIR_ENV) if use_env else None
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        root = base / "prox24_lightning"
    return root.joinpath(*subdirs)
