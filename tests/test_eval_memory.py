"""Bounded evaluation memory: perplexity from hidden states, the head applied chunk by chunk.

The chunked path (:func:`~prox24_lightning.evaluation.next_token_logits`, the offloaded
:func:`~prox24_lightning.evaluation.blockwise_logits`, and the Lightning mixin on top of both)
must give the perplexity of the full logits, with each model's own final-logit transform kept
(Gemma-2's softcap, Granite's and Cohere's scales), while no ``[B, T, V]`` tensor ever exists:
``prox24 validate`` of a 200k-vocabulary model at 8 x 512 stays under 2 GB resident.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import random_words
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from prox24_lightning.evaluation import (
    PerplexityEvaluation,
    blockwise_logits,
    chunk_tokens_for,
    next_token_logits,
)
from prox24_lightning.metrics import (
    BYTES_PER_LOGIT,
    CHUNK_BYTES,
    Perplexity,
    next_token_nll,
    tokens_per_chunk,
)
from prox24_lightning.models import OffloadedModel
from prox24_lightning.plan import RunSettings, load_model_config, model_shape, plan_run
from prox24_lightning.testing import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 512
#: A config field per family that changes the logits after the head (the transform under test).
TRANSFORMS = {
    "gemma2": {"final_logit_softcapping": 0.5},
    "granite": {"logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.25},
}
ARCHS = ["llama", "gpt2", "opt", *TRANSFORMS]


def _tiny(arch: str) -> nn.Module:
    """A 2-block model of ``arch`` from its config, deterministic weights, fp32, eval mode."""
    if arch == "gpt2":
        kw = dict(n_layer=2, n_embd=64, n_head=4, n_inner=128)
    elif arch == "opt":
        kw = dict(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4)
        kw["word_embed_proj_dim"] = 64  # else project_in/out layers sit outside the blocks
    else:
        kw = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, head_dim=16)
        kw.update(num_attention_heads=4, num_key_value_heads=2, **TRANSFORMS.get(arch, {}))
    special = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    config = AutoConfig.for_model(arch, vocab_size=VOCAB, **special, **kw)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        # Random init gives near-uniform logits, on which a softcap or scale barely moves the
        # loss; a 5x larger head makes the final-logit transforms below matter.
        lm.get_output_embeddings().weight.mul_(5)
    return lm


def _ids(seed: int = 1, shape: tuple[int, int] = (3, 17)) -> Tensor:
    return torch.randint(4, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _full_ppl(lm: nn.Module, batches: list[Tensor]) -> float:
    """The unchunked reference: the model's full logits, then cross-entropy over all positions."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = lm(input_ids=ids, use_cache=False).logits
            pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            nll += F.cross_entropy(pred, ids[:, 1:].reshape(-1), reduction="sum").double().item()
            count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count, dtype=torch.float64)))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


class HeadRows:
    """Rows (positions) of every call of the LM head, by a forward pre-hook."""

    def __init__(self, lm: nn.Module) -> None:
        self.rows: list[int] = []
        head = lm.get_output_embeddings()
        self._handle = head.register_forward_pre_hook(
            lambda module, args: self.rows.append(args[0].shape[:-1].numel())
        )

    def remove(self) -> None:
        self._handle.remove()


# ------------------------------------------------------------------------------ chunk rule
def test_chunk_size_comes_from_the_memory_budget() -> None:
    assert tokens_per_chunk(200_000, CHUNK_BYTES) == CHUNK_BYTES // (200_000 * BYTES_PER_LOGIT)
    assert tokens_per_chunk(10, 10 * BYTES_PER_LOGIT * 7 + 5) == 7
    assert tokens_per_chunk(2**30, 1) == 1  # at least one position
    lm = _tiny("llama")
    assert chunk_tokens_for(lm, VOCAB * BYTES_PER_LOGIT * 3) == 3


def test_add_nll_is_an_update() -> None:
    """Sums added with add_nll count as updates (no compute-before-update warning, no stale
    cached result) and merge like distributed states."""
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 9, 50, generator=g), torch.randint(0, 50, (2, 9), generator=g)
    ids[1, 5:] = -100
    by_update, by_sums, other = Perplexity(), Perplexity(), Perplexity()
    by_update.update(logits, ids)
    pred, targets = logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1)
    by_sums.add_nll(*next_token_nll(pred[:7], targets[:7]))
    first = by_sums.compute()
    by_sums.add_nll(*next_token_nll(pred[7:], targets[7:]))
    assert by_sums.update_called and by_sums.compute() != first
    torch.testing.assert_close(by_sums.compute(), by_update.compute(), rtol=1e-6, atol=0)
    assert by_sums.count.item() == by_update.count.item() == 16 - 4
    other.add_nll(1.5, 3)
    by_sums.merge_state(other)
    assert by_sums.count.item() == 15


