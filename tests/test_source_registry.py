"""The text-source registry: a new kind of source is one class and one registry entry, and then
serves calibration, evaluation, the report's provenance and the plan's token-cache size.

Offline: a ``lines`` source (a local text file, one document a line) is defined inside the
tests and read with a word-level tokenizer built in memory, in which every ``w<i>`` is one token.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

from prox24_lightning.artifacts import file_sha256
from prox24_lightning.data import (
    SOURCES,
    PruningDataModule,
    SourceKind,
    TextSource,
    evaluation_windows,
    load_documents,
    register_source,
    source_provenance,
    to_source,
    windows_from_documents,
)
from prox24_lightning.data.sources import C4, WikiText2, estimate_eval_tokens, get_source_kind
from prox24_lightning.plan import plan_from_config

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA2_7B = Path(__file__).parent / "fixtures" / "llama2-7b-config.json"
N_WORDS = 200


@pytest.fixture(scope="module")
def tok():
    """A WordLevel tokenizer over ``w0 .. w199`` with EOS ``</s>`` and no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "<pad>": 2}
    vocab.update({f"w{i}": 3 + i for i in range(N_WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


@pytest.fixture
def lines_file(tmp_path: Path) -> Path:
    """30 lines of 5..15 random words (blank lines in between are not documents)."""
    rng = random.Random(0)
    rows = [
        " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(5, 15))) for _ in range(30)
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def lines_kind() -> Iterator[type[SourceKind]]:
    """The new source: its one class and its registry entry; removed again after the test."""

    @register_source
    class Lines(SourceKind):
        """``lines``: a local text file, each non-blank line one document; evaluated on the
        lines joined with a newline."""

        name: ClassVar[str] = "lines"
        needs_path: ClassVar[bool] = True
        eval_protocol: ClassVar[str] = "lines"

        @classmethod
        def load_files(
            cls, source: TextSource, files: list[Path], kind: str, cache_dir: Path, where: str
        ) -> Any:
            if kind != "text":
                raise ValueError(f"lines source: expects text files, got {where}")
            return [
                line
                for f in files
                for line in f.read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]

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
            return windows_from_documents(
                documents,
                tokenizer,
                seqlen=seqlen,
                separator="\n",
                max_windows=max_windows,
                bos_token_id=bos_token_id,
            )

        @classmethod
        def eval_tokens(
            cls, source: TextSource, *, seqlen: int, max_windows: int | None
        ) -> int | None:
            # One token a word: the full windows of the file's words.
            words = sum(len(f.read_text(encoding="utf-8").split()) for f in cls.files(source))
            windows = words // seqlen
            if max_windows is not None:
                windows = min(windows, max_windows)
            return windows * seqlen

    try:
        yield Lines
    finally:
        SOURCES.pop("lines", None)


def word_ids(tok, path: Path) -> list[int]:
    """The token ids of a file's words (one token a word)."""
    return tok.convert_tokens_to_ids(path.read_text(encoding="utf-8").split())


def test_a_new_source_serves_calibration_and_evaluation(
    tmp_path: Path, tok, lines_file: Path, lines_kind: type[SourceKind]
) -> None:
    spec = {"name": "lines", "path": str(lines_file)}
    assert to_source(spec).kind is lines_kind and get_source_kind("lines") is lines_kind
    with pytest.raises(ValueError, match="needs a local `path`"):
        TextSource("lines")
    docs = load_documents(spec)
    assert len(docs) == 30 and all(d.strip() for d in docs)
    assert list(load_documents({**spec, "part": "odd"})) == docs[1::2]

    dm = PruningDataModule(
        calibration=spec,
        calibration_mode="packed",
        nsamples=4,
        seqlen=16,
        validation={"mine": spec},
        eval_seqlen=8,
        max_eval_windows=5,
        cache_dir=str(tmp_path / "cache"),
        bos="never",
    )
    dm.set_tokenizer(tok)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.calibration_data.shape == (4, 16)
    # packed: documents joined with EOS and cut into consecutive windows.
    ids = word_ids(tok, lines_file)
    assert dm.calibration_data[0, :5].tolist() == ids[:5]
    dm.setup("validate")
    # The source's own protocol: the lines joined with "\n" (one token a word), 5 windows.
    expected = torch.tensor(ids[: 5 * 8]).view(5, 8)
    assert torch.equal(dm.eval_data["mine"], expected)
    assert [b["input_ids"].shape for b in dm.val_dataloader()[0]] == [(1, 8)] * 5
    # Cached under the source's name, keyed by its protocol; a second read is a hit.
    entries = sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())
    assert any(n.startswith("eval-lines-") for n in entries)
    assert any(n.startswith("calibration-lines-") for n in entries)
    again = evaluation_windows(
        spec, tok, seqlen=8, max_windows=5, cache_dir=tmp_path / "cache", use_cache=True
    )
    assert torch.equal(again, expected)
    # The report's provenance: the file with its SHA-256, as for every local source.
    record = source_provenance(spec)
    assert record["spec"]["name"] == "lines"
    assert record["files"] == [
        {
            "path": str(lines_file.resolve()),
            "size": lines_file.stat().st_size,
            "sha256": file_sha256(lines_file),
        }
    ]


def test_the_plan_sizes_a_new_source(
    tmp_path: Path, lines_file: Path, lines_kind: type[SourceKind]
) -> None:
    words = len(lines_file.read_text().split())
    seqlen = 16
    expected = words // seqlen * seqlen
    assert (
        estimate_eval_tokens(
            {"name": "lines", "path": str(lines_file)}, seqlen=seqlen, max_windows=None
        )
        == expected
    )
    config = {
        "model": {
            "class_path": "prox24_lightning.pruner.BlockwisePruner",
            "init_args": {"model_name_or_path": str(LLAMA2_7B)},
        },
        "data": {
            "nsamples": 4,
            "seqlen": seqlen,
            "validation": {
                "mine": {"name": "lines", "path": str(lines_file)},
                "wt2": {"name": "wikitext2"},
                "other": {"name": "text", "path": str(lines_file)},
            },
        },
        "trainer": {},
    }
    plan = plan_from_config(config)
    assert plan is not None
    wt2 = WikiText2.eval_tokens(TextSource("wikitext2"), seqlen=seqlen, max_windows=None)
    assert plan.settings.eval_tokens == expected + wt2
    detail = dict((item, how) for item, _, how in plan.cache)["token cache"]
    assert f"(64 calibration + {expected + wt2:,} evaluation tokens)" in detail
    # A kind without an estimate is named, not counted.
    assert "token cache: evaluation sets ['other'] not counted (size unknown)" in plan.notes


def test_unknown_names_list_the_registry(lines_kind: type[SourceKind]) -> None:
    with pytest.raises(
        ValueError, match=r"unknown text source name 'wikitxt2'; expected one of "
    ) as err:
        TextSource("wikitxt2")
    message = str(err.value)
    assert all(repr(name) in message for name in SOURCES) and "'lines'" in message
    assert message.endswith("did you mean 'wikitext2'?")
    with pytest.raises(ValueError, match="already registered"):

        @register_source
        class Other(SourceKind):
            name: ClassVar[str] = "lines"

    assert SOURCES["lines"] is lines_kind


def test_builtin_kinds_keep_their_protocols_and_estimates() -> None:
    assert "lines" not in SOURCES  # the fixture of the tests above removed its entry
    assert {"c4", "c4_validation", "json", "text", "wiki_offline", "wikitext2"} <= set(SOURCES)
    assert [SOURCES[n].eval_protocol for n in ("c4", "c4_validation", "wikitext2", "text")] == [
        "c4",
        "c4",
        "wt2",
        "wt2",
    ]
    assert issubclass(SOURCES["c4_validation"], C4)
    c4v = TextSource("c4_validation")
    assert estimate_eval_tokens(c4v, seqlen=4096, max_windows=None) == 256 * 4096
    assert estimate_eval_tokens(c4v, seqlen=4096, max_windows=10) == 10 * 4096
    assert estimate_eval_tokens("wikitext2", seqlen=4096, max_windows=None) == 83 * 4096
    assert estimate_eval_tokens("c4", seqlen=4096, max_windows=None) is None
    assert estimate_eval_tokens("c4", seqlen=4096, max_windows=3) == 3 * 4096
    assert SOURCES["wikitext2"].provenance(TextSource("wikitext2", split="validation"))["hub"] == {
        "id": "Salesforce/wikitext",
        "config": "wikitext-2-raw-v1",
        "split": "validation",
    }
    assert SOURCES["c4"].provenance(TextSource("c4"))["hub"] == {
        "id": "allenai/c4",
        "file": "en/c4-train.00000-of-01024.json.gz",
    }
