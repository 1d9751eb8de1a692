"""The method registry: one class per pruning method, each with its config dataclass
(:mod:`~prox24_lightning.solvers.configs`).

:data:`METHODS` (``{name: class}``) is the only place method names live. A method turns a
layer's dense normalised weight ``Ŵ̃`` (paper.md §4.1: ``W̃ = W diag(H)^½``) into its starting
point for the :class:`~prox24_lightning.optim.Prox24` optimizer:

* a one-shot method (magnitude, Wanda, SparseGPT, ALPS, ADMM) returns a 2:4 weight and its mask; the
  optimizer then only refines on that mask ("+GD" when ``refine_steps > 0``);
* ``prox`` returns nothing: the optimizer runs the proximal phase (Kübler et al., Algorithm 2)
  from ``Ŵ̃`` and freezes the support itself.

Configs are plain dataclasses. :func:`make_config` builds one from a mapping (a YAML ``solver:``
section): ``recipe`` names an entry of :data:`RECIPES` to start from (without one, prox starts
from ``RECIPES["default"]``, every other method from its config class's defaults; the fields of
``ProxConfig()`` itself are the paper's), other keys override its fields, keys that belong to another method only (``beta`` given to Wanda when a config is reused
with ``--model.init_args.method wanda``) are ignored, unknown keys are refused, and every value is
validated before any work starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from ..ops.gram import DiagonalNormalization
from .admm import admm_prune
from .alps import alps_prune
from .baselines import magnitude_prune, sparsegpt_prune, wanda_prune
from .configs import (
    RECIPES,
    ADMMConfig,
    ALPSConfig,
    MagnitudeConfig,
    MethodConfig,
    ProxConfig,
    SparseGPTConfig,
    WandaConfig,
)

__all__ = [
    "METHODS",
    "RECIPES",
    "ADMMConfig",
    "ALPSConfig",
    "MagnitudeConfig",
    "MethodConfig",
    "ProxConfig",
    "PruningMethod",
    "SparseGPTConfig",
    "WandaConfig",
    "get_method",
    "make_config",
]


class PruningMethod:
    """A pruning method: its name, config class and starting point for the optimizer.

    Subclasses set :attr:`name`, :attr:`config_class` and :attr:`default_refine_steps`, and
    implement :meth:`one_shot`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: refinement steps when ``config.refine_steps`` is ``None``.
    default_refine_steps: ClassVar[int] = 0

    @classmethod
    def default_config(cls) -> MethodConfig:
        """What a config without ``recipe`` starts from (``prune_weight`` without a config, a
        YAML ``solver`` mapping): the config class's defaults."""
        return cls.config_class()

    @classmethod
    def refine_steps(cls, config: MethodConfig) -> int:
        if config.refine_steps is not None:
            return int(config.refine_steps)
        return cls.default_refine_steps

    @classmethod
    def one_shot(
        cls, target: Tensor, norm: DiagonalNormalization, config: Any
    ) -> tuple[Tensor, Tensor] | None:
        """``(weight, mask)`` in normalised coordinates, or ``None`` for an iterative method."""
        raise NotImplementedError


class Magnitude(PruningMethod):
    """Keep the two largest ``|W|`` of each group (original coordinates)."""

    name = "magnitude"
    config_class = MagnitudeConfig

    @classmethod
    def one_shot(
        cls, target: Tensor, norm: DiagonalNormalization, config: Any
    ) -> tuple[Tensor, Tensor]:
        return magnitude_prune(target, norm.scale)


class Wanda(PruningMethod):
    """Sun et al. (ICLR 2024): keep the two largest ``|W_ij| sqrt(H_jj) = |W̃_ij|``."""

    name = "wanda"
    config_class = WandaConfig

    @classmethod
    def one_shot(
        cls, target: Tensor, norm: DiagonalNormalization, config: Any
    ) -> tuple[Tensor, Tensor]:
        return wanda_prune(target)


class SparseGPT(PruningMethod):
    """Frantar & Alistarh (ICML 2023): OBS updates column by column with a lazy 2:4 mask."""

    name = "sparsegpt"
    config_class = SparseGPTConfig

    @classmethod
    def one_shot(
        cls, target: Tensor, norm: DiagonalNormalization, config: SparseGPTConfig
    ) -> tuple[Tensor, Tensor]:
        return sparsegpt_prune(
            target,
            norm.gram,
            blocksize=config.sparsegpt_blocksize,
            dampening=config.sparsegpt_dampening,
        )


