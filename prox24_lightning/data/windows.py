"""Tokenisation of documents into windows: calibration samples and evaluation windows.

Everything here is a plain function of (documents, tokenizer, sizes) and returns CPU
``LongTensor`` objects; nothing imports Lightning and nothing is cached (see
:mod:`prox24_lightning.data.cache`).

**Calibration.** :func:`sample_random_windows` follows Wanda/SparseGPT (``lib/data.py::get_c4``).
``random.Random(seed)`` draws documents until one has more than ``seqlen`` tokens, then draws a
random ``seqlen`` window from it. It consumes the random stream exactly as their
``random.seed(seed)`` loop does, so with the same tokenizer and shard it returns the same samples.
:func:`sample_packed` (the paper's mode) concatenates documents with EOS between them and cuts
consecutive windows. :func:`sample_calibration` runs either mode and also returns the distinct
tokens the windows came from; :func:`calibration_overlap_warning` turns that count into the warning
for windows that must overlap.

**Each document is tokenised at most once** per call, in every mode: ``random_windows`` keeps the
ids of a drawn document (one ``int32`` tensor) for later draws of it, and only the fact that a
document is too short.

**Evaluation.** :func:`wikitext2_windows` follows the WikiText2 protocol: the texts are joined with
``"\\n\\n"``, tokenised once, and cut into ``numel // seqlen`` windows.
:func:`c4_validation_windows` follows the C4 protocol: the first 1100 documents are joined with
``" "``, and the first ``256 * seqlen`` tokens are kept.

**BOS.** Every function takes ``bos_token_id`` (see :func:`resolve_bos`). ``None`` (the default)
is the behaviour above, bit for bit. Given an id, text is tokenised without special tokens and
every window is that id followed by ``seqlen - 1`` content tokens, so each calibration and
evaluation window starts with BOS (not only the first one of a long text) and keeps its length.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor

from ..models.gguf import GGUF_ADD_BOS_ATTR

__all__ = [
    "C4_EVAL_DOCUMENTS",
    "C4_EVAL_WINDOWS",
    "DEFAULT_SEQLEN",
    "resolve_seqlen",
    "BosMode",
    "CalibrationMode",
    "CalibrationWindows",
    "c4_validation_windows",
    "calibration_overlap_warning",
    "check_seqlen",
    "resolve_bos",
    "sample_calibration",
    "sample_packed",
    "sample_random_windows",
    "tokenizer_adds_bos",
    "wikitext2_windows",
    "windows_from_documents",
]

CalibrationMode = Literal["packed", "random_windows"]
BosMode = Literal["auto", "always", "never"]

#: Documents and windows of the C4-validation perplexity protocol (Wanda/SparseGPT ``get_c4``).
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256


#: Window length when none is given (the paper's and the protocols'), capped by the model.
DEFAULT_SEQLEN = 2048


def resolve_seqlen(seqlen: int | None, max_positions: int | None) -> int:
    """The window length a run uses: ``seqlen`` as given, else :data:`DEFAULT_SEQLEN` capped by
    the model's ``max_positions``. ``prox24 fit`` and ``prox24 plan`` both resolve it here."""
    if seqlen is not None:
        return seqlen
    return min(DEFAULT_SEQLEN, max_positions or DEFAULT_SEQLEN)


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


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the model behind ``tokenizer`` expects BOS first.

    A GGUF-loaded tokenizer carries the file's ``tokenizer.ggml.add_bos_token`` (transformers
    drops it; :func:`~prox24_lightning.models.loading.load_tokenizer` keeps it as an attribute),
    which wins when known. Otherwise: the tokenizer's ``add_bos_token`` flag, or its own encoding
    of ``"a"`` starting with ``bos_token_id`` (a post-processor that adds BOS while the flag says
    nothing).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    from_gguf = getattr(tokenizer, GGUF_ADD_BOS_ATTR, None)
    if from_gguf is not None:
        return bool(from_gguf)
    if getattr(tokenizer, "add_bos_token", False) is True:
        return True
    ids = _encode(tokenizer, "a")
    return bool(ids) and ids[0] == bos


