"""Clear errors for the mistakes a user meets first (issue 13, item 5).

Each test asserts that the error names the problem (the path, the file, "no space left") and is
one error, not a chain of library errors. Offline; a full disk is simulated by monkeypatching.
"""

from __future__ import annotations

import errno
import gzip
import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from prox24_lightning import artifacts
from prox24_lightning.artifacts import atomic_dir, atomic_write
from prox24_lightning.data import PruningDataModule, TextSource, calibration_samples
from prox24_lightning.data import load_documents as load_docs
from prox24_lightning.models import load_causal_lm, loading
from prox24_lightning.models.loading import load_tokenizer
from prox24_lightning.testing import offline_tokenizer, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def one_error(excinfo: pytest.ExceptionInfo) -> None:
    """The error stands alone: no chained library traceback is printed before it."""
    err = excinfo.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return Path(
        save_tiny_model(
            tmp_path_factory.mktemp("model") / "m", "llama", num_layers=1, vocab_size=300
        )
    )


def copy_model(tiny_dir: Path, dest: Path) -> Path:
    shutil.copytree(tiny_dir, dest)
    return dest


# ------------------------------------------------------------------------- missing model path


@pytest.mark.parametrize("spec", ["/nonexistent/model", "./x", "../nope/model", "a/b/c"])
def test_missing_model_path_is_one_clear_error(tmp_path, monkeypatch, spec: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as excinfo:
        load_causal_lm(spec)
    assert str(excinfo.value) == (
        f"model path {spec!r} does not exist (neither a local folder/file nor a hub id)"
    )
    one_error(excinfo)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(spec)  # the data module's tokenizer path says the same
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _ = PruningDataModule(tokenizer=spec).tokenizer


def test_missing_home_path(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'~/models/missing' does not exist"):
        load_causal_lm("~/models/missing")


def test_missing_hub_id_offline(monkeypatch) -> None:
    monkeypatch.setattr(loading, "hub_offline", lambda **_: True)
    spec = "prox24-no-such-org/no-such-model"
    with pytest.raises(FileNotFoundError) as excinfo:
        load_causal_lm(spec)
    msg = str(excinfo.value)
    assert spec in msg and "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    one_error(excinfo)


def test_home_path_loads(tmp_path, monkeypatch, tiny_dir: Path) -> None:
    """``~`` is expanded (from_pretrained alone would take it for a hub id)."""
    copy_model(tiny_dir, tmp_path / "m")
    monkeypatch.setenv("HOME", str(tmp_path))
    model, tok = load_causal_lm("~/m")
    assert tok.eos_token_id == 3 and model.config.num_hidden_layers == 1


# -------------------------------------------------------------------------- missing tokenizer


def test_model_folder_without_tokenizer(tmp_path, tiny_dir: Path) -> None:
    folder = copy_model(tiny_dir, tmp_path / "no_tok")
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    with pytest.raises(FileNotFoundError) as excinfo:
        load_causal_lm(str(folder))
    msg = str(excinfo.value)
    assert f"no tokenizer files in model folder {folder}" in msg
    assert "tokenizer.json" in msg and "sentencepiece" not in msg
    one_error(excinfo)
    with pytest.raises(FileNotFoundError, match="no tokenizer files in model folder"):
        _ = PruningDataModule(tokenizer=str(folder)).tokenizer


def test_tokenizer_config_without_vocabulary(tmp_path, tiny_dir: Path) -> None:
    """transformers 5 would build a tokenizer that turns every text into zero tokens."""
    folder = copy_model(tiny_dir, tmp_path / "config_only")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(FileNotFoundError, match=f"the tokenizer of {folder} is empty"):
        load_tokenizer(str(folder))


# ---------------------------------------------------------------------------------- full disk


def test_atomic_write_disk_full(tmp_path) -> None:
    target = tmp_path / "out" / "masks.safetensors"
    with pytest.raises(OSError) as excinfo:
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert excinfo.value.errno == errno.ENOSPC
    assert excinfo.value.strerror == f"no space left on device while writing {target}"
    one_error(excinfo)
    assert list(target.parent.iterdir()) == []  # neither the target nor a temporary file


def fake_disk(monkeypatch, free: int) -> None:
    usage = types.SimpleNamespace(total=10 * 2**30, used=10 * 2**30 - free, free=free)
    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda _path: usage)


def test_torch_save_iostream_error_on_full_disk(tmp_path, monkeypatch) -> None:
    """torch.save only says "basic_ios::clear: iostream error" when the disk runs full."""
    fake_disk(monkeypatch, free=0)
    target = tmp_path / "block_001.pt"

    def failing_save(obj, f, *args, **kwargs):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . basic_ios::clear: iostream error"
        )

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError) as excinfo:
        with atomic_write(target) as tmp:
            torch.save({"x": torch.zeros(3)}, tmp)
    assert excinfo.value.errno == errno.ENOSPC
    assert str(excinfo.value).endswith(f"no space left on device while writing {target}")
    one_error(excinfo)
    assert not target.exists()