# ----------------------------------------------------------------- resident: chunks = full
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_perplexity_equals_full_logits(arch: str) -> None:
    """fp32, 3 x 17 tokens scored 7 positions at a time (48 = 6 x 7 + 6): the perplexity of the
    full logits within 1e-5 relative, and the head never saw more than 7 positions at once."""
    lm = _tiny(arch)
    batches = [_ids(1), _ids(2)]
    expected = _full_ppl(lm, batches)
    metric = Perplexity()
    rows = HeadRows(lm)
    for ids in batches:
        for logits, targets in next_token_logits(lm, ids, chunk_tokens=7):
            assert logits.shape == (len(targets), VOCAB) and logits.dtype == torch.float32
            metric.add_nll(*next_token_nll(logits, targets))
    rows.remove()
    assert rows.rows == [7] * 6 + [6] + [7] * 6 + [6]
    assert metric.count.item() == 2 * 3 * 16
    assert _rel(metric.compute().item(), expected) < 1e-5
    # The model is whole again: its own forward gives the same logits as before.
    torch.testing.assert_close(_full_ppl(lm, batches), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", list(TRANSFORMS))
def test_the_models_final_logit_transform_is_kept(arch: str) -> None:
    """The transform matters for these settings (the bare head's perplexity is another number),
    and the chunked path reproduces the model's, not the bare head's."""
    lm = _tiny(arch)
    ids = _ids(3)
    expected = _full_ppl(lm, [ids])
    with torch.no_grad():
        hidden = lm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        bare = lm.get_output_embeddings()(hidden[:, :-1]).reshape(-1, VOCAB)
    bare_ppl = torch.exp(F.cross_entropy(bare, ids[:, 1:].reshape(-1))).item()
    assert _rel(bare_ppl, expected) > 1e-2
    metric = Perplexity()
    for logits, targets in next_token_logits(lm, ids, chunk_tokens=5):
        metric.add_nll(*next_token_nll(logits, targets))
    assert _rel(metric.compute().item(), expected) < 1e-5


# ------------------------------------------------------------------ offloaded: chunks = full
@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt"])
def test_blockwise_perplexity_equals_full_logits(arch: str) -> None:
    """The offloaded path (embeddings, each block over all batches, norm, head chunk by chunk)
    against the resident model's full logits."""
    lm = _tiny(arch)
    batches = [_ids(4), _ids(5, (2, 11))]
    expected = _full_ppl(lm, batches)
    offload = OffloadedModel(lm)
    rows = HeadRows(lm)
    metric = Perplexity()
    seen: list[int] = []

    def consume(i: int, logits: Tensor, targets: Tensor) -> None:
        seen.append(i)
        metric.add_nll(*next_token_nll(logits, targets))

    blockwise_logits(offload, batches, "cpu", consume, chunk_tokens=9)
    rows.remove()
    assert seen == [0] * 6 + [1] * 3  # 48 and 20 positions, 9 at a time
    assert max(rows.rows) == 9
    assert _rel(metric.compute().item(), expected) < 1e-5


# --------------------------------------------------------------- the Lightning mixin, both ways
class Scorer(PerplexityEvaluation, L.LightningModule):
    """The evaluation mixin alone, around a given model (offloaded or not)."""

    def __init__(self, lm: nn.Module, offload: bool) -> None:
        super().__init__()
        self.offloaded = OffloadedModel(lm) if offload else None
        if offload:
            object.__setattr__(self, "lm", lm)  # not registered: the store holds its tensors
        else:
            self.lm = lm
        self._perplexity = nn.ModuleDict()
        self._eval_queue = []
        self.eval_chunk_bytes = VOCAB * BYTES_PER_LOGIT * 10  # 10 positions per chunk


@pytest.mark.parametrize("offload", [False, True])
def test_validate_logs_the_full_logits_perplexity(offload: bool) -> None:
    """``trainer.validate`` through the mixin (Gemma-2, softcap set), resident and offloaded: the
    logged perplexity is the full logits' over the same windows, 10 positions per head call."""
    lm = _tiny("gemma2")
    windows = _ids(6, (4, 17))
    expected = _full_ppl(lm, [windows])
    rows = HeadRows(lm)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    loader = torch.utils.data.DataLoader([{"input_ids": w} for w in windows], batch_size=2)
    trainer.validate(Scorer(lm, offload), dataloaders=loader, verbose=False)
    rows.remove()
    assert max(rows.rows) == 10
    assert _rel(trainer.callback_metrics["val/set0_ppl"].item(), expected) < 1e-5


# --------------------------------------------------------------------------------- the plan
def test_plan_counts_the_evaluation_peak() -> None:
    """Llama-2-7B (vocab 32000, hidden 4096, bf16), evaluation batches of 8 x 2048: the device
    holds the final hidden states twice and one chunk of logits within the budget; offloaded,
    the evaluation windows' activations wait on the host. No evaluation set: no rows."""
    config = load_model_config(str(ROOT / "tests" / "fixtures" / "llama2-7b-config.json"))
    shape = model_shape(config, dtype=torch.bfloat16)
    common = dict(nsamples=128, seqlen=2048, batch_size=8, eval_seqlen=2048, eval_batch_size=8)
    plan = plan_run(shape, RunSettings(**common, eval_tokens=256 * 2048))
    device = {item: nbytes for item, nbytes, _ in plan.device}
    assert device["evaluation: final hidden states (x2)"] == 2 * 8 * 2048 * 4096 * 2
    chunk = tokens_per_chunk(32000, CHUNK_BYTES)
    assert device["evaluation: one chunk of logits"] == chunk * 32000 * BYTES_PER_LOGIT
    assert device["evaluation: one chunk of logits"] <= CHUNK_BYTES
    without = plan_run(shape, RunSettings(**common))
    assert plan.device_peak - without.device_peak == sum(
        nbytes for item, nbytes in device.items() if item.startswith("evaluation")
    )
    offloaded = plan_run(shape, RunSettings(**common, eval_tokens=256 * 2048, offload=True))
    host = {item: nbytes for item, nbytes, _ in offloaded.host}
    key = "evaluation activations (offload: every window waits between blocks)"
    assert host[key] == 256 * 2048 * 4096 * 2


# ------------------------------------------------------ the CLI on a 200k vocabulary, peak RSS
#: The child: the real CLI (``cli_main``, what ``prox24 validate`` runs), recording the shapes
#: of the evaluation batches and the logged metrics.
CHILD = """
import json, sys
import lightning as L
from prox24_lightning.cli import cli_main

shapes = []

class Shapes(L.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        shapes.append(list(batch["input_ids"].shape))

cli = cli_main(sys.argv[2:], trainer_defaults={"callbacks": [Shapes()]})
metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
with open(sys.argv[1], "w") as f:
    json.dump({"shapes": shapes, "metrics": metrics}, f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True])
def test_validate_200k_vocab_8x512_peaks_under_2gb(tmp_path: Path, offload: bool) -> None:
    """``prox24 validate`` of a 200k-vocabulary model, one evaluation batch of 8 x 512 tokens:
    the full fp32 logits alone would be 3.3 GB; the process's peak resident set stays < 2 GB."""
    model = save_tiny_model(
        tmp_path / "model", "llama", num_layers=1, vocab_size=200_000, max_positions=512
    )
    text = tmp_path / "eval.txt"
    text.write_text(random_words(random.Random(0), 8000))
    result = tmp_path / "result.json"
    args = [
        "validate",
        "--model=prox24_lightning.pruner.BlockwisePruner",
        f"--model.model_name_or_path={model}",
        f"--model.offload={str(offload).lower()}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--data.calibration=" + json.dumps({"name": "text", "path": str(text)}),
        "--data.validation=" + json.dumps({"held_out": {"name": "text", "path": str(text)}}),
        "--data.seqlen=512",
        "--data.eval_seqlen=512",
        "--data.eval_batch_size=8",
        "--data.max_eval_windows=8",
        f"--data.cache_dir={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT)
    log = tmp_path / "child.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(result), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
        # wait4: this child's own rusage (ru_maxrss in KiB on Linux), not all children's.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, log.read_text()[-3000:]
    record = json.loads(result.read_text())
    assert record["shapes"] == [[8, 512]]
    assert torch.isfinite(torch.tensor(record["metrics"]["val/held_out_ppl"]))
    peak = usage.ru_maxrss * 1024
    assert peak < 2e9, f"peak RSS {peak / 1e9:.2f} GB"
