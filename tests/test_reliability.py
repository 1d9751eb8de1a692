"""Reliability: crash-safe resume, deterministic artifacts, and clear errors for bad input.

Every run uses a 3-block Llama of width 32 and 4 x 32 calibration tokens. The crash test drives
the real ``prox24 fit`` in subprocesses and kills them with ``PROX24_FAULT`` (see
:mod:`prox24_lightning.faults`); the other tests run the CLI in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import PROX_SOLVER, block_checkpoints, fit_args
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from prox24_lightning.artifacts import file_sha256, load_masks, save_masks
from prox24_lightning.check import check_export
from prox24_lightning.cli import cli_main
from prox24_lightning.models import find_blocks
from prox24_lightning.pruner import BlockwisePruner
from prox24_lightning.runfolder import RunFolderError
from prox24_lightning.testing import offline_tokenizer, save_tiny_model, tiny_causal_lm

TINY = dict(num_layers=3, hidden_size=32, intermediate_size=64)
NAN, INF = float("nan"), float("inf")
N_LAYERS = 21  # 3 blocks x 7 linear layers
# Wanda + 5 conjugate-gradient steps: fast, and the solver loop does iterate.
SOLVER = {"model.solver.refine": "cg", "model.solver.refine_steps": "5"}


@pytest.fixture(scope="module")
def text(text_files) -> Path:
    return text_files[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("model"), "llama", **TINY)


def _args(
    model: str, out: Path, text: Path, method: str = "wanda", overwrite: str = "true", **extra: str
) -> list[str]:
    """``prox24 fit`` arguments: per-block checkpoints, mask files and an export under ``out``."""
    callbacks = block_checkpoints(out, overwrite=overwrite)
    return fit_args(model, out, text, method=method, callbacks=callbacks, **{**SOLVER, **extra})


def _fit(model: str, out: Path, text: Path, method: str = "wanda", **extra: str):
    return cli_main(_args(model, out, text, method, **extra))


def _mask_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "masks").glob("block_*.safetensors"))


def _ckpt_state(out: Path) -> dict:
    return torch.load(out / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)


def _assert_same_result(a: Path, b: Path) -> None:
    """Masks (per-block files and export) and exported weights bit-identical."""
    assert _mask_files(a) == _mask_files(b) == [f"block_{i:03d}.safetensors" for i in range(3)]
    for name in _mask_files(a):
        assert (a / "masks" / name).read_bytes() == (b / "masks" / name).read_bytes(), name
    ma, mb = load_masks(a / "export/masks.safetensors"), load_masks(b / "export/masks.safetensors")
    assert ma.keys() == mb.keys() and len(ma) == N_LAYERS
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    wa = load_file(str(a / "export" / "model.safetensors"))
    wb = load_file(str(b / "export" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ------------------------------------------------------------------------------ crash safety
def _prox24(args: list[str], fault: str | None, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PROX24_FAULT", None)
    if fault:
        env["PROX24_FAULT"] = fault
    cmd = [sys.executable, "-m", "prox24_lightning", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_sigkill_at_every_stage_then_resume_last_is_identical(tmp_path, model_dir, text, two_runs):
    """A real ``prox24 fit`` killed (SIGKILL) during calibration, mid-solve, while writing a
    checkpoint and while writing the export; each time ``--ckpt_path last`` resumes, and the
    end result is bit-identical to an uninterrupted run (same config, run in-process)."""
    ref, run = two_runs[0], tmp_path / "run"
    fresh = _args(model_dir, run, text)
    args = [*fresh, "--ckpt_path=last"]

    def killed(fault: str, argv: list[str] = args) -> str:
        p = _prox24(argv, fault, tmp_path)
        assert p.returncode == -signal.SIGKILL, (fault, p.returncode, p.stderr[-3000:])
        return p.stderr

    # 1. Killed in block 0's calibration, before any checkpoint: nothing to resume from.
    killed("calibration:2", fresh)
    assert not (run / "ckpt" / "last.ckpt").exists() and _mask_files(run) == []
    # 2. "last" with no checkpoint is an error, not a silent fresh run; started again without
    #    it, the run is killed in block 1's calibration after block 0 was checkpointed.
    nothing = _prox24(args, None, tmp_path)
    assert nothing.returncode == 2 and "nothing to resume" in nothing.stderr, nothing.stderr
    assert "Traceback" not in nothing.stderr
    killed("calibration:3", fresh)
    assert _ckpt_state(run)["prox24"]["pruned_blocks"] == [0]
    assert _mask_files(run) == ["block_000.safetensors"]
    # 3. Resumed at block 1, killed in the middle of its solve.
    err = killed("solver:2")
    assert "resuming after 7 pruned layers" in err
    assert _ckpt_state(run)["prox24"]["pruned_blocks"] == [0]
    # 4. Resumed, block 1 solved, killed while its checkpoint is being written: the temporary
    #    file is there, last.ckpt is still the complete block-0 checkpoint.
    killed("write.ckpt:1")
    assert list((run / "ckpt").glob(".last.ckpt.*.tmp"))
    assert _ckpt_state(run)["prox24"]["pruned_blocks"] == [0]
    # 5. Resumed, blocks 1 and 2 done, killed while the export folder is being written: no
    #    export under the final name, only its temporary folder.
    killed("export:1")
    assert not (run / "export").exists() and list(run.glob(".export.*.tmp"))
    assert _ckpt_state(run)["prox24"]["pruned_blocks"] == [0, 1, 2]
    assert not list((run / "ckpt").glob(".last.ckpt.*.tmp"))  # leftovers cleaned by the next write
    # 6. Resumed with every block done: only the export is left to write.
    final = _prox24(args, None, tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming after 21 pruned layers" in final.stderr
    assert check_export(run / "export").ok and not list(run.glob(".export.*.tmp"))
    _assert_same_result(ref, run)


# ----------------------------------------------------------------------------- determinism
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, model_dir, text) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("det")
    outs = root / "a", root / "b"
    for out in outs:
        _fit(model_dir, out, text, overwrite="false")
    return outs


def test_same_config_and_seed_give_bit_identical_masks(two_runs):
    a, b = two_runs
    _assert_same_result(a, b)
    assert (a / "export/masks.safetensors").read_bytes() == (
        b / "export/masks.safetensors"
    ).read_bytes()


def test_report_records_what_reproduces_the_run(two_runs, model_dir, text):
    report = json.loads((two_runs[0] / "export" / "sparsity_report.json").read_text())
    assert report["seed"] == 0
    cfg = report["config"]
    assert cfg["model"]["init_args"]["method"] == "wanda" and cfg["seed_everything"] == 0
    assert cfg["data"]["nsamples"] == 4
    files = report["data"]["files"]["calibration"]["files"]
    assert files == [
        {
            "path": str(text.resolve()),
            "size": text.stat().st_size,
            "sha256": hashlib.sha256(text.read_bytes()).hexdigest(),
        }
    ]
    assert report["data"]["calibration_tokens"] == [4, 32]
    assert len(report["data"]["calibration_tokens_sha256"]) == 64
    for lib in ("torch", "lightning", "transformers", "tokenizers", "safetensors", "python"):
        assert report["versions"][lib]
    assert report["fingerprint"]["model_name_or_path"] == os.path.abspath(model_dir)
    assert report["summary"]["dead_features"] == 0 and report["summary"]["skipped_layers"] == {}


def test_existing_export_is_refused_before_any_work(tmp_path, two_runs, model_dir, text):
    out = two_runs[0]
    before = (out / "export" / "model.safetensors").read_bytes()
    masks_before = {n: (out / "masks" / n).stat().st_mtime_ns for n in _mask_files(out)}
    with pytest.raises(RunFolderError, match=r"(?s)holds a finished run .*--overwrite true"):
        _fit(model_dir, out, text, overwrite="false")
    assert (out / "export" / "model.safetensors").read_bytes() == before
    assert {n: (out / "masks" / n).stat().st_mtime_ns for n in _mask_files(out)} == masks_before
    assert check_export(out / "export").ok


# ------------------------------------------------------------------------------- resume checks
@pytest.fixture(scope="module")
def partial_run(tmp_path_factory, model_dir, text) -> Path:
    """A run stopped after block 0 (``max_epochs=1``): a checkpoint and one mask file."""
    out = tmp_path_factory.mktemp("partial")
    _fit(model_dir, out, text, **{"trainer.max_epochs": "1"})
    assert _mask_files(out) == ["block_000.safetensors"]
    assert _ckpt_state(out)["prox24"]["pruned_blocks"] == [0]
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "change,named",
    [
        ({"model.method": "magnitude"}, r"method: 'wanda' in the checkpoint, 'magnitude' now"),
        ({"data.nsamples": "6"}, r"calibration_tokens: \[4, 32\] in the checkpoint, \[6, 32\] now"),
        ({"model.solver.refine_steps": "7"}, r"solver: .*'refine_steps': 5.*'refine_steps': 7"),
    ],
)
def test_resume_refuses_checkpoint_of_another_config(
    tmp_path, partial_run, model_dir, text, change, named
):
    out = _copy(partial_run, tmp_path / "run")
    with pytest.raises(ValueError, match=r"different run configuration.*" + named):
        _fit(model_dir, out, text, ckpt_path=str(out / "ckpt" / "last.ckpt"), **change)
    assert _mask_files(out) == ["block_000.safetensors"]  # nothing lost


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_refuses_a_foreign_mask_file(tmp_path, partial_run, model_dir, text):
    out = _copy(partial_run, tmp_path / "run")
    # masks of a wider model (hidden 48) under block 0's name
    other = tiny_causal_lm("llama", num_layers=1, hidden_size=48, intermediate_size=64)
    w = other.model.layers[0].self_attn.q_proj.weight
    keep = torch.zeros_like(w, dtype=torch.bool).view(w.shape[0], -1, 4)
    keep[..., :2] = True
    save_masks(
        out / "masks" / "block_000.safetensors",
        {"model.layers.0.self_attn.q_proj": keep.view_as(w)},
    )
    with pytest.raises(
        ValueError,
        match=r"block_000.safetensors: mask for model.layers.0.self_attn.q_proj has shape "
        r"\(48, 48\) but the layer's \[out, in\] weight has shape \(32, 32\)",
    ):
        _fit(model_dir, out, text, ckpt_path=str(out / "ckpt" / "last.ckpt"))


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_refuses_a_wrong_shape_mask_in_a_block_shard(tmp_path, partial_run, model_dir, text):
    """The checkpoint holds no masks or weights, only each block shard's SHA-256: a changed
    shard is refused, and so is a shard whose mask does not fit the layer (even with its
    checksum updated)."""
    out = _copy(partial_run, tmp_path / "run")
    ckpt, shard = out / "ckpt" / "last.ckpt", out / "blocks" / "block_000.safetensors"
    name = "model.layers.0.mlp.down_proj"
    tensors = load_file(str(shard))
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
    tensors[f"{name}.mask_shape"] = tensors[f"{name}.mask_shape"].flip(0)  # [32, 64] -> [64, 32]
    save_file(tensors, str(shard), metadata=meta)
    with pytest.raises(ValueError, match=r"block_000.safetensors differs from the one the "):
        _fit(model_dir, out, text, ckpt_path=str(ckpt))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert not any(k.startswith("lm.") for k in state["state_dict"])
    state["prox24"]["shards"]["0"] = file_sha256(shard)
    torch.save(state, ckpt)
    with pytest.raises(
        ValueError,
        match=rf"block_000.safetensors: mask for {name} has shape \(64, 32\) but the "
        r"layer's \[out, in\] weight has shape \(32, 64\)",
    ):
        _fit(model_dir, out, text, ckpt_path=str(ckpt))


# ------------------------------------------------------------------------------ bad input
def _edited_model(root: Path, tensor: str, index, value: float) -> str:
    """A tiny model whose saved ``tensor[index]`` is set to ``value``."""
    path = save_tiny_model(root, "llama", **TINY)
    weights = load_file(f"{path}/model.safetensors")
    weights[tensor][index] = value
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    return path


def test_nan_weights_are_refused_before_calibration(tmp_path, text):
    model = _edited_model(tmp_path / "m", "model.layers.1.mlp.down_proj.weight", (0, 0), NAN)
    out = tmp_path / "run"
    with pytest.raises(
        FloatingPointError,
        match=r"NaN or Inf in the weights of layer model\.layers\.1\.mlp\.down_proj "
        r"\(block 1, model\.layers\.1\)",
    ):
        _fit(model, out, text)
    assert _mask_files(out) == []


def test_nan_embeddings_name_the_activations_entering_block_0(tmp_path, text):
    # one coordinate of every token's embedding
    model = _edited_model(tmp_path / "m", "model.embed_tokens.weight", (slice(None), 0), INF)
    with pytest.raises(
        FloatingPointError, match=r"calibration activations entering block 0 \(model\.layers\.0\)"
    ):
        _fit(model, tmp_path / "run", text)


class _PoisonActivations(L.Callback):
    """From block 1 on, the input of ``mlp.down_proj`` turns NaN (like an fp16 overflow)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            layer = dict(find_blocks(pl_module.lm))["model.layers.1"].mlp.down_proj
            layer.register_forward_pre_hook(lambda m, args: (args[0] * float("nan"),))


