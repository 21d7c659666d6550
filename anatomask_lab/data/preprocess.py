"""Turn release-layout cases into the preprocessed dataset folder that training reads.

Per case: read the channels (and label) with :func:`anatomask_lab.data.io.load_image` (NIfTI through nibabel;
MetaImage and NRRD through SimpleITK), check them, reorient to the closest canonical (RAS+) orientation, crop to
the non-zero bounding box, resample to the target spacing (default 1.5 mm isotropic, as in the paper), normalise
intensities, and write memory-mappable arrays plus metadata. Cases are processed in parallel, each written
atomically (a temporary folder renamed into place), so an interrupted run resumes and skips finished cases.

Folder layout written by :func:`preprocess_dataset`::

    <out>/dataset.json              channels, class table, spacing, splits, case list (written last; see
                                    :mod:`anatomask_lab.data.dataset`)
    <out>/prepare.json              the settings; a rerun with other settings refuses to mix outputs
    <out>/cases/<id>/image.npy      float32 [C, X, Y, Z]
    <out>/cases/<id>/label.npy      uint8 (int16 for more than 255 classes) [X, Y, Z]   (labelled cases only)
    <out>/cases/<id>/fg.npy         int32 [N, 4] rows (class, x, y, z): sampled foreground voxels per class
    <out>/cases/<id>/meta.json      source files, original geometry, crop box, normalisation, classes present

Array axes x, y, z follow the canonical grid: world x (patient right), y (anterior), z (superior) increase with
the index. Resampling and normalisation live in :mod:`anatomask_lab.data.resample`, class tables and label
loading in :mod:`anatomask_lab.data.labels`, the worker pool in :mod:`anatomask_lab.data.pool`; this module drives
them. :mod:`anatomask_lab.data.reference` reads a prepared case's ground truth again through the same label code,
in the original geometry, for evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from anatomask_lab.data.dataset import FORMAT, CaseEntry, DatasetInfo, check_case_id, read_case_meta
from anatomask_lab.data.io import (
    DataError,
    atomic_dir,
    atomic_write_json,
    check_same_grid,
    image_ending,
    load_image,
    nifti_spacing,
)
from anatomask_lab.data.labels import LabelTable, load_case_label, make_label_table
from anatomask_lab.data.pool import run_jobs
from anatomask_lab.data.resample import (
    CT_BODY_HU,
    normalise,
    resample_image,
    resample_label,
    restore_to_original,
    write_prediction,
)

__all__ = [
    "CT_BODY_HU",
    "FORMAT",
    "CaseSource",
    "LabelTable",
    "make_label_table",
    "normalise",
    "preprocess_case",
    "preprocess_dataset",
    "random_splits",
    "resample_image",
    "resample_label",
    "restore_to_original",
    "write_prediction",
]

FG_PER_CLASS = 1000  # foreground voxels kept per class for oversampling


@dataclass(frozen=True)
class CaseSource:
    """One case as a preparer finds it in a release layout.

    Attributes:
        case_id: identifier used for file names (letters, digits, ``_``, ``-``, ``.``).
        images: one image file per channel (NIfTI; MetaImage or NRRD with SimpleITK).
        modalities: one of ``"CT"``, ``"MR"``, ``"PET"`` per channel (decides normalisation).
        label: a label-map file whose values index the source class table, or None.
        masks: ``(structure, file)`` pairs of binary masks (TotalSegmentator style), merged into one label map.
        split: the data set's own split (``train``/``val``/``test``) or None.
        info: extra strings stored in the case metadata.
    """

    case_id: str
    images: tuple[Path, ...]
    modalities: tuple[str, ...] = ("CT",)
    label: Path | None = None
    masks: tuple[tuple[str, Path], ...] = ()
    split: str | None = None
    info: tuple[tuple[str, str], ...] = field(default=())

    @property
    def has_label(self) -> bool:
        """Whether the case brings a label map or masks."""
        return self.label is not None or bool(self.masks)


# ---------------------------------------------------------------------------------------------------------------
# One case


def _load_channels(source: CaseSource) -> tuple[list[np.ndarray], np.ndarray, nib.Nifti1Image]:
    """Every channel on the canonical grid of the first, checked; returns ``(channels, affine, original image)``."""
    ref = source.images[0]
    data, affine, orig = load_image(ref)
    chans = [data]
    for p in source.images[1:]:
        d, a, _ = load_image(p)
        check_same_grid(data.shape, affine, ref, d.shape, a, p)
        chans.append(d)
    for p, d in zip(source.images, chans, strict=True):
        if float(d.max()) == float(d.min()):
            raise DataError(f"{p}: constant (zero-variance) volume, value {float(d.min())}")
    return chans, affine, orig


def _nonzero_box(images: list[np.ndarray]) -> list[list[int]]:
    nz = np.zeros(images[0].shape, bool)
    for im in images:
        nz |= im != 0
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.nonzero(nz.any(axis=other))[0]
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, nz.shape[axis]])
    return box


def _fg_locations(label: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(label):
        if c == 0:
            continue
        loc = np.argwhere(label == c)
        if len(loc) > FG_PER_CLASS:
            loc = loc[np.sort(rng.choice(len(loc), FG_PER_CLASS, replace=False))]
        rows.append(np.concatenate([np.full((len(loc), 1), c), loc], 1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def _cropped_affine(affine: np.ndarray, box, ratio: np.ndarray) -> np.ndarray:
    """Affine of the cropped, resampled grid: origin moved to the crop corner, axes scaled by ``ratio``."""
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.array([b[0] for b in box]) + affine[:3, 3]
    out[:3, :3] = affine[:3, :3] * ratio[None, :]
    return out


def _source_meta(source: CaseSource) -> dict:
    """Where a case came from, as absolute paths (a relative one would break from another working directory)."""
    def full(p: Path) -> str:
        return os.path.abspath(p)

    return {"images": [full(p) for p in source.images], "label": full(source.label) if source.label else None,
            "masks": len(source.masks), "mask_files": {n: full(p) for n, p in source.masks}, "cwd": os.getcwd(),
            "fingerprint": source_fingerprint(source), **dict(source.info)}


def source_fingerprint(source: CaseSource) -> list[list]:
    """``[absolute path, size, mtime_ns]`` of each file of a case: a finished case is reused only while its sources
    are these very files, unchanged (an older case from other or changed sources is prepared again)."""
    files = [*source.images, *([source.label] if source.label else []), *(p for _, p in source.masks)]
    return [[os.path.abspath(p), int((st := os.stat(p)).st_size), int(st.st_mtime_ns)] for p in files]


def source_ending(cases: Sequence[CaseSource]) -> str | None:
    """The file ending all image channels of ``cases`` share (``.nii.gz``, ``.mha``, ...), else None."""
    endings = {image_ending(p) for c in cases for p in c.images}
    return endings.pop() if len(endings) == 1 else None


def _is_current(final: Path, source: CaseSource) -> bool:
    if not (final / "meta.json").is_file():
        return False
    stored = _read_json(final / "meta.json").get("source", {})
    if "fingerprint" in stored:
        return stored["fingerprint"] == source_fingerprint(source)
    return stored.get("images") == [os.path.abspath(p) for p in source.images]  # prepared before fingerprints


def _case_meta(source: CaseSource, orig, data_shape, affine, box, spacing, image, label, stats) -> dict:
    return {
        "case_id": source.case_id,
        "source": _source_meta(source),
        "modalities": list(source.modalities),
        "original": {"shape": [int(n) for n in orig.shape[:3]], "affine": np.asarray(orig.affine).tolist(),
                     "spacing": nifti_spacing(orig.affine).tolist(),
                     "axcodes": "".join(nib.aff2axcodes(orig.affine))},
        "canonical": {"shape": [int(n) for n in data_shape], "affine": affine.tolist()},
        "crop_box": box,
        "spacing": [float(s) for s in spacing],
        "shape": [int(n) for n in image.shape[1:]],
        "affine": _cropped_affine(affine, box, np.asarray(spacing, float) / nifti_spacing(affine)).tolist(),
        "normalisation": stats,
        "pad_value": [float(c.min()) for c in image],
        "has_label": label is not None,
        "classes_present": sorted(int(c) for c in np.unique(label) if c) if label is not None else [],
        "split": source.split,
    }


def preprocess_case(source: CaseSource, table: LabelTable | None, *, spacing=(1.5, 1.5, 1.5), clip: bool = True,
                    label_mode: str = "nearest", image_kind: str = "cubic") -> dict:
    """Load, check, reorient, crop, resample and normalise one case (nothing is written).

    Returns:
        dict with ``image`` float32 [C, X, Y, Z], ``label`` [X, Y, Z] or None, ``fg`` int32 [N, 4], ``meta``.

    Raises:
        DataError: unreadable or truncated file, not 3D, non-finite voxels, constant volume, channels or label on
            another grid (shape or affine), label values outside the class table.
    """
    chans, affine, orig = _load_channels(source)
    shape = chans[0].shape
    label = load_case_label(source.label, source.masks, shape, affine, source.images[0], table)
    box = _nonzero_box(chans)
    sl = tuple(slice(a, b) for a, b in box)
    ratio = np.asarray(spacing, float) / nifti_spacing(affine)
    out, stats = [], []
    for p, d, mod in zip(source.images, chans, source.modalities, strict=True):
        n, s = normalise(resample_image(d[sl], ratio, kind=image_kind), mod, clip=clip, path=str(p))
        out.append(n)
        stats.append(s)
    image = np.stack(out)
    if label is not None:
        label = resample_label(label[sl], ratio, mode=label_mode, shape=image.shape[1:])
    fg = _fg_locations(label, zlib.crc32(source.case_id.encode())) if label is not None else np.zeros((0, 4), np.int32)
    meta = _case_meta(source, orig, shape, affine, box, spacing, image, label, stats)
    return {"image": image, "label": label, "fg": fg, "meta": meta}


def _write_case(args) -> str:
    source, table, settings, out_dir = args
    final = Path(out_dir) / "cases" / source.case_id
    if _is_current(final, source):
        return "skipped"
    res = preprocess_case(source, table, spacing=settings["spacing"], clip=settings["clip"],
                          label_mode=settings["label_mode"], image_kind=settings["image_kind"])

    def fill(tmp: Path) -> None:
        np.save(tmp / "image.npy", res["image"], allow_pickle=False)
        if res["label"] is not None:
            np.save(tmp / "label.npy", res["label"], allow_pickle=False)
        np.save(tmp / "fg.npy", res["fg"], allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(res["meta"], indent=1) + "\n")

    atomic_dir(final, fill)
    return "done"


# ---------------------------------------------------------------------------------------------------------------
# Whole data set


def random_splits(ids: Sequence[str], seed: int = 0, fractions=(0.7, 0.1, 0.2),
                  groups: Sequence[str] | None = None) -> dict[str, str]:
    """Assign ids to train/val/test by the given fractions, reproducibly (ids sorted, then permuted by ``seed``).

    Args:
        ids: case ids.
        seed: permutation seed.
        fractions: train, val, test.
        groups: optional group per id (e.g. patient); all ids of a group land in the same split.
    """
    groups = list(groups) if groups is not None else list(ids)
    keys = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(keys))
    n = len(keys)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[keys[i]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return {cid: split_of[g] for cid, g in zip(ids, groups, strict=True)}


def _check_sources(cases: Sequence[CaseSource]) -> None:
    if not cases:
        raise DataError("no cases to prepare")
    seen = set()
    for c in cases:
        if c.case_id in seen:
            raise DataError(f"case id {c.case_id!r} appears twice ({c.images[0]})")
        if not c.case_id or any(ch in c.case_id for ch in "/\\ ") or c.case_id.startswith("."):
            raise DataError(f"{c.images[0]}: unusable case id {c.case_id!r}")
        check_case_id(c.case_id, c.images[0])
        if len(c.modalities) != len(c.images):
            raise DataError(f"{c.images[0]}: {len(c.images)} channels but {len(c.modalities)} modalities")
        seen.add(c.case_id)


def _settings(name, channels, table, spacing, clip, label_mode, image_kind) -> dict:
    """The settings stamped into ``prepare.json`` (a rerun must match them)."""
    return {
        "format": FORMAT, "name": name, "channels": list(channels), "spacing": [float(s) for s in spacing],
        "clip": bool(clip), "label_mode": label_mode, "image_kind": image_kind,
        "classes": list(table.names) if table else None,
        "class_sources": [list(s) for s in table.sources] if table else None,
    }


def _stamp(out: Path, settings: dict) -> None:
    """Write ``prepare.json``, or refuse when the folder was prepared with other settings."""
    stamp = out / "prepare.json"
    if not stamp.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stamp, settings)
        return
    old = _read_json(stamp)
    if old != settings:
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        raise DataError(f"{out}: already holds a dataset prepared with other settings ({', '.join(diff)}); "
                        "use a new output folder")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc


def _case_entries(cases: Sequence[CaseSource], out: Path, seed: int, split_groups) -> tuple[list[CaseEntry], str]:
    """Case entries with their splits, and where the splits come from.

    The data set's own splits when any case carries one (cases without one go to ``train``), else 70/10/20 of the
    labelled cases with ``seed`` (unlabelled cases go to ``train``, for pretraining).
    """
    metas = [read_case_meta(out, c.case_id) for c in cases]
    if any(c.split for c in cases):
        split_of = {c.case_id: c.split or "train" for c in cases}
        split_source = "data set"
    else:
        labelled = [c.case_id for c, m in zip(cases, metas, strict=True) if m["has_label"]]
        groups = dict(zip([c.case_id for c in cases], split_groups, strict=True)) if split_groups else None
        split_of = random_splits(labelled, seed, groups=[groups[i] for i in labelled] if groups else None)
        split_source = f"random 70/10/20 of labelled cases, seed {seed}; unlabelled cases in train"
    entries = [CaseEntry(c.case_id, bool(m["has_label"]), split_of.get(c.case_id, "train"), tuple(m["shape"]))
               for c, m in zip(cases, metas, strict=True)]
    return entries, split_source


def preprocess_dataset(
    cases: Sequence[CaseSource],
    out_dir,
    *,
    name: str,
    channels: Sequence[str],
    table: LabelTable | None,
    spacing=(1.5, 1.5, 1.5),
    clip: bool = True,
    label_mode: str = "nearest",
    image_kind: str = "cubic",
    workers: int | None = None,
    progress: bool = True,
    seed: int = 0,
    split_groups: Sequence[str] | None = None,
    split_source: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Preprocess every case into ``out_dir`` (layout in the module docstring) and write ``dataset.json``.

    Splits: the data set's own when any case carries one (cases without one go to ``train``), else 70/10/20
    train/val/test of the labelled cases with ``seed`` (unlabelled cases go to ``train``, for pretraining).

    Args:
        cases: from a preparer's ``find_cases``.
        out_dir: output folder; finished cases found there are skipped.
        name: data set name for ``dataset.json``.
        channels: channel names, e.g. ``["CT"]`` or ``["CT", "PET"]``.
        table: output class table (None: images only).
        spacing: target spacing in mm (a number means isotropic).
        clip: CT clipping to body percentiles before the z-score.
        label_mode: ``"nearest"`` or ``"linear"``.
        image_kind: ``"cubic"`` or ``"linear"`` image interpolation.
        workers: processes (default: CPU count); 0 or 1 runs here.
        progress: tqdm bar over cases.
        seed: split seed.
        split_groups: group per case for the random split (e.g. patient id).
        split_source: where the cases' own splits come from, for ``dataset.json`` (default "data set").
        extra: more keys for ``dataset.json``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        DataError: bad input (see :func:`preprocess_case`), or ``out_dir`` holds output made with other settings.
        Cases finished before the failure stay on disk; ``dataset.json`` is only written after all succeed.
    """
    _check_sources(cases)
    out = Path(out_dir)
    if np.ndim(spacing) == 0:
        spacing = (float(spacing),) * 3
    settings = _settings(name, channels, table, spacing, clip, label_mode, image_kind)
    _stamp(out, settings)
    for stale in (out / "cases").glob(".*.tmp-*"):  # left by a killed run; never a finished case
        shutil.rmtree(stale, ignore_errors=True)
    jobs = [(c, table, settings, str(out)) for c in cases]
    run_jobs(_write_case, jobs, min(os.cpu_count() or 1, len(jobs)) if workers is None else workers,
             f"prepare {name}", progress)
    entries, found_source = _case_entries(cases, out, seed, split_groups)
    if split_source is None or not any(c.split for c in cases):
        split_source = found_source
    DatasetInfo(
        name=name,
        channels=tuple(channels),
        class_names=("background", *(table.names if table else ())),
        class_sources={n: s for n, s in zip(table.names, table.sources, strict=True)} if table else {},
        source_classes=table.source_names if table else (),
        spacing=tuple(settings["spacing"]),
        cases=tuple(entries),
        normalisation=("CT: clip to body 0.5/99.5 percentiles, z-score" if clip else "CT: z-score")
        + "; other modalities: z-score over non-zero voxels (per case)",
        split_source=split_source,
        label_dtype=np.dtype(table.dtype).name if table else None,
        file_ending=source_ending(cases),
        extra=dict(extra or {}),
    ).write(out)
    return out
