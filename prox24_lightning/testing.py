"""Offline test and tool utilities: a deterministic tokenizer and tiny random causal LMs.

Nothing here touches the network: the tokenizer is trained locally on a fixed text, and models
are built from configs with ``AutoModelForCausalLM.from_config``. End-to-end tests write both to a
folder with :func:`save_tiny_model` and point a config at it.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_ARCHS",
    "offline_tokenizer",
    "save_tiny_model",
    "tiny_causal_lm",
]

#: Special tokens of :func:`offline_tokenizer`, with ids 0..3 in this order. The tiny model
#: configs use the same ids, so they must stay in sync.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
_PAD_ID, _BOS_ID, _EOS_ID = 0, 2, 3

Arch = Literal["llama", "qwen2", "qwen3", "mistral", "phi3", "opt", "gpt2"]

#: Architectures :func:`tiny_causal_lm` can build.
TINY_ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "phi3", "opt", "gpt2")

# Fixed training text for the tokenizer. Any text works; this one is English prose about the
# project's subject so merges look like real subwords. Changing it changes every token id.
_TOKENIZER_TEXT = """\
Large language models are trained on enormous amounts of text and contain billions of weights.
Pruning removes some of those weights after training so that the model becomes smaller and
faster. In semi-structured sparsity, two out of every four consecutive weights are set to zero.
Modern graphics processors can multiply such matrices almost twice as fast as dense ones.
The proximal operator of a regularizer moves each group of four weights towards a sparse pattern
while staying close to the original values. A layer-wise method looks at one transformer block at
a time: it records the inputs of every linear layer on a small calibration set, then chooses the
weights that reproduce the original outputs best under the sparsity constraint.
Calibration text often comes from a web crawl, and evaluation uses perplexity on Wikipedia
articles. A lower perplexity means that the model predicts the next word better. After pruning,
a short phase of fine-tuning with fixed masks recovers part of the lost accuracy.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. How much wood
would a woodchuck chuck if a woodchuck could chuck wood? Numbers such as 0 1 2 3 4 5 6 7 8 9, 42,
2024 and 3.14159 appear in text too, as do punctuation marks: commas, periods; colons! (brackets)
"quotes" and hyphen-separated words. The history of the city began in the early twelfth century,
when a small market grew around the bridge over the river. Its population doubled within a
hundred years, and the university was founded soon after. Today the region is known for music,
science, football, wine, and its long summer festivals in the old town square.
"""


def offline_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer built locally (no downloads).

    Trained on a fixed English text, so ids are identical on every machine and run. Byte-level
    means every string encodes (no ``<unk>`` in practice) and decodes back exactly. Special tokens
    (:data:`SPECIAL_TOKENS`): ``<pad>`` = 0, ``<unk>`` = 1, ``<s>`` = 2 (BOS, not added
    automatically, like SmolLM2), ``</s>`` = 3 (EOS). Works with ``save_pretrained`` /
    ``AutoTokenizer.from_pretrained``.

    Args:
        vocab_size: Upper bound on the vocabulary (4 specials + 256 bytes + merges). Must be at
            least 260; the fixed text may supply fewer merges than requested, so ``len(tokenizer)``
            can be smaller, never larger.
    """
    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_TEXT.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def _arch_config(
    arch: str,
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    vocab_size: int,
    num_heads: int,
    num_kv_heads: int,
    max_positions: int,
) -> dict[str, Any]:
    """Config kwargs for one architecture; the config field names differ per family."""
    special = {"pad_token_id": _PAD_ID, "bos_token_id": _BOS_ID, "eos_token_id": _EOS_ID}
    if arch == "gpt2":
        # GPT-2 has no GQA; dropout off so train-mode forwards stay deterministic too.
        return dict(
            n_layer=num_layers,
            n_embd=hidden_size,
            n_inner=intermediate_size,
            n_head=num_heads,
            n_positions=max_positions,
            vocab_size=vocab_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **special,
        )
    if arch == "opt":
        # OPT has no GQA. word_embed_proj_dim defaults to 768 and must match hidden_size,
        # otherwise project_in/out Linear layers appear outside the blocks.
        return dict(
            num_hidden_layers=num_layers,
            hidden_size=hidden_size,
            ffn_dim=intermediate_size,
            num_attention_heads=num_heads,
            word_embed_proj_dim=hidden_size,
            max_position_embeddings=max_positions,
            vocab_size=vocab_size,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            **special,
        )
    if arch in ("llama", "qwen2", "qwen3", "mistral", "phi3"):
        kw: dict[str, Any] = dict(
            num_hidden_layers=num_layers,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_positions,
            vocab_size=vocab_size,
            **special,
        )
        if arch == "qwen3":
            kw["head_dim"] = hidden_size // num_heads  # Qwen3 defaults head_dim to 128
        return kw
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHS}")


def tiny_causal_lm(
    arch: Arch,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A tiny random causal LM in eval mode with deterministic weights.

    Every linear layer's ``in_features`` (hidden, intermediate, heads * head_dim) is divisible by
    4, so 2:4 groups fit. Architectures with grouped-query attention get ``num_kv_heads`` KV heads
    (default 4 query / 2 KV heads); GPT-2 and OPT ignore it. Dropout is off. Special token ids
    match :func:`offline_tokenizer`.

    Args:
        arch: One of :data:`TINY_ARCHS`.
        num_layers: Number of transformer blocks.
        hidden_size: Model width; divisible by ``4 * num_heads``.
        intermediate_size: MLP width; divisible by 4.
        vocab_size: Embedding rows; at least ``len(offline_tokenizer(vocab_size))``.
        num_heads: Attention heads.
        num_kv_heads: KV heads for GQA architectures; must divide ``num_heads``.
        max_positions: Context length written to the config.
        seed: Seed of the weight initialisation. The global RNG state is left untouched.
        dtype: Parameter dtype.
    """
    if hidden_size % (4 * num_heads) or intermediate_size % 4:
        raise ValueError(
            f"need hidden_size divisible by 4 * num_heads ({4 * num_heads}) and intermediate_size "
            f"divisible by 4; got {hidden_size} and {intermediate_size}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    kwargs = _arch_config(
        arch,
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_positions=max_positions,
    )
    config = AutoConfig.for_model(arch, **kwargs)
    # fork_rng so seeding here does not reset the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # from_config returns a train-mode model; pruning and tests want eval semantics.
    return model.eval()


def save_tiny_model(directory: str | os.PathLike[str], arch: Arch, **kwargs: Any) -> str:
    """Write :func:`tiny_causal_lm` and :func:`offline_tokenizer` to ``directory``.

    Args:
        directory: Target folder (created if needed).
        arch: Architecture, see :func:`tiny_causal_lm`.
        **kwargs: Forwarded to :func:`tiny_causal_lm` (``vocab_size`` also sizes the tokenizer).

    Returns:
        The folder as a string, ready for ``load_causal_lm`` / ``from_pretrained``.
    """
    directory = os.fspath(directory)
    model = tiny_causal_lm(arch, **kwargs)
    tokenizer = offline_tokenizer(kwargs.get("vocab_size", 512))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