def resolve_bos(tokenizer: Any, mode: BosMode) -> int | None:
    """The BOS id to put first in every window, or ``None`` for none.

    Args:
        tokenizer: A Hugging Face tokenizer.
        mode: ``auto`` (BOS when :func:`tokenizer_adds_bos`), ``always`` or ``never``.

    Raises:
        ValueError: For an unknown mode, or ``always`` with a tokenizer without a BOS token.
    """
    if mode not in get_args(BosMode):
        raise ValueError(f"bos must be one of {get_args(BosMode)}, got {mode!r}")
    if mode == "never":
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "always":
        if bos is None:
            raise ValueError(
                "bos='always' but the tokenizer has no BOS token (bos_token_id is None); "
                "use bos='auto' or 'never'"
            )
        return int(bos)
    return int(bos) if tokenizer_adds_bos(tokenizer) else None


def _content_len(seqlen: int, bos_token_id: int | None) -> int:
    """Content tokens per window: ``seqlen``, or ``seqlen - 1`` next to a BOS."""
    if bos_token_id is None:
        return seqlen
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 to hold BOS and a token, got {seqlen}")
    return seqlen - 1


def _with_bos(content: Tensor, bos_token_id: int | None) -> Tensor:
    """``[n, m]`` content windows, BOS column first when ``bos_token_id`` is given."""
    if bos_token_id is None:
        return content
    bos = torch.full((content.shape[0], 1), bos_token_id, dtype=content.dtype)
    return torch.cat([bos, content], dim=1)


# Only the ids are used: no attention mask (a second Python list as long as the ids) or type ids.
_IDS_ONLY = {"verbose": False, "return_attention_mask": False, "return_token_type_ids": False}


def _encode(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    # verbose=False: long evaluation texts exceed model_max_length on purpose; they are cut into
    # windows afterwards, so the tokenizer's "sequence length is longer than" warning is noise.
    return tokenizer(text, add_special_tokens=add_special_tokens, **_IDS_ONLY)["input_ids"]


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, **_IDS_ONLY)["input_ids"]


def _compact(ids: list[int]) -> Tensor:
    """``ids`` as one tensor: ``int32`` (4 bytes a token instead of a Python int's ~36), or
    ``int64`` for ids that do not fit."""
    try:
        return torch.tensor(ids, dtype=torch.int32)
    except RuntimeError:  # an id >= 2**31: torch refuses the overflow rather than wrapping
        return torch.tensor(ids, dtype=torch.long)


class CalibrationWindows(NamedTuple):
    """Calibration windows and the distinct tokens they were drawn from.

    Attributes:
        input_ids: ``LongTensor [nsamples, seqlen]``.
        distinct_tokens: ``random_windows``: the tokens of the distinct documents windows were
            drawn from (for a one-document file, the whole file); windows drawing more than this
            overlap. ``None`` for ``packed``, whose windows never overlap.
    """

    input_ids: Tensor
    distinct_tokens: int | None


def calibration_overlap_warning(
    distinct_tokens: int | None,
    nsamples: int,
    seqlen: int,
    mode: CalibrationMode,
    *,
    bos: bool = False,
    where: str | None = None,
) -> str | None:
    """The warning for calibration windows that must overlap, or ``None``.

    ``random_windows`` draws ``nsamples`` windows of ``seqlen`` tokens (``seqlen - 1`` text tokens
    after a BOS) from the text; when that is more than the distinct tokens the text holds, windows
    overlap and the calibration statistics count the same text several times, without the user
    asking for it. Pure, so a run plan can report it before anything is tokenised.

    Args:
        distinct_tokens: Distinct tokens of the source (see
            :attr:`CalibrationWindows.distinct_tokens`); ``None`` when unknown.
        nsamples: Number of windows.
        seqlen: Tokens per window.
        mode: ``packed`` never overlaps (too few tokens is an error there), so gives ``None``.
        bos: Whether every window starts with an added BOS (one text token fewer a window).
        where: What the source is, for the message (a file, a hub name).

    Returns:
        The warning text, or ``None`` when the windows fit in the distinct text.
    """
    if mode != "random_windows" or distinct_tokens is None:
        return None
    width = seqlen - 1 if bos else seqlen
    drawn = nsamples * width
    if drawn <= distinct_tokens:
        return None
    per = f"{width:,} text tokens after BOS" if bos else f"{width:,} tokens"
    src = f" in {where}" if where else ""
    return (
        f"calibration: {nsamples:,} windows x {per} = {drawn:,} drawn from {distinct_tokens:,} "
        f"distinct tokens{src}: windows overlap; give a larger file or fewer/shorter windows"
    )


