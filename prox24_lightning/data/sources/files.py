"""Local files of a text source: file types, resolving ``path``, UTF-8 checks, tables, hashes.

Plain helpers shared by every source kind (:mod:`~prox24_lightning.data.sources.base`); they know
no source by name. A source appears here only as the :class:`TextSource` whose ``name`` prefixes
the error messages and whose ``text_field`` names a table's text column.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import TextSource

__all__ = [
    "JSON_SUFFIXES",
    "PARQUET_SUFFIXES",
    "TEXT_SUFFIXES",
    "describe",
    "file_kind",
    "load_table",
    "not_utf8",
    "resolve_path",
]

JSON_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz")
TEXT_SUFFIXES = (".txt", ".raw", ".text")
PARQUET_SUFFIXES = (".parquet",)


def file_kind(path: Path) -> str:
    """``json``, ``parquet`` or ``text`` from the file name; ``ValueError`` for anything else."""
    name = path.name.lower()
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise ValueError(
        f"unsupported file type: {path} (expected {JSON_SUFFIXES + PARQUET_SUFFIXES}"
        f" or {TEXT_SUFFIXES})"
    )


def describe(files: list[Path]) -> str:
    """The files as an error message names them: the first three, then ``...``."""
    return ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")


def resolve_path(source: TextSource, hub_layout_file: Callable[[Path], Path | None]) -> list[Path]:
    """``source.path`` (file, glob or directory) as a sorted list of non-empty files.

    ``hub_layout_file(directory)`` is the file a hub snapshot directory holds for this source,
    or ``None``: a directory with the hub layout means that one file, any other directory every
    supported file in it.
    """
    assert source.path is not None
    raw = os.path.expanduser(source.path)
    path = Path(raw)
    if any(ch in raw for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(raw)) if Path(p).is_file()]
        if not files:
            raise FileNotFoundError(f"{source.name} source: no file matches {source.path!r}")
    elif path.is_dir():
        hub_file = hub_layout_file(path)
        if hub_file is not None:
            files = [hub_file]
        else:
            files = []
            for f in sorted(path.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    try:
                        file_kind(f)
                    except ValueError:
                        continue
                    files.append(f)
            if not files:
                raise FileNotFoundError(
                    f"{source.name} source: no .json/.jsonl/.json.gz/.parquet/.txt/.raw "
                    f"file in directory {path}"
                )
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{source.name} source: file not found: {path}")
    return files


def _first_bad_utf8(path: Path) -> tuple[int, int] | None:
    """``(offset, byte)`` of the first byte of ``path`` that is not UTF-8 (gzip files: in the
    decompressed text), or ``None``. Only called once something failed, so it may read it all."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        while True:
            chunk = fh.read(2**20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                # err.start counts from the decoder's buffered bytes, which precede this chunk.
                buffered = len(err.object) - len(chunk)
                return offset - buffered + err.start, err.object[err.start]
            if not chunk:
                return None
            offset += len(chunk)


def not_utf8(source: TextSource, files: list[Path]) -> ValueError:
    """The error for a local source with non-UTF-8 text, naming the file and the byte."""
    for f in files:
        if f.name.lower().endswith(PARQUET_SUFFIXES):
            continue
        bad = _first_bad_utf8(f)
        if bad is not None:
            offset, byte = bad
            where = "of the decompressed text " if f.name.lower().endswith(".gz") else ""
            return ValueError(
                f"{source.name} source: {f} is not UTF-8 text (byte 0x{byte:02x} at offset "
                f"{offset} {where}does not decode); re-encode it as UTF-8, e.g. "
                f"`iconv -f latin1 -t utf-8`"
            )
    return ValueError(f"{source.name} source: text that is not valid UTF-8 in {describe(files)}")


def load_table(files: list[Path], kind: str, source: TextSource, cache_dir: Path) -> Any:
    """JSON lines or parquet ``files`` as a ``datasets.Dataset`` with a valid UTF-8 text column."""
    import datasets

    # Local files get their Arrow copy under our cache dir, not in the user's global HF cache.
    ds = datasets.load_dataset(
        kind,
        data_files=[str(f) for f in files],
        split="train",
        cache_dir=str(cache_dir / "hf_datasets"),
    )
    if source.text_field not in ds.column_names:
        raise ValueError(
            f"{source.name} source: column {source.text_field!r} not found in {files[0]} "
            f"(columns: {ds.column_names}); set `text_field`"
        )
    import pyarrow as pa

    try:
        # The JSON loader stores invalid UTF-8 as it is; reading a row would then raise a bare
        # UnicodeDecodeError during tokenisation. A full validation is one fast C++ pass.
        ds.data.column(source.text_field).validate(full=True)
    except pa.ArrowInvalid:
        raise not_utf8(source, files) from None
    return ds
