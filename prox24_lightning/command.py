"""The ``prox24`` executable: dispatch, help, and short errors.

``check``, ``plan`` and the top-level help are answered without building the LightningCLI (so
they start fast); ``fit``, ``validate`` and ``test`` go to :func:`prox24_lightning.cli.cli_main`.
A user's mistake ends in one to three lines and exit status 2
(:func:`~prox24_lightning.cli_errors.user_error`); ``--debug`` or ``PROX24_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import sys
import warnings
from collections.abc import Sequence

__all__ = ["main", "plan_main"]

SUBCOMMANDS = ("fit", "validate", "test")

TOP_HELP = """\
usage: prox24 {fit,validate,test,plan,check} [options]     (prox24 SUBCOMMAND --help for more)

2:4 pruning of causal LMs with the proximal operator of Kübler et al. (TMLR 2025), and the
baselines (ALPS, ADMM, SparseGPT, Wanda, magnitude), on PyTorch Lightning.

subcommands:
  fit        prune a model (one transformer block per epoch); resumable with --ckpt_path last
  validate   perplexity of a model (dense, pruned export or finetuned) on the evaluation sets
  test       the same on the test loaders
  plan       accelerator memory, host RAM, disk and solver time a `fit` with these arguments needs
  check      verify an export: every pruned layer exactly 2:4 and equal to its mask

examples:
  prox24 fit --config configs/demo.yaml
  prox24 fit --model.model_name_or_path DIR --data.calibration '{name: text, path: FILE}' \\
      --trainer.default_root_dir OUT
  prox24 fit ... --ckpt_path last          # resume the run in OUT
  prox24 plan --config configs/llama2-70b.yaml
  prox24 check OUT/export

options of every subcommand:
  --debug    show the full traceback of an error (also: PROX24_DEBUG=1)
  The pruner's options (model path, method, solver settings, targets): prox24 fit --help
  starts with them; `prox24 fit --model.help BlockwisePruner` prints only them.
"""


def _debug_requested(argv: list[str]) -> bool:
    """Remove ``--debug`` from ``argv``; true if it was there or ``PROX24_DEBUG`` is set."""
    flag = "--debug" in argv
    while "--debug" in argv:
        argv.remove("--debug")
    return flag or os.environ.get("PROX24_DEBUG", "") not in ("", "0", "false")


def _model_help(subcommand: str) -> str:
    """The pruner's options, as ``prox24 SUBCOMMAND --model.help BlockwisePruner`` prints them."""
    from .cli import cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli_main([subcommand, "--model.help", "BlockwisePruner"])
    text = out.getvalue()
    start = text.find("Help for --model.help")
    return text[start:] if start >= 0 else ""


PLAN_USAGE = """\
usage: prox24 plan --config CONFIG [other prox24 fit arguments]

Print the accelerator memory, host RAM, disk and solver time a `prox24 fit` with these arguments
needs, computed from the model's config alone (no weights are loaded), and whether the output disk
(trainer.default_root_dir) can hold the checkpoints and the export. Exit status 1 when it cannot.
"""


def parsed_fit_config(argv: Sequence[str]) -> dict:
    """The config ``prox24 fit ARGV`` would run, parsed and defaulted by the CLI's own parser
    without instantiating anything (LightningCLI's ``--print_config``, read back)."""
    import yaml

    from .cli import cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli_main(["fit", *argv, "--print_config"], exit_on_error=False)
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise
    return yaml.safe_load(out.getvalue())


def _calibration_coverage(cfg: dict) -> str | None:
    """For a local calibration source: whether the windows overlap, from the same tokenisation
    (and token cache) fit uses. Hub sources are not downloaded for a plan."""
    from .data import PruningDataModule
    from .data.sources import to_source

    data = dict(cfg.get("data") or {})
    source = to_source(data.get("calibration") or {})
    if source.kind.reads_hub(source):
        return None
    model = ((cfg.get("model") or {}).get("init_args") or {}).get("model_name_or_path")
    data["tokenizer"] = data.get("tokenizer") or model
    from .cli import max_positions

    data["max_positions"] = max_positions(model)
    return PruningDataModule(**data).calibration_overlap()