def test_nan_activations_mid_run_name_the_layer_and_keep_saved_masks(tmp_path, model_dir, text):
    out = tmp_path / "run"
    with pytest.raises(
        FloatingPointError,
        match=r"NaN or Inf in the calibration activations of block 1 \(model\.layers\.1\); "
        r"first seen in the Gram matrix of the input of layer model\.layers\.1\.mlp\.down_proj",
    ):
        cli_main(
            _args(model_dir, out, text), trainer_defaults={"callbacks": [_PoisonActivations()]}
        )
    assert _mask_files(out) == ["block_000.safetensors"]
    assert _ckpt_state(out)["prox24"]["pruned_blocks"] == [0]


def test_dead_features_and_singular_gram_are_counted(tmp_path, text):
    """Zero rows of block 0's up_proj: 8 intermediate features never fire, so down_proj's Gram
    is singular. SparseGPT (Cholesky) and the report handle and count them."""
    path = _edited_model(tmp_path / "m", "model.layers.0.mlp.up_proj.weight", slice(0, 8), 0.0)
    out = tmp_path / "run"
    _fit(path, out, text, method="sparsegpt")
    assert check_export(out / "export").ok
    report = json.loads((out / "export" / "sparsity_report.json").read_text())
    assert report["layers"]["model.layers.0.mlp.down_proj"]["dead_features"] == 8
    assert report["summary"]["dead_features"] == 8
    assert report["summary"]["layers_with_dead_features"] == ["model.layers.0.mlp.down_proj"]
    assert report["summary"]["all_2of4"]