def test_token_cache_write_on_full_disk(tmp_path, monkeypatch, text_files) -> None:
    """The same through a real writer: the token cache names its file."""
    fake_disk(monkeypatch, free=4096)

    def failing_save(obj, f, *args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="no space left on device while writing .*tokens") as exc:
        calibration_samples(
            TextSource("text", path=str(text_files[0])),
            offline_tokenizer(),
            nsamples=2,
            seqlen=16,
            mode="packed",
            cache_dir=tmp_path,
        )
    assert exc.value.errno == errno.ENOSPC


def test_vague_write_failure_with_free_space_is_not_called_disk_full(tmp_path, monkeypatch) -> None:
    fake_disk(monkeypatch, free=50 * 2**30)
    target = tmp_path / "x.pt"
    with pytest.raises(OSError) as excinfo:
        with atomic_write(target):
            raise RuntimeError("basic_ios::clear: iostream error")
    assert excinfo.value.errno == errno.EIO
    assert f"write failed while writing {target}" in str(excinfo.value)
    assert "no space" not in str(excinfo.value)


def test_other_errors_pass_unchanged(tmp_path) -> None:
    with pytest.raises(ValueError, match="^mine$"):
        with atomic_write(tmp_path / "a.json"):
            raise ValueError("mine")
    with pytest.raises(RuntimeError, match="^unrelated$"):
        with atomic_dir(tmp_path / "d"):
            raise RuntimeError("unrelated")


def test_atomic_dir_disk_full(tmp_path) -> None:
    """safetensors' Rust writer words a full disk its own way."""
    target = tmp_path / "export"
    with pytest.raises(OSError) as excinfo:
        with atomic_dir(target):
            raise SafetensorError(  # an Exception, not an OSError
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                'space left on device" })'
            )
    assert excinfo.value.errno == errno.ENOSPC
    assert excinfo.value.strerror == f"no space left on device while writing {target}"
    assert not target.exists()


# ------------------------------------------------------------------------------ non-UTF-8 text


def test_non_utf8_text_file(tmp_path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"Caf\xe9 au lait, " + "na\u00efve".encode() * 3)
    with pytest.raises(ValueError) as excinfo:
        load_docs(TextSource("text", path=str(path)))
    msg = str(excinfo.value)
    assert str(path) in msg and "not UTF-8" in msg and "byte 0xe9 at offset 3" in msg
    one_error(excinfo)


def test_non_utf8_offset_across_read_chunks(tmp_path) -> None:
    """The offset is exact past the 1 MiB read chunks, with a 3-byte character on the seam."""
    good = "\u20ac".encode() * 400_000  # 1.2 MB; 2**20 is not a multiple of 3
    path = tmp_path / "big.txt"
    path.write_bytes(good + b"\xff tail")
    with pytest.raises(ValueError, match=f"byte 0xff at offset {len(good)} "):
        load_docs(TextSource("text", path=str(path)))


def test_non_utf8_wikitext_and_wiki_offline(tmp_path) -> None:
    raw = tmp_path / "wiki.test.raw"
    raw.write_bytes(b" = Title = \n \n Some text \x81 here \n")
    with pytest.raises(ValueError, match=f"{raw} is not UTF-8 text .*offset 25"):
        load_docs(TextSource("wikitext2", path=str(raw)))
    wiki = tmp_path / "summaries.json"
    wiki.write_bytes(b'{"A": {"extract": "caf\xe9"}}')
    with pytest.raises(ValueError, match=f"{wiki} is not UTF-8 text"):
        load_docs(TextSource("wiki_offline", path=str(wiki)))


def test_non_utf8_json_lines(tmp_path) -> None:
    """The JSON loader would store the bytes and fail later, in tokenisation, without a name."""
    rows = b'{"text": "fine"}\n{"text": "caf\xe9"}\n'
    path = tmp_path / "data.jsonl"
    path.write_bytes(rows)
    with pytest.raises(ValueError) as excinfo:
        load_docs(TextSource("json", path=str(path)), cache_dir=tmp_path / "cache")
    offset = rows.index(b"\xe9")
    assert f"{path} is not UTF-8 text (byte 0xe9 at offset {offset} " in str(excinfo.value)
    one_error(excinfo)
    gz = tmp_path / "c4.json.gz"
    gz.write_bytes(gzip.compress(rows))
    with pytest.raises(ValueError, match=f"{gz} is not UTF-8 text .*of the decompressed text"):
        load_docs(TextSource("c4", path=str(gz)), cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------- corrupt safetensors


@pytest.mark.parametrize("keep", [0.5, 5, 0])
def test_truncated_safetensors(tmp_path, tiny_dir: Path, keep: float) -> None:
    folder = copy_model(tiny_dir, tmp_path / "trunc")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(OSError) as excinfo:
        load_causal_lm(str(folder))
    assert str(excinfo.value).startswith(f"corrupt or truncated weights file {weights} (")
    one_error(excinfo)
