"""WikiText2 (``wikitext2``): the reference perplexity set, evaluated on its joined test split.

Hub: ``Salesforce/wikitext``, config ``wikitext-2-raw-v1``, split ``split`` (default ``test``).
Local: a ``wiki.test.raw``-style text file (one row a line, exactly as the hub rows) or
parquet/JSON with a ``text`` column; a directory in the hub layout
(``wikitext-2-raw-v1/test-00000-of-00001.parquet``) or the original zip's (``wiki.test.raw``)
means that file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from .base import HubDataset, SourceKind, TextSource, register_source

__all__ = ["WIKITEXT2_CONFIG", "WIKITEXT2_TEST_TOKENS", "WIKITEXT_HUB_ID", "WikiText2"]

WIKITEXT_HUB_ID = "Salesforce/wikitext"
WIKITEXT2_CONFIG = "wikitext-2-raw-v1"
#: WikiText2 test tokens with the Llama-2 tokenizer (other tokenizers differ by some percent).
WIKITEXT2_TEST_TOKENS = 341_469


@register_source
class WikiText2(SourceKind):
    """``wikitext2``: WikiText-2 raw; the evaluation protocol is the default (rows joined with
    ``"\\n\\n"``, every full window)."""

    name: ClassVar[str] = "wikitext2"
    has_split: ClassVar[bool] = True

    @classmethod
    def hub_dataset(cls, source: TextSource) -> HubDataset:
        split = source.split or "test"
        return HubDataset(
            (WIKITEXT_HUB_ID, WIKITEXT2_CONFIG),
            {"split": split},
            {"id": WIKITEXT_HUB_ID, "config": WIKITEXT2_CONFIG, "split": split},
        )

    @classmethod
    def hub_layout(cls, source: TextSource) -> Sequence[str]:
        split = source.split or "test"
        short = {"validation": "valid"}.get(split, split)
        return [
            f"{WIKITEXT2_CONFIG}/{split}-00000-of-00001.parquet",
            f"{split}-00000-of-00001.parquet",
            f"wiki.{short}.raw",
        ]

    @classmethod
    def load_files(
        cls, source: TextSource, files: list[Path], kind: str, cache_dir: Path, where: str
    ) -> Any:
        """Raw text files as the hub's rows; tables as the default."""
        if kind == "text":
            return _wikitext_rows(files)
        return super().load_files(source, files, kind, cache_dir, where)

    @classmethod
    def eval_tokens(cls, source: TextSource, *, seqlen: int, max_windows: int | None) -> int | None:
        """The test split's full windows (Llama-2 tokenizer count), or ``max_windows`` if
        fewer."""
        windows = WIKITEXT2_TEST_TOKENS // seqlen
        if max_windows is not None:
            windows = min(max_windows, windows)
        return windows * seqlen


def _wikitext_rows(files: list[Path]) -> list[str]:
    """Rows of a raw WikiText file exactly as the hub dataset holds them.

    The hub's ``wikitext`` builder yields each line with its newline, and ``""`` for lines that
    are only whitespace; the evaluation protocol joins these rows with ``"\\n\\n"``.
    """
    rows: list[str] = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            rows.extend(line if line.strip() else "" for line in fh)
    return rows
