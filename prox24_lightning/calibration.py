"""Gram collection for the linear layers of one block, with shared inputs computed once.

No Lightning here: the pruner (and any plain-PyTorch driver) registers a :class:`GramCollector`
on a block, runs the block on calibration activations, and reads one fp32 Gram per *input*
(accumulated in IEEE fp32 whatever the global matmul precision, with its token count):
layers that consume the very same tensor in a forward pass (q/k/v, gate/up) share it, and the
order in which inputs first appear gives the true-sequential groups (q/k/v -> o -> gate/up ->
down for Llama) without any per-architecture table.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .models import in_features
from .ops.gram import GramAccumulator, GramSpread

__all__ = ["GramCollector"]


class GramCollector:
    """Forward hooks that accumulate ``H = sum_t x_t x_t^T`` per distinct layer input.

    Args:
        layers: ``{qualified name: module}`` (``nn.Linear`` or GPT-2 ``Conv1D``), in module order.
        only: names whose inputs are accumulated (``None``: all); hooks on other layers still run
            so that groups are discovered.
        spread: also track each input's sequence spread (:meth:`spread_of`; the shrinkage ridge).
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        *,
        only: set[str] | None = None,
        spread: bool = False,
    ) -> None:
        self.layers = layers
        self.only = only
        self.track_spread = spread
        #: layer name -> name of the first layer that consumed the same input (its "leader").
        self.leader: dict[str, str] = {}
        #: leaders in the order their input first appeared in a forward pass.
        self.order: list[str] = []
        self.grams: dict[str, GramAccumulator] = {}
        self._seen: list[tuple[Tensor, str]] = []
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            x = args[0]
            # Identity, not data_ptr: a freed activation's memory can be reused by another
            # tensor of the same shape; holding references in _seen for the pass prevents that.
            leader = next((lead for t, lead in self._seen if t is x), None)
            if leader is not None:
                self.leader[name] = leader
                return
            self._seen.append((x, name))
            self.leader[name] = name
            if name not in self.order:
                self.order.append(name)
            if self.only is not None and name not in self.only:
                return
            acc = self.grams.get(name)
            if acc is None:
                # The Gram lives where the layer's weight, and so its input, is.
                acc = self.grams[name] = GramAccumulator(
                    in_features(module), module.weight.device, spread=self.track_spread
                )
            acc.update(x.detach())

        return hook

    @contextmanager
    def forward_pass(self) -> Iterator[None]:
        """Wrap each block forward: input identities are only meaningful within one pass."""
        try:
            yield
        finally:
            self._seen.clear()

    def groups(self) -> list[list[str]]:
        """Layers grouped by shared input, groups in forward order, members in module order."""
        return [[n for n in self.layers if self.leader.get(n) == lead] for lead in self.order]

    def gram_of(self, name: str) -> Tensor:
        lead = self.leader.get(name)
        if lead is None or lead not in self.grams:
            raise RuntimeError(f"layer {name} saw no calibration input (is it used in forward?)")
        return self.grams[lead].gram

    def tokens_of(self, name: str) -> int:
        """Tokens summed in :meth:`gram_of`; pass it on as ``LayerSolve(..., n_tokens=...)`` so
        that lambda means the same at any calibration size (``ProxConfig``)."""
        return self.grams[self.leader[name]].n_tokens

    def spread_of(self, name: str) -> GramSpread | None:
        """How much the calibration sequences' Grams of ``name``'s input disagree (one host
        read); pass it on as ``LayerSolve(..., spread=...)`` for the shrinkage ridge."""
        return self.grams[self.leader[name]].spread

    def spread_sums_of(self, name: str) -> Tensor:
        """:meth:`~prox24_lightning.ops.gram.GramAccumulator.spread_sums` of ``name``'s input,
        for ranks to sum before :meth:`GramSpread.from_sums`."""
        return self.grams[self.leader[name]].spread_sums()

    def free(self, names: Iterable[str] | None = None) -> None:
        """Drop the accumulated Grams of the inputs of ``names`` (all Grams without ``names``).

        A Gram is ``d_in x d_in`` fp32 on the compute device (3.3 GB for Llama-2-70B's
        ``down_proj``); the pruner frees each one as soon as the solves that need it hold their
        own normalised copy, instead of keeping a block's worth until the block is done.
        """
        if names is None:
            self.grams.clear()
            return
        for name in names:
            self.grams.pop(self.leader.get(name, name), None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
