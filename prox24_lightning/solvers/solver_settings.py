"""The ``solver:`` section as a type the command line knows: :class:`SolverSettings`.

Every method's config dataclass (:mod:`~prox24_lightning.solvers.configs`) declares its own
settings. The pruner takes one ``solver`` mapping for all of them (a YAML file serves every
method; ``recipe`` names a prox recipe to start from), so the type jsonargparse sees is their
union: one optional field per setting, ``None`` meaning "the method's default". It is built from
the config classes (nothing is written twice): their field types, their docs, and their defaults,
which go into each field's help. A misspelt key (``solver.betta``) then fails while the command
line is parsed, naming it, and ``prox24 fit --help`` lists every key with its type and default.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Optional

from docstring_parser import parse as parse_docstring

from .configs import RECIPES
from .methods import METHODS, MethodConfig

__all__ = ["SolverSettings", "as_solver_mapping"]


def _field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` sections of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass.__doc__:
            for param in parse_docstring(klass.__doc__).params:
                if param.description:
                    docs[param.arg_name] = " ".join(param.description.split())
    return docs


def _defaults_text(name: str) -> str:
    """Where the default of ``name`` comes from, per method (prox: its ``default`` recipe)."""
    by_value: dict[str, list[str]] = {}
    for method, cls in METHODS.items():
        config = cls.default_config()
        if name in {f.name for f in dataclasses.fields(config)}:
            value = getattr(config, name)
            if name == "refine_steps" and value is None:
                value = cls.default_refine_steps
            by_value.setdefault(repr(value), []).append(method)
    if not by_value:
        return ""
    if len(by_value) == 1:
        ((value, methods),) = by_value.items()
        who = "every method" if len(methods) == len(METHODS) else ", ".join(methods)
        return f"null = {value} ({who})."
    parts = [f"{', '.join(methods)}: {value}" for value, methods in by_value.items()]
    return "null = " + "; ".join(parts) + "."


def _build() -> type:
    configs = [m.config_class for m in METHODS.values()]
    hints: dict[str, Any] = {}
    docs: dict[str, str] = {}
    for cls in configs:
        hints.update(typing.get_type_hints(cls))
        docs.update(_field_docs(cls))
    names: list[str] = []
    for cls in configs:
        names += [f.name for f in dataclasses.fields(cls) if f.name not in names]
    fields: list[tuple[str, Any, Any]] = [
        ("recipe", Optional[str], dataclasses.field(default=None))  # noqa: UP045
    ]
    lines = [
        "recipe: a named prox recipe to start from, one of "
        + ", ".join(RECIPES)
        + " (method prox without one runs default); other keys override it."
    ]
    for name in names:
        fields.append((name, Optional[hints[name]], dataclasses.field(default=None)))  # noqa: UP045
        owners = [
            m
            for m, c in METHODS.items()
            if name in {f.name for f in dataclasses.fields(c.config_class)}
        ]
        scope = "" if len(owners) == len(METHODS) else f"[{', '.join(owners)}] "
        lines.append(f"{name}: {scope}{docs.get(name, '')} {_defaults_text(name)}".strip())
    cls = dataclasses.make_dataclass("SolverSettings", fields, frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = (
        "The method's settings (``model.init_args.solver``); unset keys keep the method's "
        "defaults, keys of another method are ignored.\n\n    Attributes:\n"
        + "\n".join(f"        {line}" for line in lines)
        + "\n"
    )
    return cls


#: The union of every method's settings, each optional (see the module docstring).
SolverSettings = _build()


def as_solver_mapping(settings: Any) -> Mapping[str, Any] | MethodConfig | None:
    """The keys a :class:`SolverSettings` sets (a mapping or a config passes through), for
    :func:`~prox24_lightning.solvers.make_config`."""
    if isinstance(settings, SolverSettings):
        return {
            f.name: getattr(settings, f.name)
            for f in dataclasses.fields(settings)
            if getattr(settings, f.name) is not None
        }
    return settings