def _indivisible_model(root: Path) -> str:
    """Llama of width 30 (3 heads of 10): every layer but down_proj has 30 inputs."""
    config = AutoConfig.for_model(
        "llama",
        num_hidden_layers=2,
        hidden_size=30,
        intermediate_size=64,
        num_attention_heads=3,
        num_key_value_heads=3,
        max_position_embeddings=512,
        vocab_size=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root)
    offline_tokenizer().save_pretrained(root)
    return str(root)


def test_indivisible_layers_warn_and_stay_dense(tmp_path, text):
    model = _indivisible_model(tmp_path / "m")
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as record:
        _fit(model, out, text)
    messages = "\n".join(str(w.message) for w in record)
    assert (
        "layer model.layers.0.self_attn.q_proj has 30 input features, not divisible by 4: "
        "cannot be 2:4; left dense"
    ) in messages
    report = json.loads((out / "export" / "sparsity_report.json").read_text())
    assert sorted(report["layers"]) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    skipped = report["summary"]["skipped_layers"]
    assert len(skipped) == 12 and "model.layers.1.mlp.up_proj" in skipped
    assert check_export(out / "export").ok


def test_indivisible_layers_error_before_calibration(tmp_path, text):
    model = _indivisible_model(tmp_path / "m")
    out = tmp_path / "run"
    with pytest.raises(
        ValueError,
        match=r"layer model\.layers\.0\.self_attn\.q_proj has 30 input features, not divisible by 4",
    ):
        _fit(model, out, text, **{"model.on_indivisible": "error"})
    assert _mask_files(out) == []


