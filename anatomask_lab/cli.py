"""The ``anatomask-lab`` command.

Each subcommand lives beside the code it drives: a module listed in ``COMMAND_MODULES`` defines
``add_cli(subparsers)``, which adds its parser and sets ``func`` (a callable taking the parsed namespace and
returning an exit code). The list is explicit; nothing is discovered by name.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from anatomask_lab import __version__

COMMAND_MODULES: tuple[str, ...] = (
    "anatomask_lab.data.phantom",
    "anatomask_lab.data.prepare",
    "anatomask_lab.pretrain",
    "anatomask_lab.export",
    "anatomask_lab.finetune",
    "anatomask_lab.predict",
    "anatomask_lab.evaluate",
    "anatomask_lab.demo",
    "anatomask_lab.study",
    "anatomask_lab.bench",
    "anatomask_lab.course",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anatomask-lab",
        description="AnatoMask masked image modelling for 3D medical image segmentation: data, pretraining, "
        "finetuning, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        if args.debug:
            raise
        print(f"anatomask-lab {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause (bad files, flags, folders, diverging runs): one line and exit 2, not a traceback."""
    from nibabel.filebasedimages import ImageFileError

    return (ValueError, OSError, KeyError, FloatingPointError, RuntimeError, ImageFileError)


def _one_line(exc: BaseException) -> str:
    """The error as one line, naming the file where the exception knows it."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, KeyError) and exc.args:
        text = f"missing entry {exc.args[0]!r}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
