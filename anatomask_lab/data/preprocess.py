"""Turn release-layout cases into the preprocessed dataset folder that training reads.

Per case: read the NIfTI channels (and label) with nibabel, check them, reorient to the closest canonical (RAS+)
orientation, crop to the non-zero bounding box, resample to the target spacing (default 1.5 mm isotropic, as in
the paper), normalise intensities, and write memory-mappable arrays plus metadata. Cases are processed in
parallel, each written atomically (a temporary folder renamed into place), so an interrupted run resumes and skips
finished cases.

Folder layout written by :func:`preprocess_dataset`::

    <out>/dataset.json              channels, class table, spacing, splits, case list (written last)
    <out>/prepare.json              the settings; a rerun with other settings refuses to mix outputs
    <out>/cases/<id>/image.npy      float32 [C, X, Y, Z]
    <out>/cases/<id>/label.npy      uint8 (int16 for more than 255 classes) [X, Y, Z]   (labelled cases only)
    <out>/cases/<id>/fg.npy         int32 [N, 4] rows (class, x, y, z): sampled foreground voxels per class
    <out>/cases/<id>/meta.json      original geometry, crop box, normalisation, classes present

Array axes x, y, z follow the canonical grid: world x (patient right), y (anterior), z (superior) increase with
the index. Defaults: images resampled with a separable cubic (Keys) kernel after a Gaussian anti-aliasing filter
along axes that are downsampled; labels with nearest neighbour (``label_mode="linear"`` resamples one-hot channels
linearly and takes the arg-max). CT is clipped to the 0.5 / 99.5 percentiles of the case's body voxels and
z-scored with their mean and standard deviation (``clip=False`` for a plain z-score); other modalities are
z-scored over non-zero voxels.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import zlib
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, sparse

from anatomask_lab.data.io import (
    DataError,
    atomic_dir,
    atomic_write_json,
    check_same_grid,
    load_nifti,
    nifti_spacing,
    save_nifti,
)

__all__ = [
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

FORMAT = "anatomask-lab preprocessed v1"
CT_BODY_HU = -500.0  # CT voxels above this (holes filled per slice) are the body used for statistics
FG_PER_CLASS = 1000  # foreground voxels kept per class for oversampling


@dataclass(frozen=True)
class CaseSource:
    """One case as a preparer finds it in a release layout.

    Attributes:
        case_id: identifier used for file names (letters, digits, ``_``, ``-``, ``.``).
        images: one NIfTI file per channel.
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
        return self.label is not None or bool(self.masks)


@dataclass(frozen=True)
class LabelTable:
    """Output classes 1..K and, for each, the source structures merged into it.

    ``source_names[i]`` is the source class with value ``i + 1`` in a label-map release (or the mask name).
    """

    names: tuple[str, ...]
    sources: tuple[tuple[str, ...], ...]
    source_names: tuple[str, ...]

    def lut(self) -> np.ndarray:
        """Look-up table source value -> output id, int64 [len(source_names) + 1]."""
        index = {n: i + 1 for i, n in enumerate(self.source_names)}
        lut = np.zeros(len(self.source_names) + 1, dtype=np.int64)
        for out_id, srcs in enumerate(self.sources, start=1):
            for s in srcs:
                lut[index[s]] = out_id
        return lut

    def mask_ids(self) -> dict[str, int]:
        """Source structure name -> output id, for the selected structures only."""
        return {s: i for i, srcs in enumerate(self.sources, start=1) for s in srcs}

    @property
    def dtype(self):
        return np.uint8 if len(self.names) < 256 else np.int16


def make_label_table(source_names: Sequence[str], classes: Sequence[str] | None = None) -> LabelTable:
    """Build the output class table from a source table and an optional selection.

    Args:
        source_names: the release's classes in value order (value 1 first) or its structure names.
        classes: ``None`` keeps every source class in order; otherwise entries ``name`` (a source class) or
            ``name=pattern[+pattern...]`` (a group of source classes matched with shell wildcards, e.g.
            ``vertebrae=vertebrae_*``). Output ids follow the entry order; each source class joins the first
            entry that matches it; unselected classes become background.

    Raises:
        DataError: an entry matches nothing, or a name repeats.
    """
    source_names = tuple(source_names)
    if classes is None:
        return LabelTable(source_names, tuple((n,) for n in source_names), source_names)
    names, sources, taken = [], [], set()
    for entry in classes:
        entry = entry.strip()
        if not entry:
            continue
        name, _, pattern = entry.partition("=")
        pats = pattern.split("+") if pattern else [name]
        found = [s for s in source_names if any(fnmatch.fnmatchcase(s, p) for p in pats) and s not in taken]
        if not found:
            raise DataError(f"class '{entry}': matches no structure of the source class table "
                            f"({len(source_names)} classes, e.g. {', '.join(source_names[:5])})")
        if name in names:
            raise DataError(f"class '{name}' is listed twice")
        taken.update(found)
        names.append(name)
        sources.append(tuple(found))
    if not names:
        raise DataError("empty class selection")
    return LabelTable(tuple(names), tuple(sources), source_names)