@pytest.mark.parametrize(
    "case,error,named",
    [
        ("missing", FileNotFoundError, r"file not found: .*nowhere\.txt"),
        ("empty", ValueError, r"file is empty: .*empty\.txt"),
        ("too_few_tokens", ValueError, r"asked for 1000 samples of 32 tokens"),
        ("seqlen", ValueError, r"seqlen=32 is above the model's maximum of 16 positions"),
        ("eval_seqlen", ValueError, r"eval_seqlen=64 is above the model's maximum of 48"),
    ],
)
def test_bad_data_is_refused_before_calibration(tmp_path, text, case, error, named):
    model = save_tiny_model(tmp_path / "m", "llama", **TINY)
    calib = {"name": "text", "path": str(text)}
    extra: dict[str, str] = {}
    if case == "missing":
        calib["path"] = str(tmp_path / "nowhere.txt")
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        calib["path"] = str(tmp_path / "empty.txt")
    elif case == "too_few_tokens":
        extra["data.nsamples"] = "1000"
    elif case == "seqlen":
        model = save_tiny_model(tmp_path / "m16", "llama", max_positions=16, **TINY)
    else:
        model = save_tiny_model(tmp_path / "m48", "llama", max_positions=48, **TINY)
        extra["data.eval_seqlen"] = "64"
        extra["data.validation"] = json.dumps({"held_out": {"name": "text", "path": str(text)}})
    out = tmp_path / "run"
    with pytest.raises(error, match=named):
        _fit(model, out, text, **{"data.calibration": json.dumps(calib), **extra})
    assert _mask_files(out) == [] and not (out / "ckpt").exists()


