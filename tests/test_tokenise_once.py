"""Each document is tokenised at most once (issue 24, item 7), and overlapping windows warn.

``random_windows`` used to tokenise a drawn document again at every draw, so a one-document text
file was tokenised once per window. These tests pin that every calibration and evaluation mode
tokenises each document at most once, and that ``random_windows`` still returns exactly the
windows of the original algorithm, kept below as :func:`_reference_random_windows`, and leaves its
random generator in the same state.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import random_words
from torch import Tensor

from prox24_lightning.data import (
    PruningDataModule,
    TextSource,
    calibration_samples,
    check_seqlen,
    load_documents,
    sample_packed,
    sample_random_windows,
    wikitext2_windows,
)
from prox24_lightning.data.cache import calibration_set
from prox24_lightning.data.windows import (
    calibration_overlap_warning,
    sample_calibration,
)
from prox24_lightning.testing import offline_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

BOS_ID = 2  # offline_tokenizer's <s>


# ------------------------------------------------------------------------ the reference code


def _reference_random_windows(
    documents: Any,
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    bos_token_id: int | None = None,
) -> Tensor:
    """``sample_random_windows`` as it was before tokenise-once (commit 0069856), verbatim but
    for the inlined helpers: it tokenises the drawn document at every draw."""

    def _encode(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]

    def _content_len(seqlen: int, bos_token_id: int | None) -> int:
        if bos_token_id is None:
            return seqlen
        if seqlen < 2:
            raise ValueError(f"seqlen must be >= 2 to hold BOS and a token, got {seqlen}")
        return seqlen - 1

    def _with_bos(content: Tensor, bos_token_id: int | None) -> Tensor:
        if bos_token_id is None:
            return content
        bos = torch.full((content.shape[0], 1), bos_token_id, dtype=content.dtype)
        return torch.cat([bos, content], dim=1)

    check_seqlen(seqlen, None)
    if nsamples < 1:
        raise ValueError(f"nsamples must be >= 1, got {nsamples}")
    width = _content_len(seqlen, bos_token_id)
    specials = bos_token_id is None
    n_docs = len(documents)
    if n_docs == 0:
        raise ValueError("random_windows calibration got no documents")
    rng = random.Random(seed)
    too_short: set[int] = set()
    longest = 0
    out = torch.empty(nsamples, width, dtype=torch.long)
    for s in range(nsamples):
        while True:
            i = rng.randint(0, n_docs - 1)
            if i in too_short:
                continue
            text = documents[i]
            ids = (
                _encode(tokenizer, text, add_special_tokens=specials)
                if isinstance(text, str)
                else []
            )
            if len(ids) > width:
                break
            longest = max(longest, len(ids))
            too_short.add(i)
            if len(too_short) == n_docs:
                raise ValueError(
                    f"random_windows calibration needs documents with more than seqlen={seqlen} "
                    f"tokens, but the longest of the {n_docs} documents has {longest}; lower "
                    "seqlen or use calibration_mode='packed'"
                )
        j = rng.randint(0, len(ids) - width - 1)
        out[s] = torch.tensor(ids[j : j + width], dtype=torch.long)
    return _with_bos(out, bos_token_id)


# ---------------------------------------------------------------------------------- helpers


class CountingTokenizer:
    """Wraps a tokenizer; records every text it is called on (a batch records each text)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.texts: list[str] = []

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.texts.extend([text] if isinstance(text, str) else list(text))
        return self.inner(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def chars(self) -> int:
        """Characters given to the tokenizer in all."""
        return sum(len(t) for t in self.texts)


@pytest.fixture
def calls_of_tok(monkeypatch: pytest.MonkeyPatch, tok) -> list[str]:
    """Texts ``tok`` is called on, counted on its class: a wrapper would change the tokenizer
    fingerprint, and with it the cache key."""
    texts: list[str] = []
    cls = type(tok)
    original = cls.__call__

    def counting(self, text, *args, **kwargs):
        texts.extend([text] if isinstance(text, str) else list(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counting)
    return texts


@pytest.fixture(scope="module")
def tok():
    """The offline byte-level BPE (BOS ``<s>`` known, not added)."""
    return offline_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    """The offline BPE with a post-processor that adds ``<s>`` first, like Llama's."""
    from tokenizers import processors

    t = offline_tokenizer()
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS_ID)]
    )
    assert t("the cat")["input_ids"][0] == BOS_ID
    return t


@pytest.fixture(scope="module")
def one_doc_file(tmp_path_factory) -> Path:
    """A one-document text file of 3000 random words (thousands of tokens)."""
    path = tmp_path_factory.mktemp("once") / "one.txt"
    path.write_text(random_words(random.Random(7), 3000))
    return path


class RecordingRandom(random.Random):
    """``random.Random`` that keeps every instance made, to read its state after sampling."""

    made: list[random.Random] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        RecordingRandom.made.append(self)


