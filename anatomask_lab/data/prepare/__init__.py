"""Preparers: one module per public data set, each turning its release layout into the preprocessed layout, and
two for a researcher's own data: ``nnunet`` (an nnU-Net v2 raw data set) and ``folder`` (unlabelled images).

Every preparer module defines ``find_cases(src, ...)`` (scan and check the release layout), ``prepare(src, out,
...)`` (find, then :func:`anatomask_lab.data.preprocess.preprocess_dataset`), ``add_arguments(parser)`` and
``run(args)``. ``anatomask-lab prepare NAME`` and ``data_scripts/prepare_NAME.py`` both build their parser from
:func:`add_prepare_arguments` and call ``run``: one code path. :func:`reference_table` gives back the class table a
prepared dataset was made with, so that its ground truth can be read again the preparer's way.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from anatomask_lab.data.dataset import DatasetInfo
from anatomask_lab.data.io import DataError
from anatomask_lab.data.labels import LabelTable

PREPARERS: tuple[str, ...] = ("totalsegmentator", "flare22", "amos22", "autopet2", "nnunet", "folder")

__all__ = [
    "PREPARERS",
    "add_cli",
    "add_prepare_arguments",
    "common_options",
    "parse_classes",
    "preparer",
    "reference_table",
    "release_classes",
    "report",
    "script_main",
]


def preparer(name: str) -> ModuleType:
    """The preparer module for ``name`` (one of :data:`PREPARERS`)."""
    if name not in PREPARERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(PREPARERS)}")
    return importlib.import_module(f"anatomask_lab.data.prepare.{name}")


def _spacing(values: list[float]) -> tuple[float, float, float]:
    if len(values) not in (1, 3) or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("--spacing takes one or three positive numbers (mm)")
    return tuple(values * 3) if len(values) == 1 else tuple(values)


def add_prepare_arguments(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """Add the options shared by all preparers, then the data set's own, and set ``func``."""
    mod = preparer(name)
    parser.add_argument("--src", required=True, type=Path, help="release folder (nnunet: the DatasetXXX_Name "
                        "folder; folder: the folder of images)")
    parser.add_argument("--out", required=True, type=Path, help="preprocessed dataset folder (resumable)")
    parser.add_argument("--spacing", type=float, nargs="+", default=[1.5], metavar="MM",
                        help="target spacing: one value (isotropic) or three (default 1.5)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--no-clip", action="store_true",
                        help="CT: plain z-score, no clipping to the body's 0.5/99.5 percentiles")
    parser.add_argument("--label-mode", choices=("nearest", "linear"), default="nearest",
                        help="label resampling: nearest (default) or one-hot linear")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 70/10/20 split where the data set has none")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    mod.add_arguments(parser)
    parser.set_defaults(func=mod.run, dataset=name)
    return parser


def common_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``prepare`` shared by all preparers, from parsed arguments."""
    return {
        "spacing": _spacing(list(args.spacing)),
        "workers": args.workers,
        "clip": not args.no_clip,
        "label_mode": args.label_mode,
        "seed": args.seed,
        "progress": not args.no_progress,
    }


def parse_classes(text: str | None, presets: dict[str, tuple[str, ...]] | None = None) -> list[str] | None:
    """``--classes`` value -> list of entries (``name`` or ``name=glob+glob``), a preset's entries, or None."""
    if not text:
        return None
    if presets and text in presets:
        return list(presets[text])
    return [c.strip() for c in text.split(",") if c.strip()]


def report(out: Path) -> str:
    """One line describing a prepared dataset folder."""
    info = DatasetInfo.read(out)
    n_lab = sum(c.has_label for c in info.cases)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in info.splits.items())
    spacing = list(info.spacing) if info.spacing is not None else None
    return (f"prepared {len(info.cases)} cases ({n_lab} labelled; {sizes}), {max(info.num_classes - 1, 0)} classes, "
            f"spacing {spacing} mm -> {out}")


def release_classes(info: DatasetInfo) -> tuple[str, ...]:
    """The release class table (value order) a dataset was prepared from.

    ``dataset.json`` records it as ``source_classes``; for folders prepared before that, the preparer named by
    ``info.name`` supplies its table (TotalSegmentator: the version in ``source_table``). Empty when unknown.
    """
    if info.source_classes or info.name not in PREPARERS:
        return info.source_classes
    mod = preparer(info.name)
    if hasattr(mod, "TABLES"):
        version = str(info.extra.get("source_table", "")).rpartition(" ")[2]
        return tuple(mod.TABLES.get(version, ()))
    return tuple(getattr(mod, "CLASSES", ()))


def reference_table(info: DatasetInfo) -> LabelTable:
    """The class table a prepared dataset was made with (:meth:`DatasetInfo.label_table` over the release table).

    A folder prepared before ``source_classes`` was recorded, whose classes are the whole release table under
    names that have changed since (one source each, as many as the release has), is read with its own names.

    Raises:
        DataError: an images-only dataset, or no release table fits its classes.
    """
    table = release_classes(info)
    names = info.class_names[1:]
    legacy = (not info.source_classes and len(names) == len(table)
              and all(tuple(info.class_sources.get(n, (n,))) == (n,) for n in names))
    if legacy and not set(names) <= set(table):
        table = names
    result = info.label_table(table)
    if result is None:
        raise DataError(f"{info.path or 'dataset.json'}: no classes (an images-only dataset)")
    return result


def add_cli(subparsers) -> None:
    """Register ``anatomask-lab prepare NAME --src DIR --out DIR``."""
    p = subparsers.add_parser("prepare", help="preprocess a public data set, the phantom cohort, an nnU-Net raw "
                              "data set or a folder of images",
                              description="Preprocess a data set's release layout into the training layout.")
    sub = p.add_subparsers(dest="dataset", metavar="NAME", required=True)
    for name in PREPARERS:
        mod = preparer(name)
        q = sub.add_parser(name, help=mod.HELP, description=mod.__doc__.splitlines()[0])
        add_prepare_arguments(q, name)


def script_main(name: str, argv: list[str] | None = None) -> int:
    """Entry point of ``data_scripts/prepare_<name>.py``: same options and code path as the CLI subcommand."""
    mod = preparer(name)
    parser = argparse.ArgumentParser(prog=f"prepare_{name}.py", description=mod.__doc__.splitlines()[0])
    add_prepare_arguments(parser, name)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"prepare_{name}: error: {exc}", file=sys.stderr)
        return 2