def test_unknown_method_is_refused(model_dir, text, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown method 'foo'; choose one of"):
        BlockwisePruner(model_dir, method="foo")  # type: ignore[arg-type]
    # The registry is the one place names live: the CLI reports the same message.
    with pytest.raises(ValueError, match=r"unknown method 'foo'; choose one of magnitude"):
        _fit(model_dir, tmp_path / "run", text, method="foo")


class _NotLinear(torch.nn.Module):
    """A projection that is not ``nn.Linear``/``Conv1D`` (a custom kernel, say)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


def test_blocks_without_linear_layers_are_refused(model_dir):
    lm = tiny_causal_lm("llama", num_layers=2, hidden_size=32, intermediate_size=64)
    for _, block in find_blocks(lm):
        for name, module in list(block.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent = block.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, name.rsplit(".", 1)[1], _NotLinear(module))
    pruner = BlockwisePruner(model_dir, method="wanda")
    pruner.set_model(lm)
    with pytest.raises(
        ValueError, match=r"block model\.layers\.0 \(LlamaDecoderLayer\) has no linear"
    ):
        pruner.check_model()


# ------------------------------------------------------------------------------ low precision
def test_bf16_model_end_to_end_solves_in_fp32(tmp_path, model_dir, text, monkeypatch):
    import prox24_lightning.pipeline.stage as stage_mod

    seen: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []

    class Spy(stage_mod.LayerSolve):
        def __init__(self, weight, gram, method, config, **kwargs):
            super().__init__(weight, gram, method, config, **kwargs)
            self.input_dtypes = (weight.dtype, gram.dtype)

        def attach(self, optimizer, name):
            super().attach(optimizer, name)
            seen.append((*self.input_dtypes, self.work.dtype))

    monkeypatch.setattr(stage_mod, "LayerSolve", Spy)
    out = tmp_path / "run"
    _fit(
        model_dir,
        out,
        text,
        method="prox",
        **{"model.dtype": "bfloat16", **PROX_SOLVER},
    )
    assert len(seen) == N_LAYERS
    assert set(seen) == {(torch.bfloat16, torch.float32, torch.float32)}
    assert check_export(out / "export").ok
    weights = load_file(str(out / "export" / "model.safetensors"))
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    masks = load_masks(out / "export" / "masks.safetensors")
    for name, mask in masks.items():
        w = weights[f"{name}.weight"]
        assert torch.equal(w != 0, mask & (w != 0)), name
        assert bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()), name