def sample_packed(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    strict: bool = True,
    batch_documents: int = 256,
    bos_token_id: int | None = None,
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
        bos_token_id: Put this id first in every window, before ``seqlen - 1`` stream tokens.

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
    width = _content_len(seqlen, bos_token_id)
    need = nsamples * width
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

    n = min(nsamples, len(stream) // width)
    if n < nsamples:
        msg = (
            f"asked for {nsamples} samples of {seqlen} tokens ({need} tokens) but the data holds "
            f"only {len(stream)} tokens ({len(stream) // width} full windows)"
        )
        if strict or n == 0:
            raise ValueError(msg + "; lower nsamples/seqlen or add documents")
        warnings.warn(msg + f"; using {n} samples", stacklevel=2)
    content = torch.tensor(stream[: n * width], dtype=torch.long).view(n, width)
    return _with_bos(content, bos_token_id)


def sample_random_windows(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    bos_token_id: int | None = None,
) -> Tensor:
    """The Wanda/SparseGPT calibration mode: one random window from each of random documents.

    Transcribes ``get_c4`` of wanda ``lib/data.py`` with ``random.Random(seed)`` in place of the
    global ``random.seed(seed)``: draw a document index until the document tokenises (with the
    tokenizer's default special tokens, e.g. a BOS) to more than ``seqlen`` tokens, then draw a
    start in ``[0, n - seqlen - 1]``. The random stream is consumed exactly as in the original.
    With ``bos_token_id``, documents are tokenised without special tokens and windows of
    ``seqlen - 1`` tokens are drawn the same way, each after the BOS.

    Each drawn document is tokenised once: the original tokenises it again at every draw, which
    for a one-document text file means the whole file once per window.

    Args:
        documents: Documents in order.
        tokenizer: A Hugging Face tokenizer.
        nsamples: Number of windows.
        seqlen: Tokens per window.
        seed: Seed of the random generator.
        bos_token_id: Put this id first in every window.

    Returns:
        ``LongTensor [nsamples, seqlen]``, the same for the same seed.

    Raises:
        ValueError: If no document has more than ``seqlen`` tokens.
    """
    return _random_windows(
        documents, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, bos_token_id=bos_token_id
    ).input_ids


def _random_windows(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    bos_token_id: int | None,
) -> CalibrationWindows:
    """:func:`sample_random_windows` and the tokens of the distinct documents it drew from."""
    check_seqlen(seqlen, None)
    if nsamples < 1:
        raise ValueError(f"nsamples must be >= 1, got {nsamples}")
    width = _content_len(seqlen, bos_token_id)
    # Off: the tokenizer's default special tokens, as the original. On: plain content, BOS added.
    specials = bos_token_id is None
    n_docs = len(documents)
    if n_docs == 0:
        raise ValueError("random_windows calibration got no documents")
    rng = random.Random(seed)
    # A drawn document is tokenised once: a long enough one keeps its ids for later draws, a too
    # short one only its index. Draws of a short document still happen, so the random stream
    # stays the original one. Once every document is known short, give up.
    kept: dict[int, Tensor] = {}
    too_short: set[int] = set()
    longest = 0
    out = torch.empty(nsamples, width, dtype=torch.long)
    for s in range(nsamples):
        while True:
            i = rng.randint(0, n_docs - 1)
            if i in too_short:
                continue
            ids = kept.get(i)
            if ids is not None:
                break
            text = documents[i]
            encoded = (
                _encode(tokenizer, text, add_special_tokens=specials)
                if isinstance(text, str)
                else []
            )
            if len(encoded) > width:
                ids = kept[i] = _compact(encoded)
                break
            longest = max(longest, len(encoded))
            too_short.add(i)
            if len(too_short) == n_docs:
                raise ValueError(
                    f"random_windows calibration needs documents with more than seqlen={seqlen} "
                    f"tokens, but the longest of the {n_docs} documents has {longest}; lower "
                    "seqlen or use calibration_mode='packed'"
                )
        j = rng.randint(0, len(ids) - width - 1)
        out[s] = ids[j : j + width]
    distinct = sum(len(ids) for ids in kept.values())
    return CalibrationWindows(_with_bos(out, bos_token_id), distinct)


def sample_calibration(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    mode: CalibrationMode,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    bos_token_id: int | None = None,
) -> CalibrationWindows:
    """Calibration windows of either mode, with the distinct tokens they came from.

    Args:
        documents: Documents in order.
        tokenizer: A Hugging Face tokenizer.
        mode: ``random_windows`` (:func:`sample_random_windows`) or ``packed``
            (:func:`sample_packed`, strict).
        nsamples: Number of windows.
        seqlen: Tokens per window.
        seed: Seed of ``random_windows``; ignored by ``packed``.
        bos_token_id: Put this id first in every window.

    Returns:
        The windows and, for ``random_windows``, the distinct tokens (see
        :class:`CalibrationWindows`).
    """
    if mode not in get_args(CalibrationMode):
        raise ValueError(f"mode must be one of {get_args(CalibrationMode)}, got {mode!r}")
    if mode == "packed":
        windows = sample_packed(
            documents, tokenizer, nsamples=nsamples, seqlen=seqlen, bos_token_id=bos_token_id
        )
        return CalibrationWindows(windows, None)
    return _random_windows(
        documents, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, bos_token_id=bos_token_id
    )


def windows_from_documents(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    seqlen: int,
    separator: str = "\n\n",
    max_windows: int | None = None,
    bos_token_id: int | None = None,
) -> Tensor:
    """Join documents, tokenise once (default special tokens), cut non-overlapping windows.

    Args:
        documents: Documents in order.
        tokenizer: A Hugging Face tokenizer.
        seqlen: Tokens per window.
        separator: String put between documents.
        max_windows: Keep at most this many windows (the first ones).
        bos_token_id: Tokenise without special tokens and put this id first in every window
            (``seqlen - 1`` text tokens each), not only in the first.

    Returns:
        ``LongTensor [n_windows, seqlen]`` with ``n_windows = min(numel // seqlen, max_windows)``;
        the tail that does not fill a window is dropped.

    Raises:
        ValueError: If the text yields no full window.
    """
    check_seqlen(seqlen, None)
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    width = _content_len(seqlen, bos_token_id)
    text = separator.join(d for d in documents if isinstance(d, str))
    ids = _encode(tokenizer, text, add_special_tokens=bos_token_id is None)
    n = len(ids) // width
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(
            f"the evaluation text has {len(ids)} tokens, fewer than one window of "
            f"seqlen={seqlen} tokens"
        )
    content = torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)
    return _with_bos(content, bos_token_id)


def wikitext2_windows(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    seqlen: int,
    max_windows: int | None = None,
    bos_token_id: int | None = None,
) -> Tensor:
    """WikiText2 protocol: rows joined with ``"\\n\\n"``, ``numel // seqlen`` windows.

    Args:
        documents: The rows of the test split (hub layout, empty rows included).
        tokenizer: A Hugging Face tokenizer.
        seqlen: Tokens per window.
        max_windows: Optional cap on the number of windows.
        bos_token_id: BOS first in every window (see :func:`windows_from_documents`).

    Returns:
        ``LongTensor [n_windows, seqlen]``.
    """
    return windows_from_documents(
        documents,
        tokenizer,
        seqlen=seqlen,
        separator="\n\n",
        max_windows=max_windows,
        bos_token_id=bos_token_id,
    )


def c4_validation_windows(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    seqlen: int,
    n_documents: int = C4_EVAL_DOCUMENTS,
    n_windows: int = C4_EVAL_WINDOWS,
    bos_token_id: int | None = None,
) -> Tensor:
    """C4-validation protocol: first ``n_documents`` joined with ``" "``, ``n_windows`` windows.

    Args:
        documents: Documents of the validation shard, in order.
        tokenizer: A Hugging Face tokenizer.
        seqlen: Tokens per window.
        n_documents: Documents to use (1100 in the protocol).
        n_windows: Windows to keep (256 in the protocol); fewer if the text is shorter.
        bos_token_id: BOS first in every window (see :func:`windows_from_documents`).

    Returns:
        ``LongTensor [min(n_windows, numel // seqlen), seqlen]``.
    """
    head = [documents[i] for i in range(min(n_documents, len(documents)))]
    return windows_from_documents(
        head,
        tokenizer,
        seqlen=seqlen,
        separator=" ",
        max_windows=n_windows,
        bos_token_id=bos_token_id,
    )
