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
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anatomask-lab",
        description="AnatoMask masked image modelling for 3D medical image segmentation: data, pretraining, "
        "finetuning, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"anatomask-lab {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
