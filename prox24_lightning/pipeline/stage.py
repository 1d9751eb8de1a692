"""``BlockStage``: one transformer block pruned — calibrate, solve every layer, propagate.

Plain PyTorch. The driver (the Lightning pruner, or any loop) creates a stage for block ``k``,
feeds it every calibration batch with :meth:`BlockStage.calibrate`, then calls
:meth:`BlockStage.finish`, which

1. sums each distinct layer input's Gram ``H = Σ x xᵀ`` over the ranks (q/k/v and gate/up share
   theirs, :class:`~prox24_lightning.calibration.GramCollector`),
2. solves the layers this rank owns (:func:`~prox24_lightning.pipeline.distributed.assign_layers`)
   as :class:`~prox24_lightning.solvers.LayerSolve` problems in the shared
   :class:`~prox24_lightning.optim.Prox24`, one ``step()`` advancing them all; a layer is written
   and freed as soon as it is done, a Gram as soon as its solves hold their normalised copies,
3. broadcasts every weight and mask from its owner, so all ranks hold the same block, and
4. runs the pruned block over the cached inputs to produce the next block's
   (``propagation="pruned"``; with ``"dense"`` they were stored during calibration).

``sequential="true_sequential"`` solves the groups of layers sharing an input one after the other
(q/k/v -> o -> gate/up -> down), re-collecting each group's Gram on the partly pruned block.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..calibration import GramCollector
from ..faults import maybe_fail
from ..models import get_weight_matrix, run_block, set_weight_matrix
from ..ops.gram import GramSpread
from ..optim import Prox24
from ..solvers import LayerSolve, MethodConfig, PruneResult, needs_spread
from .distributed import Collective, all_gather_objects, assign_layers, broadcast_
from .inputs import BlockInputCache

__all__ = ["BlockStage", "StageSettings", "check_finite"]


def check_finite(x: Tensor, what: str) -> None:
    """Raise ``FloatingPointError`` naming ``what`` if ``x`` holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"NaN or Inf in the {what}; masks saved so far are kept")


@dataclass(frozen=True)
class StageSettings:
    """How every block is pruned (the pruner's settings, fixed for the run)."""

    method: str
    config: MethodConfig
    propagation: Literal["pruned", "dense"] = "pruned"
    sequential: Literal["block", "true_sequential"] = "block"
    #: solver iterations between progress reports.
    progress_every: int = 50


#: ``progress(block, iteration, [LayerSolve.progress() of each active solve])``.
ProgressFn = Callable[[int, int, list[dict[str, Any]]], None]


