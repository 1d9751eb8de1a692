"""Calibration and evaluation data: text sources, cached tokenisation, the DataModule.

The pure functions (no Lightning) live in :mod:`~prox24_lightning.data.sources` (the source
registry: one class per kind of text source, loading its documents),
:mod:`~prox24_lightning.data.windows` (tokenisation into calibration samples and evaluation
windows) and :mod:`~prox24_lightning.data.cache` (the on-disk token cache, fingerprints,
provenance); :class:`PruningDataModule` wires them into the Lightning life cycle.
"""

from prox24_lightning.data.cache import (
    calibration_samples,
    evaluation_windows,
    source_provenance,
    tokenizer_fingerprint,
)
from prox24_lightning.data.datamodule import (
    PruningDataModule,
    TokenWindows,
    default_validation_sources,
)
from prox24_lightning.data.sources import (
    SOURCES,
    SourceKind,
    TextSource,
    load_documents,
    register_source,
    to_source,
    wiki_offline_path,
)
from prox24_lightning.data.windows import (
    C4_EVAL_DOCUMENTS,
    C4_EVAL_WINDOWS,
    BosMode,
    CalibrationMode,
    c4_validation_windows,
    check_seqlen,
    resolve_bos,
    sample_packed,
    sample_random_windows,
    tokenizer_adds_bos,
    wikitext2_windows,
    windows_from_documents,
)
from prox24_lightning.models.loading import max_positions_from_config
from prox24_lightning.paths import default_cache_dir

__all__ = [
    "C4_EVAL_DOCUMENTS",
    "C4_EVAL_WINDOWS",
    "SOURCES",
    "BosMode",
    "CalibrationMode",
    "PruningDataModule",
    "SourceKind",
    "TextSource",
    "TokenWindows",
    "c4_validation_windows",
    "calibration_samples",
    "check_seqlen",
    "default_cache_dir",
    "default_validation_sources",
    "evaluation_windows",
    "load_documents",
    "max_positions_from_config",
    "register_source",
    "resolve_bos",
    "sample_packed",
    "sample_random_windows",
    "source_provenance",
    "to_source",
    "tokenizer_adds_bos",
    "tokenizer_fingerprint",
    "wiki_offline_path",
    "wikitext2_windows",
    "windows_from_documents",
]
