"""Evaluate folders of label maps: ``anatomask-lab evaluate --pred DIR --gt DIR``.

Both folders hold one label map per case with the same file name (``<case>.nii.gz`` or ``<case>.nii``; with the
``sitk`` extra also ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``, as ``predict --images`` writes them). For each
case the prediction and ground truth must agree in shape, voxel spacing (zooms, within 1e-3 mm) and affine (within
1e-3); every non-zero label must be in the class table. Scores come from :func:`anatomask_lab.metrics.evaluate_case`;
outputs (``per_case.csv``, ``per_class.csv``, ``summary.md``, ``summary.json``) from
:func:`anatomask_lab.report.write_summary`.

Class table: ``--labels`` (a prepared dataset folder, or a JSON file: nnU-Net ``dataset.json`` with ``"labels":
{"liver": 1, ...}``, MSD style ``{"1": "liver", ...}``, or such a mapping at top level); without it, FLARE22's 13
organs for ``--tolerances flare22`` and otherwise every label found, named ``label_<k>`` (a case without a label
then scores it as the empty-vs-empty convention says).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from anatomask_lab import metrics, report
from anatomask_lab.data.io import IMAGE_ENDINGS

__all__ = ["add_cli", "evaluate_folders", "find_cases", "load_class_table", "read_label_map"]

_SUFFIXES = IMAGE_ENDINGS  # NIfTI first, then the ITK formats (read through SimpleITK)
MAX_LABEL = 10_000  # without a class table, larger labels are refused before anything is counted per label


# ----------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------
def _case_id(path: Path) -> str | None:
    return next((path.name[: -len(s)] for s in _SUFFIXES if path.name.endswith(s)), None)


def _list_cases(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    return {case: path for path in sorted(folder.iterdir()) if (case := _case_id(path)) is not None}


def find_cases(pred_dir: str | Path, gt_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """Pair the label-map files of two folders by name (the file name less its ending).

    Returns:
        ``(case, pred_path, gt_path)`` sorted by case.

    Raises:
        ValueError: when a case lacks its prediction or its ground truth, or the folders hold no label maps.
    """
    pred, gt = _list_cases(Path(pred_dir)), _list_cases(Path(gt_dir))
    if not gt:
        raise ValueError(f"no label maps ({', '.join('*' + s for s in _SUFFIXES)}) in the ground-truth folder {gt_dir}")
    problems = []
    for missing, present, where in ((sorted(set(gt) - set(pred)), gt, pred_dir),
                                    (sorted(set(pred) - set(gt)), pred, gt_dir)):
        if missing:
            names = ", ".join(present[c].name for c in missing[:5]) + (" ..." if len(missing) > 5 else "")
            problems.append(f"{len(missing)} case(s) missing from {where}: {names}")
    if problems:
        raise ValueError("; ".join(problems))
    return [(case, pred[case], gt[case]) for case in sorted(gt)]


def read_label_map(path: str | Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """Load a label map (NIfTI with nibabel; MetaImage / NRRD through SimpleITK, in ITK index order).

    Returns:
        ``(labels [X, Y, Z] integer array, spacing in mm per array axis, affine [4, 4])``.

    Raises:
        ValueError: not a readable image file (truncated, another format), non-integer or negative values or a
            non-3-D image, naming the file.
    """
    import nibabel

    from anatomask_lab.data.io import SITK_ENDINGS, image_ending, load_image

    if image_ending(path) in SITK_ENDINGS:
        data, affine, _ = load_image(path, canonical=False, dtype=None, check_finite=False)
        zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
        return _integer_labels(path, data), zooms, affine
    try:
        image = nibabel.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel and gzip raise many types for junk or truncated files
        raise ValueError(f"{path}: not a readable label map ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D label map, got shape {data.shape}")
    return _integer_labels(path, data), tuple(float(z) for z in image.header.get_zooms()[:3]), np.asarray(image.affine)


def _integer_labels(path: str | Path, data: np.ndarray) -> np.ndarray:
    """``data`` as non-negative integer labels, or a ValueError naming ``path``."""
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ValueError(f"{path}: label map holds non-integer values (dtype {data.dtype})")
        data = rounded.astype(np.int32)
    if data.size and data.min() < 0:
        raise ValueError(f"{path}: label map holds negative labels (min {data.min()})")
    return data


def _check_label_range(name: str, data: np.ndarray, classes: Mapping[int, str] | None) -> None:
    """Refuse labels above the class table's largest (or :data:`MAX_LABEL`) before any per-label counting."""
    top = int(data.max()) if data.size else 0
    if classes is not None and top > max(classes, default=0):
        raise ValueError(f"{name} holds labels [{top}] outside the class table {sorted(classes)}")
    if classes is None and top > MAX_LABEL:
        raise ValueError(f"{name} holds label {top}, above {MAX_LABEL} (give the class table with --labels)")


