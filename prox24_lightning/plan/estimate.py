"""The run plan's figures: accelerator memory, host RAM and disk of a run, from a
:class:`~prox24_lightning.plan.shapes.ModelShape` and the run's :class:`RunSettings`.

This module owns the formulas (:func:`plan_run`), their constants, and :class:`RunPlan`, the
figures as rows and as a table (:meth:`RunPlan.table`).

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
* Activation cache: ``A = T h b`` (one copy: the next block's inputs replace the current ones),
  on the accelerator unless ``offload`` / ``offload_activations``.
* One batch in and out: ``2 t h b``; forward intermediates ``F = t w (4 b + 4)``, ``w`` the widest
  layer input or output (``max(h, d_out, d_in)``: the MLP's hidden layer), 4 tensors of it in the
  model dtype plus the fp32 copy the Gram update makes of a layer input.
* Evaluation (only when evaluation sets are configured), ``t_e = eval_batch_size x eval_seqlen``
  tokens per evaluation batch, ``V`` the vocabulary (head rows): the final hidden states and
  their shifted copy ``2 t_e h b``, and one chunk of logits ``c V 16`` (``c`` positions sized from
  the budget :data:`~prox24_lightning.metrics.CHUNK_BYTES`, at most 4 fp32 copies of each logit,
  :data:`~prox24_lightning.metrics.BYTES_PER_LOGIT`; see :mod:`~prox24_lightning.evaluation`).
  With offload, the activations of every evaluation window wait on the host between blocks:
  ``T_e h b`` for ``T_e`` evaluation tokens.
* **Accelerator peak** (the sum, not the max over phases: PyTorch's caching allocator keeps what a
  phase freed reserved): without offload ``W + max_k(G_k + N_k + S_k) + 2 t h b + F`` (+ ``A``
  when the activations stay on the device); with offload the weights term is one block plus the
  embeddings or the head plus the rest of the model: ``max_k(P_k b + G_k + N_k + S_k) + E + R``;
  plus the evaluation's hidden states and logit chunk.
* **Host RAM**: with offload ``W`` (each process holds the model) + ``A`` (if on the host) + the
  calibration ids ``8 T`` per process + the evaluation activations ``T_e h b``; without offload,
  ``A`` if on the host + ``8 T`` + one ``save_pretrained`` shard copied from the device at
  export, ``min(W, 50 GB)``.
* **Disk** under ``trainer.default_root_dir`` (checkpoints as
  :mod:`~prox24_lightning.pipeline.shards` writes them): per-block shards holding the block's
  pruned weights, written once, ``sum_l d_out d_in b`` in all; per-block mask files, 1 bit per
  targeted weight; ``last.ckpt`` with the run state only (the report, ~8 KiB per layer; twice
  while it is replaced); the export: ``W`` + masks (1 bit per targeted weight) + report. The
  token cache (``data.cache_dir``) holds ``8`` bytes per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..metrics import BYTES_PER_LOGIT, CHUNK_BYTES, tokens_per_chunk
from ..pipeline.distributed import assign_layers
from ..solvers.methods import make_config
from .shapes import BlockShape, LayerShape, ModelShape
from .solver_cost import EIGH_TFLOPS, GEMM_TFLOPS, layer_cost

__all__ = [
    "GB",
    "RunPlan",
    "RunSettings",
    "plan_run",
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
        eval_tokens: tokens of the evaluation sets (token cache; with offload, their
            activations on the host).
        eval_note: what the evaluation estimate could not count.
        eval_seqlen, eval_batch_size: evaluation window length (default ``seqlen``) and windows
            per evaluation batch.
        method: the pruning method (its own buffers join the accelerator peak).
        solver: its settings (a mapping, as the config's ``solver:``, or a method config).
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
    eval_seqlen: int | None = None
    eval_batch_size: int = 1
    method: str = "prox"
    solver: Any = None

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
    #: ``(method, TFLOP per block, seconds per block, seconds in all, buffer bytes)``, estimated
    #: for the largest block (``plan/solver_cost.py``); the run's method first.
    solver_cost: list[tuple[str, float, float, float, int]] = field(default_factory=list)
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
        if self.solver_cost:
            lines += [
                "",
                f"Solver cost (estimate; GEMMs at {GEMM_TFLOPS:g} TFLOP/s fp32, eigh at "
                f"{EIGH_TFLOPS:g} TFLOP/s fp64; plan/solver_cost.py)",
                "",
                "| method | TFLOP per block | s per block | h in all | method buffers GB |",
                "|---|---:|---:|---:|---:|",
            ]
            for label, tflop, seconds, total, nbytes in self.solver_cost:
                lines.append(
                    f"| {label} | {tflop:.3g} | {seconds:.3g} | {total / 3600:.3g} | "
                    f"{nbytes / GB:.2f} |"
                )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _solved_at_once(
    block: BlockShape,
    sequential: str,
    world_size: int,
    extra: Callable[[list[LayerShape]], int] | None = None,
) -> list[LayerShape]:
    """The layers of ``block`` one rank holds solver state for at the same time (the largest
    share: a whole block, or the largest group with ``true_sequential``, split over ranks),
    sized by the normalised Grams and solver buffers plus ``extra`` (a method's own buffers)."""
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
            nbytes = sum(_solve_bytes(x) for x in mine) + (extra(mine) if extra else 0)
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

    config = make_config(s.method, s.solver)

    def own_bytes(layers: list[LayerShape]) -> int:
        """The method's own buffers for ``layers`` solved at once, plus one layer's transient."""
        costs = [layer_cost(s.method, config, x.d_out, x.d_in) for x in layers]
        transient = max((c.transient_bytes for c in costs), default=0)
        return sum(c.buffer_bytes for c in costs) + transient

    # The block that needs the most: its (block weights in offload mode +) Grams + solves.
    def block_need(block: BlockShape) -> tuple[int, int, int, int, int]:
        at_once = _solved_at_once(block, s.sequential, world, own_bytes)
        normalised = sum(4 * x.d_in**2 for x in at_once)
        solver = sum(SOLVER_COPIES * 4 * x.numel for x in at_once)
        own = own_bytes(at_once)
        weights = block.params * b if s.offload else 0
        total = weights + block.gram_bytes() + normalised + solver + own
        return total, normalised, solver, own, len(at_once)

    worst = max(shape.blocks, key=lambda blk: block_need(blk)[0])
    _, normalised, solver, own, n_at_once = block_need(worst)
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
    if own:
        plan.device.append(
            (
                f"{s.method} buffers",
                own,
                f"its own state for {n_at_once} layers at once + one layer's transient "
                "(plan/solver_cost.py)",
            )
        )
    plan.solver_cost = _solver_costs(shape, s.method, config, own)
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
    # Evaluation sets are configured when the token cache counts some or names unknown ones.
    evaluates = s.eval_tokens > 0 or bool(s.eval_note)
    if evaluates:
        eval_seqlen = s.eval_seqlen or s.seqlen
        eval_batch = s.eval_batch_size * eval_seqlen
        plan.device.append(
            (
                "evaluation: final hidden states (x2)",
                2 * eval_batch * h * b,
                f"2 x {s.eval_batch_size} x {eval_seqlen} x {h} x {b} B (and the shifted copy)",
            )
        )
        vocab = shape.head_params // h if h else 0
        if vocab:
            positions = s.eval_batch_size * max(eval_seqlen - 1, 1)
            chunk = min(positions, tokens_per_chunk(vocab, CHUNK_BYTES))
            plan.device.append(
                (
                    "evaluation: one chunk of logits",
                    chunk * vocab * BYTES_PER_LOGIT,
                    f"{chunk} positions x {vocab} vocab x {BYTES_PER_LOGIT} B (budget "
                    f"{CHUNK_BYTES / 2**20:.0f} MiB; the head runs chunk by chunk)",
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
    if s.offload and s.eval_tokens:
        plan.host.append(
            (
                "evaluation activations (offload: every window waits between blocks)",
                s.eval_tokens * h * b,
                f"{s.eval_tokens:,} evaluation tokens x {h} x {b} B",
            )
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


def _solver_costs(
    shape: ModelShape, method: str, config: Any, own_bytes: int
) -> list[tuple[str, float, float, float, int]]:
    """The run's method, then the default prox, ALPS, SparseGPT and Wanda, on the largest block
    (time per block) and on every block (time in all)."""
    runs: list[tuple[str, str, Any]] = [(f"{method} (this run)", method, config)]
    for other in ("prox", "alps", "sparsegpt", "wanda"):
        other_config = make_config(other)
        if other != method or other_config != config:
            runs.append((f"{other} (default)", other, other_config))
    rows = []
    for label, name, cfg in runs:
        per_block = [
            [layer_cost(name, cfg, x.d_out, x.d_in) for x in block.layers] for block in shape.blocks
        ]
        times = [sum(c.seconds() for c in costs) for costs in per_block]
        worst = max(range(len(times)), key=times.__getitem__) if times else 0
        costs = per_block[worst] if per_block else []
        flops = sum(c.flops for c in costs)
        buffers = sum(c.buffer_bytes for c in costs) + max(
            (c.transient_bytes for c in costs), default=0
        )
        rows.append((label, flops / 1e12, times[worst] if times else 0.0, sum(times), buffers))
    return rows
