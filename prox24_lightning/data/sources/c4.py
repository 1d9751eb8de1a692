"""C4 (``allenai/c4``): ``c4``, the first train shard, and ``c4_validation``, the first validation
shard, both evaluated under the C4-validation protocol.

Hub: ``allenai/c4``, file ``en/c4-train.00000-of-01024.json.gz`` (``c4``) or
``en/c4-validation.00000-of-00008.json.gz`` (``c4_validation``). Local: C4-format
``.json``/``.jsonl``/``.json.gz`` (one JSON object a line with ``text``, ``timestamp``, ``url``)
or ``.parquet``; a directory in the hub layout (``en/c4-...json.gz``) means that file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from ..windows import C4_EVAL_DOCUMENTS, C4_EVAL_WINDOWS, c4_validation_windows
from .base import HubDataset, SourceKind, TextSource, register_source

__all__ = ["C4", "C4_HUB_ID", "C4_TRAIN_FILE", "C4_VALIDATION_FILE", "C4Validation"]

C4_HUB_ID = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"


@register_source
class C4(SourceKind):
    """``c4``: the first C4 train shard (the calibration set of Wanda/SparseGPT and the paper)."""

    name: ClassVar[str] = "c4"
    eval_protocol: ClassVar[str] = "c4"
    #: The hub file, and the hub split it is read as.
    hub_file: ClassVar[str] = C4_TRAIN_FILE
    hub_split: ClassVar[str] = "train"

    @classmethod
    def hub_dataset(cls, source: TextSource) -> HubDataset:
        return HubDataset(
            (C4_HUB_ID,),
            {"data_files": {cls.hub_split: cls.hub_file}, "split": cls.hub_split},
            {"id": C4_HUB_ID, "file": cls.hub_file},
        )

    @classmethod
    def hub_layout(cls, source: TextSource) -> Sequence[str]:
        return [cls.hub_file]

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
        """The C4-validation protocol: the first ``max_documents`` (default 1100) documents
        joined with ``" "``, at most ``max_windows`` (default 256) windows."""
        return c4_validation_windows(
            documents,
            tokenizer,
            seqlen=seqlen,
            n_documents=source.max_documents or C4_EVAL_DOCUMENTS,
            n_windows=max_windows if max_windows is not None else C4_EVAL_WINDOWS,
            bos_token_id=bos_token_id,
        )


@register_source
class C4Validation(C4):
    """``c4_validation``: the first C4 validation shard (the reference evaluation set)."""

    name: ClassVar[str] = "c4_validation"
    hub_file: ClassVar[str] = C4_VALIDATION_FILE
    hub_split: ClassVar[str] = "validation"

    @classmethod
    def eval_tokens(cls, source: TextSource, *, seqlen: int, max_windows: int | None) -> int | None:
        """The protocol's 256 windows, or ``max_windows`` if fewer."""
        windows = C4_EVAL_WINDOWS if max_windows is None else min(max_windows, C4_EVAL_WINDOWS)
        return windows * seqlen