def _check_geometry(pred_path: Path, gt_path: Path, pred: tuple, gt: tuple) -> None:
    (p_data, p_zoom, p_affine), (g_data, g_zoom, g_affine) = pred, gt
    where = f"prediction {pred_path} and ground truth {gt_path}"
    if p_data.shape != g_data.shape:
        raise ValueError(f"{where} differ in shape: {p_data.shape} vs {g_data.shape}")
    if not np.allclose(p_zoom, g_zoom, rtol=0, atol=1e-3):
        rounded = [tuple(round(z, 4) for z in zoom) for zoom in (p_zoom, g_zoom)]
        raise ValueError(f"{where} differ in voxel spacing (mm): {rounded[0]} vs {rounded[1]}")
    if not np.allclose(p_affine, g_affine, rtol=0, atol=1e-3):
        raise ValueError(f"{where} differ in affine:\n{np.round(p_affine, 4)}\nvs\n{np.round(g_affine, 4)}")


def load_class_table(path: str | Path) -> dict[int, str]:
    """label -> class name; 0 is dropped.

    Args:
        path: a prepared dataset folder (read with :class:`~anatomask_lab.data.dataset.DatasetInfo`), or a JSON
            file: nnU-Net / MSD ``dataset.json`` or a plain mapping.

    Raises:
        ValueError: an unreadable class table, naming the file.
    """
    if Path(path).is_dir():
        from anatomask_lab.data.dataset import DatasetInfo

        return DatasetInfo.read(path).class_table()
    try:
        with open(path) as handle:
            content = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--labels {path}: not valid JSON ({exc})") from exc
    table = content.get("labels", content) if isinstance(content, Mapping) else content
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"{path}: expected a mapping of labels (or a dataset.json with 'labels')")
    classes = {}
    for key, value in table.items():
        if isinstance(value, int | float) and not isinstance(value, bool):  # nnU-Net v2: name -> label
            label, name = value, key
        elif str(key).lstrip("-").isdigit():  # MSD / nnU-Net v1: "label" -> name
            label, name = int(key), value
        else:
            raise ValueError(f"{path}: cannot read label entry {key!r}: {value!r} (region-based labels unsupported)")
        if int(label) != label:
            raise ValueError(f"{path}: label of {name!r} is not an integer: {label!r}")
        if int(label) != 0:
            classes[int(label)] = str(name)
    return dict(sorted(classes.items()))


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------
def _default_convention(tolerances: Any) -> str:
    return "flare" if tolerances == "flare22" else "totalseg"


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    *,
    classes: Mapping[int, str] | None = None,
    tolerances: str | float | Mapping[int, float] = "totalseg",
    convention: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every case of two folders of label maps.

    Args:
        pred_dir: Folder of predicted label maps.
        gt_dir: Folder of ground-truth label maps with the same file names.
        classes: label -> name; ``None``: FLARE22's table for ``tolerances="flare22"``, else every label found.
        tolerances: ``"totalseg"`` (3 mm), ``"flare22"``, a number of mm or label -> mm.
        convention: ``"totalseg"`` or ``"flare"``; ``None``: ``"flare"`` with FLARE22 tolerances, else ``"totalseg"``.
        progress: Show a tqdm progress bar over cases.

    Returns:
        Per-case rows ``{"case", "label", "class", "dsc", "nsd", "tolerance_mm"}`` (see :mod:`anatomask_lab.report`).
    """
    from anatomask_lab.progress import progress as progress_bar

    convention = convention or _default_convention(tolerances)
    if classes is None and tolerances == "flare22":
        classes = dict(metrics.FLARE22_CLASSES)
    rows, found = [], {}
    for case, pred_path, gt_path in progress_bar(find_cases(pred_dir, gt_dir), desc="evaluate", unit="case",
                                                 disable=not progress):
        pred, gt = read_label_map(pred_path), read_label_map(gt_path)
        _check_geometry(pred_path, gt_path, pred, gt)
        try:
            _check_label_range("prediction", pred[0], classes)
            _check_label_range("ground truth", gt[0], classes)
            case_classes = classes
            if case_classes is None:
                present = np.flatnonzero(np.bincount(pred[0].ravel()) > 0).tolist()
                present += np.flatnonzero(np.bincount(gt[0].ravel()) > 0).tolist()
                case_classes = {k: f"label_{k}" for k in sorted(set(present) - {0})}
                found.update(case_classes)
            tolerance = metrics.resolve_tolerances(tolerances, case_classes)
            scores = metrics.evaluate_case(pred[0], gt[0], gt[1], case_classes, tolerance, convention)
        except ValueError as exc:
            raise ValueError(f"prediction {pred_path} / ground truth {gt_path}: {exc}") from exc
        rows += [{"case": case, "label": label, "class": name, **scores[name], "tolerance_mm": tolerance[label]}
                 for label, name in case_classes.items()]
    if classes is None:
        rows = _fill_absent(rows, dict(sorted(found.items())), tolerances, convention)
    return rows


def _fill_absent(rows: list[dict[str, Any]], classes: dict[int, str], tolerances: Any, convention: str
                 ) -> list[dict[str, Any]]:
    """Add rows for classes found in other cases only: both masks empty, scored by the convention."""
    empty = np.zeros(1, dtype=bool)
    score = metrics.dice(empty, empty, convention=convention)
    tolerance = metrics.resolve_tolerances(tolerances, classes)
    by_case: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["label"]] = row
    return [
        by_case[case].get(label) or {"case": case, "label": label, "class": name, "dsc": score, "nsd": score,
                                     "tolerance_mm": tolerance[label]}
        for case in by_case for label, name in classes.items()
    ]


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def _tolerance_arg(text: str) -> str | float:
    if text in ("totalseg", "flare22"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected totalseg, flare22 or a number of mm, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"tolerance must be a finite number of mm >= 0, got {text!r}")
    return value


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``evaluate`` (see the module docstring)."""
    parser = subparsers.add_parser(
        "evaluate", help="DSC / NSD of predicted label maps against ground truth",
        description="Per-case and per-class DSC and NSD of predicted label maps, with the paper-style "
        "patient-wise mean ± SD table (markdown and JSON).",
    )
    parser.add_argument("--pred", required=True, type=Path,
                        help="folder of predicted label maps (<case>.nii.gz, .nii, or .mha/.nrrd with the sitk extra)")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth label maps, same names")
    parser.add_argument("--labels", type=Path,
                        help="prepared dataset folder, JSON class table or dataset.json (default: labels found)")
    parser.add_argument("--tolerances", type=_tolerance_arg, default="totalseg",
                        help="NSD tolerance: totalseg (3 mm), flare22 (per-organ table) or mm (default totalseg)")
    parser.add_argument("--convention", choices=metrics.CONVENTIONS,
                        help="empty-case convention (default: flare with --tolerances flare22, else totalseg)")
    parser.add_argument("--out", type=Path, help="output folder (default: <pred>/evaluation)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary on stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``evaluate`` from parsed arguments; returns the exit code."""
    classes = load_class_table(args.labels) if args.labels else None
    convention = args.convention or _default_convention(args.tolerances)
    rows = evaluate_folders(args.pred, args.gt, classes=classes, tolerances=args.tolerances,
                            convention=convention, progress=not args.quiet)
    settings = {"pred": str(args.pred), "gt": str(args.gt), "convention": convention,
                "tolerances": args.tolerances, "labels": str(args.labels) if args.labels else None}
    paths = report.write_summary(rows, args.out or args.pred / "evaluation", settings)
    if not args.quiet:
        print(paths["markdown"].read_text())
        print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0

