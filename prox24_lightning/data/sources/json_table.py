"""JSON lines or parquet tables (``json``): one document a row, text in column ``text_field``.

Local files only; this is :class:`~prox24_lightning.data.sources.base.SourceKind`'s default
loading with a required ``path``.
"""

from __future__ import annotations

from typing import ClassVar

from .base import SourceKind, register_source

__all__ = ["JsonTable"]


@register_source
class JsonTable(SourceKind):
    """``json``: local JSON lines or parquet files."""

    name: ClassVar[str] = "json"
    needs_path: ClassVar[bool] = True
