"""Calibration and evaluation data: text sources, cached tokenisation, the DataModule.

:mod:`prox24_lightning.data.sources` holds the pure functions (no Lightning);
:class:`PruningDataModule` wires them into the Lightning life cycle.
"""

from prox24_lightning.data.datamodule import (
    PruningDataModule,
    TokenWindows,
    default_validation_sources,
)
from prox24_lightning.data.sources import (
    C4_EVAL_DOCUMENTS,
    C4_EVAL_WINDOWS,
    CalibrationMode,
    TextSource,
    c4_validation_windows,
    calibration_samples,
    check_seqlen,
    default_cache_dir,
    evaluation_windows,
    load_documents,
    max_positions_from_config,
    sample_packed,
    sample_random_windows,
    source_provenance,
    to_source,
    tokenizer_fingerprint,
    wiki_offline_path,
    wikitext2_windows,
    windows_from_documents,
)

__all__ = [
    "C4_EVAL_DOCUMENTS",
    "C4_EVAL_WINDOWS",
    "CalibrationMode",
    "PruningDataModule",
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
    "sample_packed",
    "sample_random_windows",
    "source_provenance",
    "to_source",
    "tokenizer_fingerprint",
    "wiki_offline_path",
    "wikitext2_windows",
    "windows_from_documents",
]