def _run_folder_note(root: str, ckpt_path: str | None) -> str | None:
    """What ``fit`` would say about the run folder (default callback folders), as a note."""
    from pathlib import Path

    from .runfolder import RunFolder, RunFolderError, guard_fit

    folder = RunFolder(
        root=Path(root),
        checkpoints=Path(root) / "checkpoints",
        masks=Path(root) / "masks",
        export=Path(root) / "export",
    )
    try:
        guard_fit(folder, ckpt_path, overwrite=False, resume_command="the same command")
    except RunFolderError as err:
        return f"fit with these arguments would refuse: {str(err).splitlines()[0]}"
    return None


def plan_main(argv: list[str]) -> int:
    """``prox24 plan``: print the plan; exit status 1 when the output disk is too small."""
    if not argv or argv[0] in ("-h", "--help"):
        print(PLAN_USAGE)
        return 0 if argv else 2
    from .plan import InsufficientDiskSpace, check_disk, existing_parent, plan_from_config
    from .plan.estimate import GB

    cfg = parsed_fit_config(argv)
    plan = plan_from_config(cfg)
    if plan is None:
        print("prox24 plan sizes pruning runs (model: BlockwisePruner); nothing to plan")
        return 2
    print(plan.table())
    coverage = _calibration_coverage(cfg)
    if coverage:
        print(f"\nWARNING: {coverage}")
    root = (cfg.get("trainer") or {}).get("default_root_dir") or os.getcwd()
    folder_note = _run_folder_note(root, cfg.get("ckpt_path"))
    if folder_note:
        print(f"\nNOTE: {folder_note}")
    try:
        free = check_disk(plan, root, resume=cfg.get("ckpt_path") is not None)
    except InsufficientDiskSpace as err:
        print(f"\nREFUSED: {err}")
        return 1
    print(
        f"\noutput disk {existing_parent(root)}: {free / GB:.1f} GB free, "
        f"{plan.disk_needed / GB:.1f} GB needed"
    )
    return 0


def _run(argv: list[str]) -> int:
    subcommand = argv[0]
    if subcommand == "check":
        from .check import check_main

        return check_main(argv[1:])
    if subcommand == "plan":
        return plan_main(argv[1:])
    from .cli import cli_main

    wants_help = any(a in ("-h", "--help") for a in argv[1:])
    if subcommand in SUBCOMMANDS and wants_help and not any(a.startswith("--model") for a in argv):
        model_help = _model_help(subcommand)
        if model_help:
            print(model_help.rstrip() + "\n\nAll options (trainer, data, model) follow.\n")
    cli_main(argv, exit_on_error=False)
    return 0


def _args_given_twice_is_intended() -> None:
    # LightningCLI warns when ``args`` is given while sys.argv holds arguments too: here ``args``
    # is sys.argv without ``--debug``, on purpose.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point ``prox24``."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = _debug_requested(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(TOP_HELP)
        raise SystemExit(0 if argv else 2)
    if argv[0] not in (*SUBCOMMANDS, "check", "plan") and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], [*SUBCOMMANDS, "check", "plan"], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(
            f"prox24: error: unknown subcommand {argv[0]!r}; {hint}`prox24 --help` lists them",
            file=sys.stderr,
        )
        raise SystemExit(2)
    _args_given_twice_is_intended()
    try:
        code = _run(argv)
    except KeyboardInterrupt:
        print("prox24: interrupted", file=sys.stderr)
        code = 130
    except Exception as err:
        if debug:
            raise
        from .cli_errors import DEBUG_HINT, user_error

        message = user_error(err, argv)
        if message is None:
            raise
        print(f"prox24 {argv[0]}: error: {message}\n{DEBUG_HINT}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


if __name__ == "__main__":
    main()
