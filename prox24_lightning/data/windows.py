"""Tokenisation of documents into windows: calibration samples and evaluation windows.

Everything here is a plain function of (documents, tokenizer, sizes) and returns CPU
``LongTensor`` objects; nothing imports Lightning and nothing is cached (see
:mod:`prox24_lightning.data.cache`).

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
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "C4_EVAL_DOCUMENTS",
    "C4_EVAL_WINDOWS",
    "CalibrationMode",
    "c4_validation_windows",
    "check_seqlen",
    "sample_packed",
    "sample_random_windows",
    "wikitext2_windows",
    "windows_from_documents",
]

CalibrationMode = Literal["packed", "random_windows"]

#: Documents and windows of the C4-validation perplexity protocol (Wanda/SparseGPT ``get_c4``).
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256


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