# ---------------------------------------------------------------------------------------------------------------
# Resampling


def _new_length(n: int, ratio: float) -> int:
    return int(np.floor((n - 1) / ratio + 1e-6)) + 1


def _interp_matrix(n_old: int, n_new: int, ratio: float, kind: str) -> sparse.csr_matrix:
    """Sparse [n_new, n_old] matrix sampling position ``i * ratio`` with a cubic (Keys, a=-0.5) or linear kernel."""
    pos = np.arange(n_new) * ratio
    base = np.floor(pos).astype(np.int64)
    frac = pos - base
    if kind == "linear":
        offs = np.array([0, 1])
        w = np.stack([1 - frac, frac], 1)
    else:
        offs = np.array([-1, 0, 1, 2])
        t = np.abs(frac[:, None] - offs[None, :])
        a = -0.5
        w = np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                     np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))
    cols = np.clip(base[:, None] + offs[None, :], 0, n_old - 1)
    rows = np.repeat(np.arange(n_new), len(offs))
    return sparse.csr_matrix((w.ravel().astype(np.float32), (rows, cols.ravel())), shape=(n_new, n_old))


def _apply_axis(arr: np.ndarray, mat: sparse.csr_matrix, axis: int) -> np.ndarray:
    moved = np.moveaxis(arr, axis, 0)
    rest = moved.shape[1:]
    out = mat @ moved.reshape(moved.shape[0], -1)
    return np.moveaxis(np.asarray(out).reshape(mat.shape[0], *rest), 0, axis)


