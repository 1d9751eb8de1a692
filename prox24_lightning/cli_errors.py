"""Short errors for the ``prox24`` command: a user's mistake is one to three lines naming the
option, file or value and the fix, never a traceback (``--debug`` or ``PROX24_DEBUG=1`` shows it).

:func:`user_error` reads an exception (and the chain of causes jsonargparse and LightningCLI wrap
around it) and returns that short message, or ``None`` for an error that is not the user's (a
bug: the traceback is what its report needs). No Lightning import: the CLI calls it after it
failed.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import importlib
import inspect
import re
import typing
from argparse import ArgumentError
from collections.abc import Iterator, Sequence
from dataclasses import is_dataclass
from pathlib import Path

__all__ = ["DEBUG_HINT", "config_files", "user_error"]

DEBUG_HINT = "(--debug shows the traceback)"

_UNACCEPTED = re.compile(r"Option '([\w.]+)' is not accepted")
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)"')
_CLASS_PATH = re.compile(r"class_path '([\w.]+)'")
_UNRECOGNIZED = re.compile(r"[Uu]nrecognized arguments: --?([\w.]+)")
_GROUP_OPTION = re.compile(r"Group '([\w.]+)' does not accept option '(\w+)'")


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def config_files(argv: Sequence[str]) -> list[str]:
    """The ``--config``/``-c`` files named on a command line, in order."""
    files: list[str] = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _yaml_error(argv: Sequence[str]) -> str | None:
    """Which config file does not parse as YAML, and where (jsonargparse says ``<unicode
    string>``)."""
    import yaml

    for name in config_files(argv):
        try:
            yaml.safe_load(Path(name).read_text())
        except OSError as err:
            return f"config file {name}: {err.strerror or err}"
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            return f"config file {name}{where}: {problem} (not valid YAML)"
    return None


def _accepted_options(class_path: str, group: str = "") -> list[str]:
    """The options of ``class_path``'s constructor, or of its argument ``group`` when that is
    a dataclass (``solver``: :class:`~prox24_lightning.solvers.SolverSettings`)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        if group:
            hint = typing.get_type_hints(cls.__init__).get(group.split(".")[0])
            return [f.name for f in dataclasses.fields(hint)] if is_dataclass(hint) else []
        params = inspect.signature(cls.__init__).parameters
    except (ImportError, AttributeError, ValueError, TypeError, NameError):
        return []
    return [p for p in params if p != "self" and not p.startswith("_")]


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _parse_error(chain: list[BaseException], argv: Sequence[str]) -> str:
    text = "\n".join(str(e) for e in chain)
    root = str(chain[-1]).strip()
    key_match = _PARSER_KEY.search(text)
    key = key_match.group(1) if key_match else None
    if "Problems parsing config" in text or type(chain[-1]).__module__.startswith("yaml"):
        found = _yaml_error(argv)
        if found:
            return found
    class_path = _CLASS_PATH.search(text)
    nested = _GROUP_OPTION.search(text) or _UNRECOGNIZED.search(text)
    if nested and class_path and "." in ".".join(nested.groups()):
        group, _, option = ".".join(nested.groups()).rpartition(".")
        options = _accepted_options(class_path.group(1), group)
        where = f"--{key}.{group}.{option}" if key else f"--{group}.{option}"
        return f"unknown option {where}{_did_you_mean(option, options)}"
    unaccepted = _UNACCEPTED.search(text)
    if unaccepted:
        option = unaccepted.group(1)
        where = f"--{key}.{option}" if key else f"--{option}"
        class_path = _CLASS_PATH.search(text)
        options = _accepted_options(class_path.group(1)) if class_path else []
        known = f" ({class_path.group(1).rsplit('.', 1)[-1]})" if class_path else ""
        return f"unknown option {where}{known}{_did_you_mean(option, options)}"
    unrecognized = _UNRECOGNIZED.search(text)
    if unrecognized:
        return f"unknown option {unrecognized.group(1)}; `prox24 fit --help` lists the options"
    # The innermost message is the precise one; the wrappers add type dumps and usage text.
    first = root.splitlines()[0] if root else str(chain[0]).splitlines()[0]
    return f"--{key}: {first}" if key and key not in first else first


def _os_error(err: OSError) -> str:
    name = err.filename or ""
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            f"cannot write {name}: {err.strerror}; choose a writable --trainer.default_root_dir "
            "(or fix the folder's permissions)"
        )
    if err.errno == errno.ENOSPC:
        return f"disk full while writing {name}; free space or choose another disk"
    return str(err)


def user_error(err: BaseException, argv: Sequence[str] = ()) -> str | None:
    """The short message for a user's mistake behind ``err``, or ``None`` if it is not one.

    User mistakes are: command-line and config parse errors (jsonargparse's ``ArgumentError``),
    the project's own setting checks (``ValueError``), missing or unwritable files
    (``OSError``), invalid regular expressions (``re.error``), and the run-folder and disk
    refusals (:class:`~prox24_lightning.runfolder.RunFolderError`,
    :class:`~prox24_lightning.plan.InsufficientDiskSpace`).
    """
    chain = list(_chain(err))
    if any(isinstance(e, ArgumentError) for e in chain):
        return _parse_error(chain, argv)
    for e in chain:
        if type(e).__name__ in ("RunFolderError", "InsufficientDiskSpace"):
            return str(e)
    root = chain[-1]
    if isinstance(root, re.error):
        pattern = root.pattern if isinstance(root.pattern, str) else repr(root.pattern)
        return (
            f"invalid regular expression {pattern!r} in --model.targets/--model.ignore: {root.msg}"
        )
    if isinstance(root, OSError):
        return _os_error(root)
    if isinstance(root, ValueError):
        lines = str(root).strip().splitlines()
        return "\n".join(lines[:3]) if lines else type(root).__name__
    return None
