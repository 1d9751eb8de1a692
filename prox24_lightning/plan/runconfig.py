"""The run plan of a ``prox24 fit`` config: :func:`plan_from_config` reads the model spec, the
data and the trainer settings of the parsed config (a jsonargparse ``Namespace`` or its dump as a
mapping) into a :class:`~prox24_lightning.plan.shapes.ModelShape` and
:class:`~prox24_lightning.plan.estimate.RunSettings`, and the evaluation sets into the token
cache's size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..data.sources import estimate_eval_tokens, to_source
from ..data.windows import resolve_seqlen
from .estimate import RunPlan, RunSettings, plan_run
from .shapes import load_model_config, model_shape, resolve_dtype

__all__ = ["device_count", "plan_from_config"]


def _get(mapping: Any, key: str, default: Any = None) -> Any:
    if mapping is None:
        return default
    if hasattr(mapping, "get"):
        value = mapping.get(key, default)
    else:
        value = getattr(mapping, key, default)
    return default if value is None else value


def _as_dict(cfg: Any) -> dict[str, Any]:
    """A jsonargparse ``Namespace`` (or a mapping) as plain nested dicts."""
    if hasattr(cfg, "as_dict"):
        return cfg.as_dict()
    return dict(cfg)


def device_count(devices: Any) -> int:
    """Processes on this machine for ``trainer.devices`` (``auto``/-1 count as one: unknown); the
    CLI reads the same number to choose the pruner's strategy."""
    if isinstance(devices, int) and not isinstance(devices, bool):
        return max(1, devices)
    if isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    text = str(devices).strip()
    if text.isdigit():
        return max(1, int(text))
    if "," in text:
        return max(1, len([d for d in text.split(",") if d.strip()]))
    return 1


def _eval_tokens(data: Mapping[str, Any], seqlen: int) -> tuple[int, str]:
    """Evaluation tokens for the token cache, and what could not be estimated; ``seqlen`` is
    the resolved evaluation window length. Each set's kind estimates its own size."""
    cap = _get(data, "max_eval_windows")
    total, unknown = 0, []
    for name, source in (_get(data, "validation") or {}).items():
        tokens = estimate_eval_tokens(
            source, seqlen=seqlen, max_windows=None if cap is None else int(cap)
        )
        if tokens is None:
            unknown.append(str(name))
        else:
            total += tokens
    note = f"token cache: evaluation sets {unknown} not counted (size unknown)" if unknown else ""
    return total, note


def plan_from_config(run_config: Any) -> RunPlan | None:
    """The plan of a ``prox24 fit`` config (the parsed config, or its dump as a mapping), or
    ``None`` when the model is not a ``BlockwisePruner`` (e.g. ``MaskedFinetuner``)."""
    cfg = _as_dict(run_config)
    model = cfg.get("model") or {}
    class_path = str(model.get("class_path", ""))
    if class_path.rpartition(".")[2] != "BlockwisePruner":
        return None
    init = model.get("init_args") or {}
    data = cfg.get("data") or {}
    trainer = cfg.get("trainer") or {}
    if data.get("calibration") is not None:
        to_source(data["calibration"])  # an unknown source name fails here, as fit would
    spec = str(init["model_name_or_path"])
    config = load_model_config(
        spec,
        revision=init.get("revision"),
        gguf_file=init.get("gguf_file"),
        trust_remote_code=bool(init.get("trust_remote_code", False)),
    )
    dtype = resolve_dtype(config, init.get("dtype") or "auto", trainer.get("precision"))
    shape = model_shape(
        config,
        dtype=dtype,
        targets=init.get("targets"),
        ignore=init.get("ignore"),
        trust_remote_code=bool(init.get("trust_remote_code", False)),
    )
    # The window lengths fit runs at (the same resolution as PruningDataModule's).
    seqlen = resolve_seqlen(_get(data, "seqlen"), shape.max_positions)
    eval_seqlen = int(_get(data, "eval_seqlen", seqlen))
    eval_tokens, eval_note = _eval_tokens(data, eval_seqlen)
    settings = RunSettings(
        nsamples=int(_get(data, "nsamples", 128)),
        seqlen=seqlen,
        eval_seqlen=eval_seqlen,
        eval_batch_size=int(_get(data, "eval_batch_size", 1)),
        batch_size=int(_get(data, "batch_size", 1)),
        offload=bool(init.get("offload", False)),
        offload_activations=bool(init.get("offload_activations", False)),
        sequential=str(init.get("sequential") or "block"),
        world_size=device_count(trainer.get("devices", 1)),
        eval_tokens=eval_tokens,
        eval_note=eval_note,
        method=str(init.get("method") or "prox"),
        # Unset keys of the typed settings (``SolverSettings``) are None: the method's defaults.
        solver={k: v for k, v in (init.get("solver") or {}).items() if v is not None},
    )
    return plan_run(shape, settings, model_name=spec)