class ALPS(PruningMethod):
    """Meng et al. (NeurIPS 2024): ADMM with a support-driven ``rho`` schedule, then PCG."""

    name = "alps"
    config_class = ALPSConfig

    @classmethod
    def one_shot(
        cls, target: Tensor, norm: DiagonalNormalization, config: ALPSConfig
    ) -> tuple[Tensor, Tensor]:
        return alps_prune(
            target,
            norm,
            rho0=config.alps_rho0,
            max_iterations=config.alps_max_iterations,
            update_every=config.alps_update_every,
            min_iterations=config.alps_min_iterations,
            rho_max=config.alps_rho_max,
            pcg_iterations=config.alps_pcg_iterations,
            dampening=config.alps_dampening,
            dampening_space=config.alps_dampening_space,
        )


class ADMM(PruningMethod):
    """Boža (2024): ADMM weight update with a gradually growing 2:4 mask."""

    name = "admm"
    config_class = ADMMConfig

    @classmethod
    def one_shot(
        cls, target: Tensor, norm: DiagonalNormalization, config: ADMMConfig
    ) -> tuple[Tensor, Tensor]:
        return admm_prune(
            target,
            norm.gram,
            iterations=config.admm_iterations,
            mask_iterations=config.admm_mask_iterations,
            rho=config.admm_rho,
            dampening=config.admm_dampening,
            exponent=config.admm_schedule_exponent,
        )


class Prox(PruningMethod):
    """Kübler et al. (TMLR 2025): proximal gradient with the 2:4 regularizer, then refinement."""

    name = "prox"
    config_class = ProxConfig
    default_refine_steps = 1000

    @classmethod
    def default_config(cls) -> MethodConfig:
        """``RECIPES["default"]`` (``ProxConfig()`` itself holds the paper's values)."""
        return dataclasses.replace(RECIPES["default"])

    @classmethod
    def one_shot(
        cls, target: Tensor, norm: DiagonalNormalization, config: Any
    ) -> tuple[Tensor, Tensor] | None:
        """``None`` (the optimizer runs the prox phase from ``Ŵ̃``), or the warm start's 2:4
        weights (``ProxConfig.warm_start``), which skip the prox phase."""
        warm = getattr(config, "warm_start", "none")
        if warm == "alps":
            return alps_prune(target, norm, dampening_space="normalized", pcg_iterations=0)
        if warm == "sparsegpt":
            return sparsegpt_prune(target, norm.gram)
        return None


#: Every method by name: the one registry (the CLI, ``prune_weight`` and the pipeline read it).
METHODS: dict[str, type[PruningMethod]] = {
    m.name: m for m in (Magnitude, Wanda, SparseGPT, Prox, ALPS, ADMM)
}


def get_method(name: str) -> type[PruningMethod]:
    """The registered method ``name``, or a ``ValueError`` listing the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def make_config(
    method: str, settings: MethodConfig | Mapping[str, Any] | None = None, **overrides: Any
) -> MethodConfig:
    """The validated config of ``method`` from a dataclass or a mapping, plus ``overrides``.

    A mapping may name a ``recipe`` (a key of :data:`RECIPES`) to start from; another method than
    prox takes only the fields it shares with the recipe (the refinement). Keys of another
    method's config are ignored (one YAML serves every method); keys no method knows are
    refused, naming the valid ones.
    """
    cls = get_method(method).config_class
    if isinstance(settings, MethodConfig):
        values = {
            f.name: getattr(settings, f.name)
            for f in dataclasses.fields(settings)
            if f.name in _field_names(cls)
        }
    else:
        values = dict(settings or {})
    values.update(overrides)
    recipe = values.pop("recipe", None)
    base: MethodConfig = get_method(method).default_config()
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(
                f"unknown solver.recipe {recipe!r}; choose one of {', '.join(RECIPES)}"
            )
        # A baseline given a prox recipe (demo.yaml with ``--model.init_args.method wanda``)
        # takes the fields it shares with it, the refinement, as it takes any prox-only key.
        shared = {
            k: getattr(RECIPES[recipe], k) for k in _field_names(cls) & _field_names(ProxConfig)
        }
        base = cls(**shared)
    own = _field_names(cls)
    known = set().union(*(_field_names(m.config_class) for m in METHODS.values()))
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown solver setting(s) {', '.join(unknown)} for method {method!r}; valid: "
            + ", ".join(["recipe", *sorted(own)])
        )
    config = dataclasses.replace(base, **{k: v for k, v in values.items() if k in own})
    config.validate()
    return config