def resample_image(image: np.ndarray, ratio: Sequence[float], *, kind: str = "cubic",
                   antialias: bool = True) -> np.ndarray:
    """Resample a 3D volume so that new voxel ``i`` sits at old voxel position ``i * ratio`` (per axis).

    Args:
        image: float [X, Y, Z].
        ratio: new spacing / old spacing per axis.
        kind: ``"cubic"`` (Keys, smooth) or ``"linear"``.
        antialias: Gaussian pre-filter (sigma = (ratio - 1) / 2 voxels) along downsampled axes.

    Returns:
        float32 [X', Y', Z'] with ``X' = floor((X - 1) / ratio_x) + 1``.
    """
    out = np.asarray(image, dtype=np.float32)
    for axis, r in enumerate(ratio):
        n = out.shape[axis]
        if abs(r - 1.0) < 1e-6:
            continue
        if antialias and r > 1.0:
            out = ndimage.gaussian_filter1d(out, sigma=(r - 1.0) / 2.0, axis=axis, mode="nearest")
        out = _apply_axis(out, _interp_matrix(n, _new_length(n, r), r, kind), axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def _nearest_index(n_old: int, n_new: int, ratio: float) -> np.ndarray:
    return np.clip(np.rint(np.arange(n_new) * ratio).astype(np.int64), 0, n_old - 1)


def resample_label(label: np.ndarray, ratio: Sequence[float], *, mode: str = "nearest",
                   shape: Sequence[int] | None = None) -> np.ndarray:
    """Resample an integer label map on the same grid convention as :func:`resample_image`.

    Args:
        label: int [X, Y, Z].
        ratio: new spacing / old spacing per axis.
        mode: ``"nearest"`` or ``"linear"`` (each class as a one-hot channel, linear, then arg-max).
        shape: output shape (default ``floor((n - 1) / ratio) + 1``).
    """
    shape = tuple(shape) if shape is not None else tuple(
        _new_length(n, r) for n, r in zip(label.shape, ratio, strict=True))
    if mode == "nearest":
        idx = [_nearest_index(n, m, r) for n, m, r in zip(label.shape, shape, ratio, strict=True)]
        return np.ascontiguousarray(label[np.ix_(*idx)])
    if mode != "linear":
        raise ValueError(f"label mode must be 'nearest' or 'linear', not {mode!r}")
    mats = [_interp_matrix(n, m, r, "linear") for n, m, r in zip(label.shape, shape, ratio, strict=True)]
    best = np.full(shape, -1.0, dtype=np.float32)
    out = np.zeros(shape, dtype=label.dtype)
    for c in np.unique(label):
        p = (label == c).astype(np.float32)
        for axis, m in enumerate(mats):
            p = _apply_axis(p, m, axis)
        better = p > best
        out[better] = c
        best[better] = p[better]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Normalisation


def _body_mask(ct: np.ndarray) -> np.ndarray:
    """CT voxels above ``CT_BODY_HU`` with holes (lungs, bowel gas) filled slice by slice."""
    mask = ct > CT_BODY_HU
    for k in range(mask.shape[2]):
        if mask[:, :, k].any():
            mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask


def normalise(image: np.ndarray, modality: str, *, clip: bool = True, percentiles=(0.5, 99.5),
              path: str = "") -> tuple[np.ndarray, dict]:
    """Z-score one channel; CT optionally clipped to body percentiles first (nnU-Net's CT scheme, per case).

    Args:
        image: float32 [X, Y, Z] (HU for CT).
        modality: ``"CT"`` uses the body mask and clipping; others use non-zero voxels, no clipping.
        clip: clip CT to the ``percentiles`` of the body voxels.
        path: named in errors.

    Returns:
        ``(normalised float32 [X, Y, Z], stats)`` with ``mean``, ``std``, ``clip`` (or None), ``fg_voxels``.

    Raises:
        DataError: the volume (or its foreground) is constant.
    """
    fg = _body_mask(image) if modality == "CT" else image != 0
    if fg.sum() < 2:
        fg = np.ones(image.shape, bool)
    values = image[fg]
    bounds = None
    if clip and modality == "CT":
        lo, hi = np.percentile(values, percentiles)
        bounds = [float(lo), float(hi)]
        image = np.clip(image, lo, hi)
        values = np.clip(values, lo, hi)
    mean, std = float(values.mean()), float(values.std())
    if not np.isfinite(std) or std < 1e-6:
        raise DataError(f"{path}: constant (zero-variance) volume, cannot normalise")
    out = ((image - mean) / std).astype(np.float32)
    return out, {"mean": mean, "std": std, "clip": bounds, "fg_voxels": int(fg.sum())}


# ---------------------------------------------------------------------------------------------------------------
# One case


def _load_label_map(path: Path, shape, affine, ref: Path, table: LabelTable) -> np.ndarray:
    data, aff, _ = load_nifti(path, dtype=None)
    check_same_grid(shape, affine, ref, data.shape, aff, path)
    if data.dtype.kind == "f":
        if not np.all(np.mod(data, 1) == 0):
            raise DataError(f"{path}: label map has non-integer values")
    data = data.astype(np.int64)
    n = len(table.source_names)
    bad = (data < 0) | (data > n)
    if bad.any():
        vals = np.unique(data[bad])[:10].tolist()
        raise DataError(f"{path}: label values {vals} outside the class table (0..{n})")
    return table.lut()[data].astype(table.dtype)


def _load_masks(masks, shape, affine, ref: Path, table: LabelTable) -> np.ndarray:
    """Merge binary masks into a label map; where masks overlap, the structure later in the source table wins."""
    ids = table.mask_ids()
    order = {n: i for i, n in enumerate(table.source_names)}
    out = np.zeros(shape, dtype=table.dtype)
    for name, path in sorted(masks, key=lambda m: order.get(m[0], -1)):
        if name not in ids:
            continue
        data, aff, _ = load_nifti(path, dtype=None)
        check_same_grid(shape, affine, ref, data.shape, aff, path)
        vals = np.unique(data)
        if not np.all(np.isin(vals, (0, 1))):
            raise DataError(f"{path}: mask values {vals[:10].tolist()} outside {{0, 1}}")
        out[data > 0] = ids[name]
    return out


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


def preprocess_case(source: CaseSource, table: LabelTable | None, *, spacing=(1.5, 1.5, 1.5), clip: bool = True,
                    label_mode: str = "nearest", image_kind: str = "cubic") -> dict:
    """Load, check, reorient, crop, resample and normalise one case (nothing is written).

    Returns:
        dict with ``image`` float32 [C, X, Y, Z], ``label`` [X, Y, Z] or None, ``fg`` int32 [N, 4], ``meta``.

    Raises:
        DataError: unreadable or truncated file, not 3D, non-finite voxels, constant volume, channels or label on
            another grid (shape or affine), label values outside the class table.
    """
    chans, ref = [], source.images[0]
    data, affine, orig = load_nifti(ref)
    chans.append(data)
    for p in source.images[1:]:
        d, a, _ = load_nifti(p)
        check_same_grid(data.shape, affine, ref, d.shape, a, p)
        chans.append(d)
    for p, d in zip(source.images, chans, strict=True):
        if float(d.max()) == float(d.min()):
            raise DataError(f"{p}: constant (zero-variance) volume, value {float(d.min())}")
    label = None
    if source.label is not None and table is not None:
        label = _load_label_map(source.label, data.shape, affine, ref, table)
    elif source.masks and table is not None:
        label = _load_masks(source.masks, data.shape, affine, ref, table)

    box = _nonzero_box(chans)
    sl = tuple(slice(a, b) for a, b in box)
    old_sp = nifti_spacing(affine)
    ratio = np.asarray(spacing, float) / old_sp
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ np.array([b[0] for b in box]) + affine[:3, 3]
    new_affine = crop_affine.copy()
    new_affine[:3, :3] = crop_affine[:3, :3] * ratio[None, :]

    out, stats = [], []
    for p, d, mod in zip(source.images, chans, source.modalities, strict=True):
        r = resample_image(d[sl], ratio, kind=image_kind)
        n, s = normalise(r, mod, clip=clip, path=str(p))
        out.append(n)
        stats.append(s)
    image = np.stack(out)
    if label is not None:
        label = resample_label(label[sl], ratio, mode=label_mode, shape=image.shape[1:])
    seed = zlib.crc32(source.case_id.encode())
    fg = _fg_locations(label, seed) if label is not None else np.zeros((0, 4), np.int32)
    meta = {
        "case_id": source.case_id,
        "source": {"images": [str(p) for p in source.images],
                   "label": str(source.label) if source.label else None,
                   "masks": len(source.masks), **dict(source.info)},
        "modalities": list(source.modalities),
        "original": {"shape": [int(n) for n in orig.shape[:3]], "affine": np.asarray(orig.affine).tolist(),
                     "spacing": nifti_spacing(orig.affine).tolist(),
                     "axcodes": "".join(nib.aff2axcodes(orig.affine))},
        "canonical": {"shape": [int(n) for n in data.shape], "affine": affine.tolist()},
        "crop_box": box,
        "spacing": [float(s) for s in spacing],
        "shape": [int(n) for n in image.shape[1:]],
        "affine": new_affine.tolist(),
        "normalisation": stats,
        "pad_value": [float(c.min()) for c in image],
        "has_label": label is not None,
        "classes_present": sorted(int(c) for c in np.unique(label) if c) if label is not None else [],
        "split": source.split,
    }
    return {"image": image, "label": label, "fg": fg, "meta": meta}


def _write_case(args) -> str:
    source, table, settings, out_dir = args
    final = Path(out_dir) / "cases" / source.case_id
    if (final / "meta.json").is_file():
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
        if len(c.modalities) != len(c.images):
            raise DataError(f"{c.images[0]}: {len(c.images)} channels but {len(c.modalities)} modalities")
        seen.add(c.case_id)


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
        extra: more keys for ``dataset.json``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        DataError: bad input (see :func:`preprocess_case`), or ``out_dir`` holds output made with other settings.
        Cases finished before the failure stay on disk; ``dataset.json`` is only written after all succeed.
    """
    from tqdm.auto import tqdm

    _check_sources(cases)
    out = Path(out_dir)
    if np.ndim(spacing) == 0:
        spacing = (float(spacing),) * 3
    settings = {
        "format": FORMAT, "name": name, "channels": list(channels), "spacing": [float(s) for s in spacing],
        "clip": bool(clip), "label_mode": label_mode, "image_kind": image_kind,
        "classes": list(table.names) if table else None,
        "class_sources": [list(s) for s in table.sources] if table else None,
    }
    stamp = out / "prepare.json"
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        if old != settings:
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            raise DataError(f"{out}: already holds a dataset prepared with other settings ({', '.join(diff)}); "
                            "use a new output folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stamp, settings)

    for stale in (out / "cases").glob(".*.tmp-*"):  # left by a killed run; never a finished case
        shutil.rmtree(stale, ignore_errors=True)
    jobs = [(c, table, settings, str(out)) for c in cases]
    workers = min(os.cpu_count() or 1, len(jobs)) if workers is None else workers
    bar = tqdm(total=len(jobs), desc=f"prepare {name}", unit="case", disable=not progress)
    if workers <= 1:
        for job in jobs:
            _write_case(job)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_write_case, j) for j in jobs]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                bar.update(len(done))
                for f in done:
                    if f.exception() is not None:
                        for p in pending:
                            p.cancel()
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise f.exception()
    bar.close()

    # dataset.json
    entries = []
    for c in cases:
        meta = json.loads((out / "cases" / c.case_id / "meta.json").read_text())
        entries.append({"id": c.case_id, "has_label": bool(meta["has_label"]), "split": c.split,
                        "shape": meta["shape"]})
    own = any(e["split"] for e in entries)
    if own:
        for e in entries:
            e["split"] = e["split"] or "train"
        split_source = "data set"
    else:
        labelled = [e["id"] for e in entries if e["has_label"]]
        groups = dict(zip([c.case_id for c in cases], split_groups, strict=True)) if split_groups else None
        assign = random_splits(labelled, seed, groups=[groups[i] for i in labelled] if groups else None)
        for e in entries:
            e["split"] = assign.get(e["id"], "train")
        split_source = f"random 70/10/20 of labelled cases, seed {seed}; unlabelled cases in train"
    splits = {s: [e["id"] for e in entries if e["split"] == s] for s in ("train", "val", "test")}
    class_names = ["background", *(table.names if table else ())]
    dataset = {
        "format": FORMAT,
        "name": name,
        "channels": list(channels),
        "labels": {n: i for i, n in enumerate(class_names)},
        "class_names": class_names,
        "class_sources": {n: list(s) for n, s in zip(table.names, table.sources, strict=True)} if table else {},
        "spacing": settings["spacing"],
        "axes": "image [C, x, y, z], label [x, y, z]; canonical RAS+ grid (x right, y anterior, z superior)",
        "label_dtype": np.dtype(table.dtype).name if table else None,
        "normalisation": ("CT: clip to body 0.5/99.5 percentiles, z-score" if clip else "CT: z-score") +
                         "; other modalities: z-score over non-zero voxels (per case)",
        "split_source": split_source,
        "splits": splits,
        "num_cases": len(entries),
        "cases": entries,
        **(extra or {}),
    }
    atomic_write_json(out / "dataset.json", dataset)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Back to the original geometry


def restore_to_original(label_array: np.ndarray, case_meta: dict) -> np.ndarray:
    """Map a label map on the preprocessed grid back to the original file's grid (shape and orientation).

    Nearest-neighbour inverse of the resampling, placed into the crop box (zeros outside), then re-oriented from
    canonical to the stored orientation.

    Args:
        label_array: int [X', Y', Z'] on the preprocessed grid (``case_meta["shape"]``).
        case_meta: the case's ``meta.json`` (dict).

    Returns:
        Array [original shape] in the original voxel order, same dtype as ``label_array``.
    """
    label_array = np.asarray(label_array)
    if tuple(label_array.shape) != tuple(case_meta["shape"]):
        raise DataError(f"case {case_meta['case_id']}: prediction shape {label_array.shape} differs from the "
                        f"preprocessed shape {tuple(case_meta['shape'])}")
    canon_aff = np.asarray(case_meta["canonical"]["affine"])
    old_sp = nifti_spacing(canon_aff)
    ratio = np.asarray(case_meta["spacing"], float) / old_sp
    box = case_meta["crop_box"]
    crop_shape = [b - a for a, b in box]
    idx = [np.clip(np.rint(np.arange(n) / r).astype(np.int64), 0, m - 1)
           for n, r, m in zip(crop_shape, ratio, label_array.shape, strict=True)]
    canon = np.zeros(case_meta["canonical"]["shape"], dtype=label_array.dtype)
    canon[tuple(slice(a, b) for a, b in box)] = label_array[np.ix_(*idx)]
    orig_ornt = nib.orientations.io_orientation(np.asarray(case_meta["original"]["affine"]))
    to_orig = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), orig_ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(canon, to_orig))


def write_prediction(label_array: np.ndarray, case_meta: dict, path) -> Path:
    """Restore a preprocessed-grid label map (:func:`restore_to_original`) and write it with the original affine."""
    restored = restore_to_original(label_array, case_meta)
    dtype = np.uint8 if restored.max(initial=0) < 256 and restored.min(initial=0) >= 0 else np.int16
    return save_nifti(path, restored, np.asarray(case_meta["original"]["affine"]), dtype=dtype)
