"""Plain text files (``text``): each whole ``.txt``/``.raw`` file is ONE document.

Not split on blank lines, so long files serve ``random_windows`` sampling. Local files only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from .base import SourceKind, TextSource, register_source

__all__ = ["Text"]


@register_source
class Text(SourceKind):
    """``text``: local plain text files, one document each."""

    name: ClassVar[str] = "text"
    needs_path: ClassVar[bool] = True

    @classmethod
    def load_files(
        cls, source: TextSource, files: list[Path], kind: str, cache_dir: Path, where: str
    ) -> Any:
        if kind != "text":
            raise ValueError(
                f"text source: expects .txt/.raw files, got {where}; use name: json for JSON"
            )
        return [f.read_text(encoding="utf-8") for f in files]
