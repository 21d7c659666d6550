"""Ground truth of a prepared dataset in the original geometry, read through the preparer's own label code.

Evaluation compares predictions written by :func:`anatomask_lab.data.resample.write_prediction` (original shape,
orientation and affine) with reference label maps. These are read again from the release files a case was prepared
from, with the class table the preparer applied (:func:`anatomask_lab.data.prepare.reference_table`) and the same
loading and merging (:func:`anatomask_lab.data.labels.load_case_label`): the same class subset and renumbering,
the same overlap rule, at the original resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anatomask_lab.data.dataset import DatasetInfo, case_dir, read_case_meta
from anatomask_lab.data.io import DataError
from anatomask_lab.data.labels import LabelTable, load_case_label
from anatomask_lab.data.prepare import reference_table
from anatomask_lab.data.preprocess import CaseSource
from anatomask_lab.data.resample import canonical_to_original, save_original_labels

__all__ = ["case_source", "reference_label", "write_reference_label", "write_reference_labels"]



def _source_path(text: str, src: dict, where: str | Path) -> Path:
    """A recorded source path: absolute as written, or a relative one resolved against the recorded ``cwd``.

    Raises:
        DataError: a relative path without a recorded working directory (it would depend on where one runs).
    """
    path = Path(text)
    if path.is_absolute():
        return path
    if src.get("cwd"):
        return Path(src["cwd"]) / path
    raise DataError(f"{where}: source path {text!r} is relative and the folder it was prepared from is not "
                    "recorded; prepare the dataset again (paths are now stored absolute)")


def case_source(case_meta: dict, where: str | Path = "meta.json") -> CaseSource:
    """The :class:`CaseSource` a prepared case was made from, rebuilt from its ``meta.json`` (``where``, for errors).

    Mask files come from ``source.mask_files``; cases prepared before it was recorded fall back to the
    TotalSegmentator layout (``segmentations/*.nii.gz`` beside the first image), which is what made them.

    Raises:
        DataError: such a fallback finds no mask file, or a relative source path cannot be resolved.
    """
    src = case_meta["source"]
    images = tuple(_source_path(p, src, where) for p in src["images"])
    if "mask_files" in src:
        masks = tuple((n, _source_path(p, src, where)) for n, p in src["mask_files"].items())
    elif src.get("masks"):
        seg_dir = images[0].parent / "segmentations"
        files = sorted(seg_dir.glob("*.nii.gz"))
        if not files:
            raise DataError(f"{seg_dir}: no mask files (case {case_meta['case_id']!r} was prepared from "
                            f"{src['masks']} masks)")
        masks = tuple((f.name[: -len(".nii.gz")], f) for f in files)
    else:
        masks = ()
    return CaseSource(case_meta["case_id"], images, tuple(case_meta["modalities"]),
                      label=_source_path(src["label"], src, where) if src.get("label") else None, masks=masks)


def reference_label(dataset_dir, case_id: str, table: LabelTable) -> tuple[np.ndarray, dict]:
    """A prepared case's ground truth on its original grid, with the prepared dataset's class ids.

    The source label map or masks are read and merged exactly as
    :func:`anatomask_lab.data.preprocess.preprocess_case` does (same renumbering, same overlap rule), then
    reoriented to the original file's voxel order, at the original resolution.

    Args:
        dataset_dir: prepared dataset folder.
        case_id: the case.
        table: the class table the preparer applied (:meth:`DatasetInfo.label_table`).

    Returns:
        ``(label [original shape], the case's meta.json)``.

    Raises:
        DataError: the case has no label source, or its source files are missing or unusable.
    """
    meta = read_case_meta(dataset_dir, case_id)
    source = case_source(meta, case_dir(dataset_dir, case_id) / "meta.json")
    if not source.has_label:
        raise DataError(f"{case_dir(dataset_dir, case_id) / 'meta.json'}: case {case_id!r} was prepared without a "
                        "label; there is no reference to write")
    canon = meta["canonical"]
    label = load_case_label(source.label, source.masks, tuple(canon["shape"]), np.asarray(canon["affine"]),
                            source.images[0], table)
    return canonical_to_original(label, meta), meta


def write_reference_label(dataset_dir, case_id: str, table: LabelTable, path) -> Path:
    """Write :func:`reference_label` as NIfTI with the original affine, as predictions are written."""
    label, meta = reference_label(dataset_dir, case_id, table)
    return save_original_labels(label, meta, path)


def write_reference_labels(data_dir, out_dir, *, split: str = "test", quiet: bool = True) -> list[Path]:
    """Write ``<out_dir>/<case>.nii.gz`` (:func:`write_reference_label`) for every case of ``split``.

    Raises:
        DataError: ``dataset.json`` is missing or malformed, an unknown split, an images-only dataset, an
            unlabelled case, or unusable source files.
    """
    from anatomask_lab.progress import progress

    info = DatasetInfo.read(data_dir)
    table = reference_table(info)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_reference_label(data_dir, case, table, out / f"{case}.nii.gz")
            for case in progress(info.split(split), desc=f"reference {split}", disable=quiet, unit="case")]