def _run_recorded(monkeypatch: pytest.MonkeyPatch, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``(fn(...), state of the one Random it made)``; the result is the exception if it raised."""
    RecordingRandom.made = []
    monkeypatch.setattr(random, "Random", RecordingRandom)
    try:
        result: Any = fn(*args, **kwargs)
    except ValueError as err:
        result = err
    finally:
        monkeypatch.undo()
    assert len(RecordingRandom.made) == 1
    return result, RecordingRandom.made[0].getstate()


def _same_as_reference(
    monkeypatch: pytest.MonkeyPatch, docs: Any, tokenizer: Any, **kw: Any
) -> CountingTokenizer:
    """Assert the windows, the error (if any) and the final random state equal the reference's;
    return the counting tokenizer the new code ran with."""
    global_state = random.getstate()
    counting = CountingTokenizer(tokenizer)
    new, new_state = _run_recorded(monkeypatch, sample_random_windows, docs, counting, **kw)
    ref, ref_state = _run_recorded(monkeypatch, _reference_random_windows, docs, tokenizer, **kw)
    if isinstance(ref, Exception):
        assert type(new) is type(ref) and str(new) == str(ref)
    else:
        assert isinstance(new, Tensor), new
        assert new.dtype == torch.long and torch.equal(new, ref)
    assert new_state == ref_state
    assert random.getstate() == global_state  # the global generator is not touched
    return counting


# --------------------------------------------------------------------------- random_windows


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("which", ["tok", "bos_tok"])
def test_one_document_file_tokenised_once(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    one_doc_file: Path,
    which: str,
    bos: bool,
) -> None:
    tokenizer = request.getfixturevalue(which)
    docs = load_documents(TextSource("text", path=str(one_doc_file)))
    assert len(docs) == 1
    kw = {"nsamples": 64, "seqlen": 48, "seed": 3, "bos_token_id": BOS_ID if bos else None}
    counting = _same_as_reference(monkeypatch, docs, tokenizer, **kw)
    assert counting.calls == 1 and counting.chars == len(docs[0])


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_many_documents_same_windows_each_tokenised_once(
    monkeypatch: pytest.MonkeyPatch, tok, seed: int
) -> None:
    rng = random.Random(seed)
    # Short ones (rejected) next to long ones, a None, and more draws than documents: every
    # document is drawn several times, which the reference tokenises every time.
    docs: list[Any] = [random_words(rng, rng.randint(2, 120)) for _ in range(12)]
    docs[4] = None
    counting = _same_as_reference(monkeypatch, docs, tok, nsamples=40, seqlen=64, seed=seed)
    assert max(Counter(counting.texts).values()) == 1
    assert counting.calls <= len(docs) - 1


def test_no_document_long_enough_same_error(monkeypatch: pytest.MonkeyPatch, tok) -> None:
    docs = ["the cat sat", "on a mat", "dogs ran far away"]
    counting = _same_as_reference(monkeypatch, docs, tok, nsamples=2, seqlen=64)
    assert sorted(counting.texts) == sorted(docs)


def test_distinct_tokens_of_the_drawn_documents(tok, one_doc_file: Path) -> None:
    docs = load_documents(TextSource("text", path=str(one_doc_file)))
    n = len(tok(docs[0])["input_ids"])
    out = sample_calibration(docs, tok, mode="random_windows", nsamples=4, seqlen=32)
    assert out.distinct_tokens == n and out.input_ids.shape == (4, 32)
    # With BOS: the text tokenised without specials, the same count here (no BOS is added).
    out = sample_calibration(
        docs, tok, mode="random_windows", nsamples=4, seqlen=32, bos_token_id=BOS_ID
    )
    assert out.distinct_tokens == n and bool((out.input_ids[:, 0] == BOS_ID).all())
    packed = sample_calibration(docs, tok, mode="packed", nsamples=4, seqlen=32)
    assert packed.distinct_tokens is None
    assert torch.equal(packed.input_ids, sample_packed(docs, tok, nsamples=4, seqlen=32))
    # Two documents drawn: the count is both of theirs.
    two = ["the cat sat on a mat " * 20, "dogs ran far away " * 30]
    out = sample_calibration(two, tok, mode="random_windows", nsamples=16, seqlen=8, seed=0)
    assert out.distinct_tokens == sum(len(tok(d)["input_ids"]) for d in two)


# ----------------------------------------------------------------- packed and evaluation


def test_packed_and_evaluation_tokenise_each_document_once(tok) -> None:
    rng = random.Random(2)
    docs = [random_words(rng, rng.randint(5, 60)) for _ in range(40)]
    counting = CountingTokenizer(tok)
    sample_packed(docs, counting, nsamples=6, seqlen=32, batch_documents=7)
    assert max(Counter(counting.texts).values()) == 1
    counting = CountingTokenizer(tok)
    wikitext2_windows(docs, counting, seqlen=32)
    assert counting.calls == 1 and counting.texts == ["\n\n".join(docs)]


def test_calibration_samples_one_file_once(tmp_path: Path, tok, one_doc_file: Path) -> None:
    counting = CountingTokenizer(tok)
    source = TextSource("text", path=str(one_doc_file))
    kw = {"nsamples": 32, "seqlen": 40, "cache_dir": tmp_path}
    first = calibration_samples(source, counting, **kw)
    assert counting.calls == 1
    assert torch.equal(calibration_samples(source, counting, **kw), first)  # a cache hit
    assert counting.calls == 1


# ------------------------------------------------------------------ the overlap warning


def test_overlap_warning_helper() -> None:
    msg = calibration_overlap_warning(39_012, 128, 512, "random_windows", where="c.txt")
    assert msg == (
        "calibration: 128 windows x 512 tokens = 65,536 drawn from 39,012 distinct tokens in "
        "c.txt: windows overlap; give a larger file or fewer/shorter windows"
    )
    assert "8 windows x 128 tokens = 1,024 drawn from 232" in calibration_overlap_warning(
        232, 8, 128, "random_windows"
    )
    # With BOS a window holds one text token fewer.
    bos = calibration_overlap_warning(1000, 8, 128, "random_windows", bos=True)
    assert bos is not None and "8 windows x 127 text tokens after BOS = 1,016 drawn" in bos
    assert calibration_overlap_warning(1016, 8, 128, "random_windows", bos=True) is None
    assert calibration_overlap_warning(1024, 8, 128, "random_windows") is None
    assert calibration_overlap_warning(232, 8, 128, "packed") is None  # never overlaps
    assert calibration_overlap_warning(None, 8, 128, "random_windows") is None  # unknown


def _datamodule(tmp_path: Path, tok, path: Path, **kwargs: Any) -> PruningDataModule:
    args: dict[str, Any] = {
        "calibration": TextSource("text", path=str(path)),
        "nsamples": 8,
        "seqlen": 32,
        "validation": {},
        "cache_dir": str(tmp_path / "cache"),
        "bos": "never",
    }
    dm = PruningDataModule(**{**args, **kwargs})
    dm.set_tokenizer(tok)
    return dm


def test_datamodule_warns_once_when_windows_overlap(
    tmp_path: Path, tok, calls_of_tok: list[str]
) -> None:
    small = tmp_path / "small.txt"
    small.write_text(random_words(random.Random(0), 60))
    n = len(tok(small.read_text())["input_ids"])
    seqlen = n // 2
    dm = _datamodule(tmp_path, tok, small, seqlen=seqlen)
    dm.prepare_data()
    with pytest.warns(UserWarning, match="windows overlap") as record:
        dm.setup("fit")
    msgs = [str(w.message) for w in record if "windows overlap" in str(w.message)]
    assert msgs == [
        f"calibration: 8 windows x {seqlen} tokens = {8 * seqlen:,} drawn from {n} distinct "
        f"tokens in {small}: windows overlap; give a larger file or fewer/shorter windows"
    ]
    # A warm cache still knows the count and tokenises nothing.
    calls_of_tok.clear()
    dm = _datamodule(tmp_path, tok, small, seqlen=seqlen)
    with pytest.warns(UserWarning, match=f"drawn from {n} distinct tokens"):
        dm.setup("fit")
    assert calls_of_tok == []


@pytest.mark.filterwarnings("error::UserWarning")
def test_datamodule_quiet_when_windows_fit(tmp_path: Path, tok, one_doc_file: Path) -> None:
    _datamodule(tmp_path, tok, one_doc_file).setup("fit")
    small = tmp_path / "small.txt"
    small.write_text(random_words(random.Random(0), 60))
    # Packed windows never overlap (and this file holds enough tokens for them).
    _datamodule(tmp_path, tok, small, nsamples=2, calibration_mode="packed").setup("fit")


def test_cache_entry_without_count_is_recomputed(
    tmp_path: Path, tok, one_doc_file: Path, calls_of_tok: list[str]
) -> None:
    source = TextSource("text", path=str(one_doc_file))
    kw = {"nsamples": 4, "seqlen": 32, "cache_dir": tmp_path}
    first = calibration_set(source, tok, **kw)
    (entry,) = (tmp_path / "tokens").iterdir()
    payload = torch.load(entry, weights_only=True)
    # An entry as written before the count existed: same key and windows, no metadata.
    torch.save({"key": payload["key"], "input_ids": payload["input_ids"]}, entry)
    calls_of_tok.clear()
    again = calibration_set(source, tok, **kw)
    assert calls_of_tok == [one_doc_file.read_text()]
    assert torch.equal(again.input_ids, first.input_ids)
    assert again.distinct_tokens == first.distinct_tokens > 0
    assert torch.load(entry, weights_only=True)["meta"] == {"distinct_tokens": again[1]}