class BlockStage:
    """Block ``index`` being pruned: its layers, Gram collector and solves.

    Args:
        index: the block's position.
        name: its qualified name (for messages).
        block: the module (on the compute device for the whole stage).
        layers: ``{qualified name: linear module}`` of the targeted layers, in module order.
        settings: method, config, propagation and sequential mode.
        cache: the block inputs (current and next).
        device: the compute device.
        optimizer: the shared :class:`Prox24` that owns the solves while they run.
        step: advances ``optimizer`` by one iteration (the Lightning-wrapped ``step``).
        collective: sums over ranks; :class:`~.distributed.SingleProcess` without DDP.
        progress: optional callback every ``settings.progress_every`` iterations (closed with
            the stage if it has a ``close``).
        placement: a context entered for the whole stage (e.g. the block onloaded to the
            device, written back on :meth:`close`).
    """

    def __init__(
        self,
        index: int,
        name: str,
        block: nn.Module,
        layers: dict[str, nn.Module],
        settings: StageSettings,
        cache: BlockInputCache,
        device: torch.device,
        optimizer: Prox24,
        step: Callable[[], object],
        collective: Collective,
        progress: ProgressFn | None = None,
        placement: AbstractContextManager[Any] | None = None,
    ) -> None:
        # The block's placement (offload mode: onloaded, written back when the stage closes)
        # holds from before the Gram hooks are registered to after propagation.
        self._placement = ExitStack()
        if placement is not None:
            self._placement.enter_context(placement)
        self.index, self.name, self.block = index, name, block
        self.layers = layers
        self.settings = settings
        self.cache = cache
        self.device = device
        self.optimizer = optimizer
        self._step = step
        self.collective = collective
        self.progress = progress
        #: the sequences' spread only where the solver uses it (the shrinkage ridge)
        self.track_spread = needs_spread(settings.config)
        self.collector: GramCollector | None = GramCollector(layers, spread=self.track_spread)
        #: calibration tokens that entered each layer (summed over ranks), after the solve.
        self.tokens: dict[str, int] = {}
        #: their calibration sequences' spread (summed over ranks), for the shrinkage ridge.
        self.spreads: dict[str, GramSpread | None] = {}
        #: layer solves this rank ran in this stage.
        self.local_solves = 0
        cache.start_block()

    # ------------------------------------------------------------------------- calibrate
    @torch.no_grad()
    def calibrate(self, batch: int, hidden: Tensor, kwargs: dict[str, Any]) -> None:
        """Run the block on one batch, accumulating the Grams of its layer inputs."""
        assert self.collector is not None, "calibrate() after finish()"
        with self.collector.forward_pass():
            out = run_block(self.block, hidden, kwargs)
        if not bool(torch.isfinite(out).all()):
            bad = _first_nonfinite_gram(self.collector)
            where = f"; first seen in the Gram matrix of the input of layer {bad}" if bad else ""
            raise FloatingPointError(
                f"NaN or Inf in the calibration activations of block {self.index} "
                f"({self.name}){where}; masks saved so far are kept"
            )
        if self.settings.propagation == "dense":
            self.cache.put_next(batch, out, kwargs)

    # ---------------------------------------------------------------------------- finish
    def finish(self) -> dict[str, PruneResult]:
        """Solve every layer, write the 2:4 weights, and fill the next block's inputs."""
        collector = self.collector
        assert collector is not None, "finish() twice"
        groups = collector.groups()
        results: dict[str, PruneResult] = {}
        if self.settings.sequential == "true_sequential" and len(groups) > 1:
            results.update(self._solve(groups[0], collector))
            collector.free()  # the later groups' Grams came from the dense block: re-collected
            for group in groups[1:]:
                # Re-collect this group's input on the block whose earlier groups are pruned.
                collector.remove()
                sub = GramCollector({n: self.layers[n] for n in group}, spread=self.track_spread)
                self._replay(sub, store=False)
                results.update(self._solve(group, sub))
                sub.remove()
        else:
            results.update(self._solve([n for g in groups for n in g], collector))
        collector.remove()
        self.collector = None
        if self.settings.propagation == "pruned":
            self._replay(None, store=True)
        return results

    @torch.no_grad()
    def _replay(self, collector: GramCollector | None, *, store: bool) -> None:
        """Run the block over every cached calibration batch of this rank."""
        # On the device as the cache copies (non-blocking from pinned host buffers).
        for i, h, kw in self.cache.items(self.index, self.device):
            if collector is not None:
                with collector.forward_pass():
                    out = run_block(self.block, h, kw)
            else:
                out = run_block(self.block, h, kw)
            if store:
                check_finite(out, f"output of pruned block {self.index} ({self.name})")
                self.cache.replace_batch(i, out)  # one copy of the activations, not two

    # ----------------------------------------------------------------------------- solve
    def _solve(self, names: list[str], collector: GramCollector) -> dict[str, PruneResult]:
        """Solve the layers ``names`` (independent problems) and write them on every rank."""
        grams: dict[str, Tensor] = {}
        for name in names:
            lead = collector.leader[name]
            if lead not in grams:
                # Every rank calibrated on its own shard: sum the statistics.
                grams[lead] = self.collective.reduce(collector.gram_of(name), "sum")
                count = torch.tensor(collector.tokens_of(name), device=self.device)
                self.tokens[lead] = int(self.collective.reduce(count, "sum"))
                self.spreads[lead] = None
                if self.track_spread:
                    spread = self.collective.reduce(collector.spread_sums_of(name), "sum")
                    self.spreads[lead] = GramSpread.from_sums(spread)
            # Checked on every rank (the values agree), so all ranks stop together.
            if not bool(torch.isfinite(grams[lead]).all()):
                raise FloatingPointError(
                    f"NaN or Inf in the Gram matrix of layer {name} (block {self.index}); masks "
                    "saved so far are kept"
                )
            if not bool(torch.isfinite(get_weight_matrix(self.layers[name])).all()):
                raise FloatingPointError(
                    f"NaN or Inf in the weights of layer {name} (block {self.index}); masks saved "
                    "so far are kept"
                )
            self.tokens[name] = self.tokens[lead]
            self.spreads[name] = self.spreads[lead]
        owners = assign_layers(
            {n: _solve_cost(self.layers[n]) for n in names}, self.collective.world_size
        )
        # Built by a function: no local variable here keeps a finished solve (its Gram) alive.
        solves = {
            name: self._start_solve(name, grams[collector.leader[name]])
            for name in names
            if owners[name] == self.collective.rank
        }
        grams.clear()
        collector.free(names)
        solved = self._run(solves)
        return self._share(names, owners, solved)

    def _start_solve(self, name: str, gram: Tensor) -> LayerSolve:
        """Layer ``name``'s solve, attached to the optimizer."""
        solve = LayerSolve(
            get_weight_matrix(self.layers[name]),
            gram,
            self.settings.method,
            self.settings.config,
            # An absolute lambda0 then means the same at any calibration size (ProxConfig).
            n_tokens=self.tokens[name],
            # The shrinkage ridge (ProxConfig.ridge_shrinkage) is estimated from it.
            spread=self.spreads[name],
        )
        solve.attach(self.optimizer, name)
        self.local_solves += 1
        return solve

    def _run(self, solves: dict[str, LayerSolve]) -> dict[str, PruneResult]:
        """Step this rank's solves to the end; each layer is written and freed when done."""
        finished: dict[str, PruneResult] = {}

        def harvest() -> None:
            for name in [n for n, s in solves.items() if s.done()]:
                solve = solves.pop(name)
                result = solve.result()
                solve.detach()
                result.stats.extra["solved_by_rank"] = self.collective.rank
                layer = self.layers[name]
                set_weight_matrix(layer, result.weight)
                # The layer now holds the very same values: keep a view, not a second copy.
                finished[name] = replace(result, weight=get_weight_matrix(layer).detach())

        steps = 0
        every = self.settings.progress_every
        harvest()
        while solves:
            self._step()
            maybe_fail("solver")
            _observe(solves)  # a function, so no loop variable keeps a finished solve alive
            harvest()
            steps += 1
            if self.progress is not None and steps % every == 0:
                self.progress(self.index, steps, [s.progress() for s in solves.values()])
        if self.collective.world_size > 1:
            # Ranks solve different layers, hence take different numbers of steps. Lightning
            # counts optimizer steps in ``global_step``, and its checkpoint callbacks decide by
            # it (collectively) whether to save: pad with empty steps up to the slowest rank.
            most = self.collective.reduce(torch.tensor(steps, device=self.device), "max")
            for _ in range(int(most) - steps):
                self._step()
        return finished

    def _share(
        self, names: list[str], owners: dict[str, int], solved: dict[str, PruneResult]
    ) -> dict[str, PruneResult]:
        """Broadcast each solved weight (into the layer, in place) and mask from its owner,
        and gather the stats, so that every rank holds every layer's result."""
        if self.collective.world_size == 1:
            return {name: solved[name] for name in names}
        gathered = all_gather_objects({n: r.stats for n, r in solved.items()})
        stats = {n: st for per_rank in gathered for n, st in per_rank.items()}
        rank = self.collective.rank
        results: dict[str, PruneResult] = {}
        for name in names:
            layer, owner = self.layers[name], owners[name]
            broadcast_(layer.weight.data, src=owner)
            weight = get_weight_matrix(layer).detach()
            if owner == rank:
                mask = solved[name].mask.to(torch.uint8)
            else:
                mask = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
            broadcast_(mask, src=owner)
            if owner == rank:
                results[name] = solved[name]
            else:
                results[name] = PruneResult(weight=weight, mask=mask.bool(), stats=stats[name])
        return results

    def close(self, error: BaseException | None = None) -> None:
        """End the stage: hooks removed, progress closed, placement left (after an ``error``
        the offloaded block is released without writing it back). Idempotent."""
        if self.collector is not None:
            self.collector.remove()
            self.collector = None
        close_progress = getattr(self.progress, "close", None)
        if close_progress is not None:
            close_progress()
        self.progress = None
        placement, self._placement = self._placement, ExitStack()
        if error is None:
            placement.close()
        else:
            placement.__exit__(type(error), error, error.__traceback__)


def _first_nonfinite_gram(collector: GramCollector) -> str | None:
    """The first layer (in forward order) whose accumulated input Gram is not finite."""
    for lead in collector.order:
        acc = collector.grams.get(lead)
        if acc is not None and not bool(torch.isfinite(acc.gram).all()):
            return lead
    return None


def _observe(solves: dict[str, LayerSolve]) -> None:
    for solve in solves.values():
        solve.observe()


def _solve_cost(layer: nn.Module) -> float:
    """Relative cost of one layer's solve: one iteration is the GEMM ``W H`` (``d_out d_in^2``)."""
    weight = get_weight_matrix(layer)
    return float(weight.shape[0]) * float(weight.shape[1]) ** 2
