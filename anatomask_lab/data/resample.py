"""Resampling, intensity normalisation, and the way back from the preprocessed grid to the original one.

Grid convention: new voxel ``i`` sits at old voxel position ``i * ratio`` along each axis (``ratio`` = new spacing
/ old spacing), so the origin is kept and a volume of ``n`` voxels becomes ``floor((n - 1) / ratio) + 1``. Images
use a separable cubic (Keys) kernel after a Gaussian anti-aliasing filter along downsampled axes; labels use
nearest neighbour or one-hot linear interpolation. :func:`restore_to_canonical` inverts resampling and crop (for label
maps and per-class probabilities alike) and :func:`restore_to_original` also the reorientation, using the geometry
a case's ``meta.json`` records.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, sparse

from anatomask_lab.data.io import DataError, nifti_spacing, save_nifti

__all__ = [
    "CT_BODY_HU",
    "canonical_to_original",
    "normalise",
    "resample_image",
    "resample_label",
    "restore_to_canonical",
    "restore_to_original",
    "save_original_labels",
    "write_prediction",
]

CT_BODY_HU = -500.0  # CT voxels above this (holes filled per slice) are the body used for statistics


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
# Back to the original geometry


def canonical_to_original(canonical: np.ndarray, case_meta: dict) -> np.ndarray:
    """Reorient an array on the case's canonical (RAS+) grid to the voxel order of its original file.

    Args:
        canonical: [X, Y, Z] on the canonical grid (``case_meta["canonical"]["shape"]``).
        case_meta: the case's ``meta.json`` (dict).

    Raises:
        DataError: the array is not on the canonical grid.
    """
    canonical = np.asarray(canonical)
    if tuple(canonical.shape) != tuple(case_meta["canonical"]["shape"]):
        raise DataError(f"case {case_meta['case_id']}: array shape {canonical.shape} differs from the canonical "
                        f"shape {tuple(case_meta['canonical']['shape'])}")
    orig_ornt = nib.orientations.io_orientation(np.asarray(case_meta["original"]["affine"]))
    to_orig = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), orig_ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(canonical, to_orig))


def restore_to_canonical(array: np.ndarray, case_meta: dict, fill=0) -> np.ndarray:
    """Map arrays on the preprocessed grid back to the case's canonical (RAS+) grid: un-resample and un-crop.

    Nearest-neighbour inverse of the resampling (each canonical voxel of the crop box takes the preprocessed voxel
    nearest to it), placed into the crop box; voxels outside the box get ``fill``. Leading axes (e.g. classes) are
    carried along, so label maps and per-class probabilities go back through the same voxel mapping.

    Args:
        array: ``[..., X', Y', Z']`` on the preprocessed grid (``case_meta["shape"]``).
        case_meta: the case's ``meta.json`` (dict).
        fill: value outside the crop box: a scalar, or one value per leading index (shape ``array.shape[:-3]``).

    Returns:
        ``[..., *case_meta["canonical"]["shape"]]``, same dtype as ``array``; its voxel-to-world matrix is
        ``case_meta["canonical"]["affine"]``.

    Raises:
        DataError: ``array`` is not on the preprocessed grid.
    """
    array = np.asarray(array)
    if array.ndim < 3 or tuple(array.shape[-3:]) != tuple(case_meta["shape"]):
        raise DataError(f"case {case_meta['case_id']}: prediction shape {array.shape} differs from the "
                        f"preprocessed shape {tuple(case_meta['shape'])}")
    canon_aff = np.asarray(case_meta["canonical"]["affine"])
    ratio = np.asarray(case_meta["spacing"], float) / nifti_spacing(canon_aff)
    box = case_meta["crop_box"]
    crop_shape = [b - a for a, b in box]
    idx = [np.clip(np.rint(np.arange(n) / r).astype(np.int64), 0, m - 1)
           for n, r, m in zip(crop_shape, ratio, array.shape[-3:], strict=True)]
    lead = array.shape[:-3]
    canon = np.empty((*lead, *case_meta["canonical"]["shape"]), dtype=array.dtype)
    canon[...] = np.asarray(fill, dtype=array.dtype).reshape(np.shape(fill) + (1, 1, 1))
    canon[(Ellipsis, *(slice(a, b) for a, b in box))] = array[(Ellipsis, *np.ix_(*idx))]
    return canon


def restore_to_original(label_array: np.ndarray, case_meta: dict) -> np.ndarray:
    """Map a label map on the preprocessed grid back to the original file's grid (shape and orientation).

    Nearest-neighbour inverse of the resampling, placed into the crop box (zeros outside), then re-oriented from
    canonical to the stored orientation (:func:`restore_to_canonical`, then :func:`canonical_to_original`).

    Args:
        label_array: int [X', Y', Z'] on the preprocessed grid (``case_meta["shape"]``).
        case_meta: the case's ``meta.json`` (dict).

    Returns:
        Array [original shape] in the original voxel order, same dtype as ``label_array``.

    Raises:
        DataError: ``label_array`` is not on the preprocessed grid.
    """
    label_array = np.asarray(label_array)
    if label_array.ndim != 3:
        raise DataError(f"case {case_meta['case_id']}: prediction shape {label_array.shape} differs from the "
                        f"preprocessed shape {tuple(case_meta['shape'])}")
    return canonical_to_original(restore_to_canonical(label_array, case_meta), case_meta)


def save_original_labels(restored: np.ndarray, case_meta: dict, path) -> Path:
    """Write a label map on the original grid with the original affine (uint8 when values fit, else int16)."""
    dtype = np.uint8 if restored.max(initial=0) < 256 and restored.min(initial=0) >= 0 else np.int16
    return save_nifti(path, restored, np.asarray(case_meta["original"]["affine"]), dtype=dtype)


def write_prediction(label_array: np.ndarray, case_meta: dict, path) -> Path:
    """Restore a preprocessed-grid label map (:func:`restore_to_original`) and write it with the original affine."""
    return save_original_labels(restore_to_original(label_array, case_meta), case_meta, path)
