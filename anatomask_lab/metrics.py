"""Segmentation metrics: Dice (DSC) and normalised surface Dice (NSD), per class and case.

NSD follows the surface-distance definition of Nikolov et al. (DeepMind's ``surface-distance`` package, also MONAI's
``compute_surface_dice(..., use_subvoxels=True)``):

* A mask is zero-padded by one voxel (so that an object touching the volume border has a surface there, as in
  MONAI) and looked at through every 2x2x2 (2-D: 2x2) window of voxels. A window's *code* is its 8 (4) inside/outside
  bits; windows that are neither all-outside nor all-inside are *surfels*. Surfels live on the voxel grid shifted by
  half a voxel.
* Each surfel carries the area of the marching-cubes surface inside its window (2-D: the contour length of marching
  squares), computed for the voxel spacing from a table of triangle area vectors, see :func:`surfel_table`.
* Distances are Euclidean in mm between surfel centres (``scipy.ndimage.distance_transform_edt`` with
  ``sampling=spacing`` on the surfel grid), so anisotropic spacing is honoured exactly.
* ``NSD = (area of gt surfels within tol of the pred surface + area of pred surfels within tol of the gt surface)
  / (total gt area + total pred area)``. "Within" means ``distance <= tol``, both rounded to float32 (as MONAI does,
  so that a distance equal to the tolerance up to rounding counts as inside).

Empty-case conventions (``convention=``), applied identically by :func:`dice` and :func:`surface_dice`:

=======================  ============  =========
case                     ``totalseg``  ``flare``
=======================  ============  =========
gt empty, pred empty     NaN           1.0
gt empty, pred not       NaN           0.0
gt not empty, pred empty 0.0           0.0
=======================  ============  =========

``totalseg`` (the default) excludes a class absent from the ground truth, as TotalSegmentator's evaluation does;
NaN entries are ignored by the summaries in :mod:`anatomask_lab.report`. ``flare`` scores empty-vs-empty as 1, as
FLARE22 does. (For comparison, MONAI's NSD gives NaN / 0.0 / 0.0 and its DSC NaN / NaN / 0.0.)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
from scipy import ndimage

from anatomask_lab.data.prepare.flare22 import CLASSES as _FLARE22_TABLE

__all__ = [
    "CONVENTIONS",
    "FLARE22_CLASSES",
    "FLARE22_TOLERANCES_MM",
    "TOTALSEG_TOLERANCE_MM",
    "dice",
    "evaluate_case",
    "resolve_tolerances",
    "surface_area",
    "surface_dice",
    "surface_distances",
    "surfel_table",
]

CONVENTIONS: tuple[str, ...] = ("totalseg", "flare")
TOTALSEG_TOLERANCE_MM = 3.0
#: FLARE22 label -> organ name, from the preparer's table (the release's own names and label values).
FLARE22_CLASSES: Mapping[int, str] = MappingProxyType(dict(enumerate(_FLARE22_TABLE, start=1)))
FLARE22_TOLERANCES_MM: Mapping[int, float] = MappingProxyType({
    1: 5.0, 2: 3.0, 3: 3.0, 4: 5.0, 5: 2.0, 6: 2.0, 7: 2.0, 8: 2.0, 9: 2.0, 10: 3.0, 11: 5.0, 12: 7.0, 13: 3.0,
})

# Marching-cubes triangle area vectors per 2x2x2 code, from DeepMind's surface-distance lookup table, stored as
# absolute components times 8 (each digit: |n_x|, |n_y|, |n_z| in eighths of a voxel face), triangles separated by
# ".". Code bits: the window voxel at offset (a, b, c) sets bit 7 - (4a + 2b + c). A code and its complement
# (255 - code) have the same surface, so only codes 0..127 are listed. Signs do not matter for areas: the scaled
# area of a triangle is |(n_x s_y s_z, n_y s_x s_z, n_z s_x s_y)|.
_AREA_VECTORS_X8 = " ".join((
    "- 111 111 220.220 111 202.202 111.111 111.222.400",  # 0-7
    "111 111.111 202.202 111.222.400 220.220 111.222.400 111.222.400 400.400",  # 8-15
    "111 022.022 111.111 040.111.222 111.111 004.111.222 111.111.111 111.111.222.222",  # 16-23
    "111.111 022.022.111 111.202.202 022.111.202.333 111.220.220 022.111.220.333 111.111.222.400 111.222.400",
    "111 111.111 022.022 040.111.222 111.111 111.202.202 022.022.111 022.111.202.333",  # 32-39
    "111.111 111.111.111 004.111.222 111.111.222.222 111.220.220 111.111.222.400 022.111.220.333 111.222.400",
    "220.220 040.111.222 040.111.222 040.040 111.220.220 111.202.220.333 040.111.111.222 040.111.222",  # 48-55
    "111.220.220 040.111.111.222 111.202.220.333 040.111.222 220.220.220.220 111.220.220 111.220.220 220.220",
    "111 111.111 111.111 111.220.220 022.022 004.111.222 022.022.111 022.111.220.333",  # 64-71
    "111.111 111.111.111 111.202.202 111.111.222.400 040.111.222 111.111.222.222 022.111.202.333 111.222.400",
    "202.202 004.111.222 111.202.202 111.202.220.333 004.111.222 004.004 004.111.111.222 004.111.222",  # 80-87
    "111.202.202 004.111.111.222 202.202.202.202 111.202.202 111.202.220.333 004.111.222 111.202.202 202.202",
    "111.111 111.111.111 022.022.111 040.111.111.222 022.022.111 004.111.111.222 022.022.022.022 022.022.111",
    "111.111.111 111.111.111.111 004.111.111.222 111.111.111 040.111.111.222 111.111.111 022.022.111 111.111",
    "111.222.400 111.111.222.222 022.111.202.333 040.111.222 022.111.220.333 004.111.222 022.022.111 022.022",
    "111.111.222.400 111.111.111 111.202.202 111.111 111.220.220 111.111 111.111 111",  # 120-127
))


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------
def _check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return convention


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    return pred, gt


def _check_spacing(spacing: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    if ndim not in (2, 3):
        raise ValueError(f"surface metrics need 2-D or 3-D masks, got {ndim} dimensions")
    values = (float(spacing),) * ndim if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing!r}")
    return values


def _empty_score(pred_any: bool, gt_any: bool, convention: str) -> float | None:
    """Score fixed by the convention when a mask is empty; ``None`` when both masks are non-empty."""
    if gt_any:
        return None if pred_any else 0.0
    if convention == "totalseg":
        return math.nan
    return 0.0 if pred_any else 1.0


# ----------------------------------------------------------------------------------------------------------------
# Dice
# ----------------------------------------------------------------------------------------------------------------
def dice(pred: np.ndarray, gt: np.ndarray, *, convention: str = "totalseg") -> float:
    """Dice similarity coefficient ``2 |A n B| / (|A| + |B|)`` of two boolean masks.

    Args:
        pred: Predicted mask, any shape ``[*S]`` (cast to bool).
        gt: Ground-truth mask, same shape ``[*S]``.
        convention: ``"totalseg"`` or ``"flare"``; fixes the value when a mask is empty (module docstring).

    Returns:
        DSC in ``[0, 1]``, or NaN for a class excluded by the convention.
    """
    pred, gt = _check_pair(pred, gt)
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    fixed = _empty_score(n_pred > 0, n_gt > 0, _check_convention(convention))
    if fixed is not None:
        return fixed
    return 2.0 * int(np.count_nonzero(pred & gt)) / (n_pred + n_gt)


# ----------------------------------------------------------------------------------------------------------------
# surfels
# ----------------------------------------------------------------------------------------------------------------
def surfel_table(spacing: Sequence[float]) -> np.ndarray:
    """Surface area (3-D, mm^2) or contour length (2-D, mm) of each neighbourhood code for a voxel spacing.

    Args:
        spacing: Voxel size in mm, 3 (or 2) numbers along the array axes.

    Returns:
        float64 array ``[256]`` (3-D) or ``[16]`` (2-D), indexed by the window code; zero for codes 0 and all-ones.
    """
    spacing = _check_spacing(spacing, len(spacing))
    if len(spacing) == 2:
        return _contour_length_table(spacing)
    sx, sy, sz = spacing
    scale = np.array([sy * sz, sx * sz, sx * sy]) / 8.0
    half = np.linalg.norm(_area_vectors_x8() * scale, axis=-1).sum(axis=-1)
    return np.concatenate([half, half[::-1]])


def _area_vectors_x8() -> np.ndarray:
    """The packed table as integers ``[128, 4, 3]`` (codes 0..127, up to 4 triangles, zero-padded)."""
    vectors = np.zeros((128, 4, 3))
    for code, entry in enumerate(_AREA_VECTORS_X8.split(" ")):
        for k, triangle in enumerate(entry.split(".") if entry != "-" else ()):
            vectors[code, k] = [int(digit) for digit in triangle]
    return vectors


def _contour_length_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Marching-squares contour length per 2x2 code (bit ``3 - (2a + b)`` for the pixel at offset (a, b))."""
    half_diagonal = 0.5 * math.hypot(*spacing)
    table = np.zeros(16)
    for code in range(16):
        inside = [(a, b) for a in (0, 1) for b in (0, 1) if code >> (3 - (2 * a + b)) & 1]
        if len(inside) in (1, 3):  # one corner cut off
            table[code] = half_diagonal
        elif len(inside) == 2 and inside[0][0] == inside[1][0]:  # a row inside: contour runs along axis 1
            table[code] = spacing[1]
        elif len(inside) == 2 and inside[0][1] == inside[1][1]:  # a column inside: contour runs along axis 0
            table[code] = spacing[0]
        elif len(inside) == 2:  # diagonal pair: two corners cut off
            table[code] = 2 * half_diagonal
    return table


def _window_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbourhood codes of every 2x2x2 (2x2) window of a mask; shape ``[s - 1 for s in mask.shape]``."""
    bits = mask.view(np.uint8)
    n_bits = 2 ** mask.ndim
    codes = np.zeros(tuple(s - 1 for s in mask.shape), dtype=np.uint8)
    for index, offset in enumerate(itertools.product((0, 1), repeat=mask.ndim)):
        window = tuple(slice(o, o + s - 1) for o, s in zip(offset, mask.shape, strict=True))
        codes |= bits[window] << (n_bits - 1 - index)
    return codes


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    boxes = ndimage.find_objects(mask.view(np.uint8))
    return boxes[0] if boxes else None


def _padded_crop(mask: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """The mask inside ``box`` with one voxel of zeros around it (the volume border becomes a surface)."""
    out = np.zeros(tuple(b.stop - b.start + 2 for b in box), dtype=bool)
    out[tuple(slice(1, -1) for _ in box)] = mask[box]
    return out


def surface_area(mask: np.ndarray, spacing: float | Sequence[float]) -> float:
    """Area (3-D, mm^2) or contour length (2-D, mm) of a mask's marching-cubes surface.

    Args:
        mask: Boolean mask ``[X, Y, Z]`` or ``[X, Y]``; the volume border counts as surface.
        spacing: Voxel size in mm (one number for isotropic voxels).

    Returns:
        The total surfel area; 0 for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    spacing = _check_spacing(spacing, mask.ndim)
    box = _bounding_box(mask)
    if box is None:
        return 0.0
    return float(surfel_table(spacing)[_window_codes(_padded_crop(mask, box))].sum())


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: float | Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Surfel distances and areas in both directions (the ingredients of NSD, ASSD and Hausdorff distances).

    Args:
        pred: Non-empty boolean mask ``[X, Y, Z]`` or ``[X, Y]``.
        gt: Non-empty boolean mask of the same shape.
        spacing: Voxel size in mm.

    Returns:
        ``(dist_pred_to_gt [P], area_pred [P], dist_gt_to_pred [G], area_gt [G])`` over the ``P`` pred and ``G`` gt
        surfels, in mm and mm^2 (float64).
    """
    pred, gt = _check_pair(pred, gt)
    spacing = _check_spacing(spacing, pred.ndim)
    box = _bounding_box(pred | gt)
    if box is None or not pred.any() or not gt.any():
        raise ValueError("surface_distances needs two non-empty masks")
    table = surfel_table(spacing)
    full = len(table) - 1
    out = []
    codes = [_window_codes(_padded_crop(m, box)) for m in (pred, gt)]
    surfels = [(c != 0) & (c != full) for c in codes]
    for own, other, code in ((0, 1, codes[0]), (1, 0, codes[1])):
        distance = ndimage.distance_transform_edt(~surfels[other], sampling=spacing)
        out += [distance[surfels[own]], table[code[surfels[own]]]]
    return tuple(out)


def surface_dice(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: float | Sequence[float],
    tolerance_mm: float = TOTALSEG_TOLERANCE_MM,
    *,
    convention: str = "totalseg",
) -> float:
    """Normalised surface Dice at a tolerance in mm (definition and conventions in the module docstring).

    Args:
        pred: Predicted boolean mask ``[X, Y, Z]`` (or ``[X, Y]``).
        gt: Ground-truth boolean mask of the same shape.
        spacing: Voxel size in mm along the array axes (one number for isotropic voxels).
        tolerance_mm: Accepted surface deviation in mm, finite and >= 0.
        convention: ``"totalseg"`` or ``"flare"``; fixes the value when a mask is empty.

    Returns:
        NSD in ``[0, 1]``, or NaN for a class excluded by the convention.
    """
    pred, gt = _check_pair(pred, gt)
    _check_spacing(spacing, pred.ndim)
    tolerance = float(tolerance_mm)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    fixed = _empty_score(bool(pred.any()), bool(gt.any()), _check_convention(convention))
    if fixed is not None:
        return fixed
    d_pred, a_pred, d_gt, a_gt = surface_distances(pred, gt, spacing)
    tol32 = np.float32(tolerance)
    within = a_pred[d_pred.astype(np.float32) <= tol32].sum() + a_gt[d_gt.astype(np.float32) <= tol32].sum()
    return float(within / (a_pred.sum() + a_gt.sum()))


# ----------------------------------------------------------------------------------------------------------------
# label maps
# ----------------------------------------------------------------------------------------------------------------
def resolve_tolerances(spec: str | float | Mapping[int, float], classes: Mapping[int, str]) -> dict[int, float]:
    """Per-class NSD tolerance in mm.

    Args:
        spec: ``"totalseg"`` (3 mm for every class), ``"flare22"`` (FLARE22's per-organ table, by label 1..13), a
            number of mm (string or float) for every class, or a mapping label -> mm.
        classes: The class table, label -> name (background excluded).

    Returns:
        label -> tolerance in mm for every label of ``classes``.
    """
    if isinstance(spec, Mapping):
        table = {int(k): float(v) for k, v in spec.items()}
    elif spec == "totalseg":
        table = dict.fromkeys(classes, TOTALSEG_TOLERANCE_MM)
    elif spec == "flare22":
        table = dict(FLARE22_TOLERANCES_MM)
    else:
        try:
            value = float(spec)
        except (TypeError, ValueError):
            raise ValueError(f"tolerances must be 'totalseg', 'flare22' or a number of mm, got {spec!r}") from None
        table = dict.fromkeys(classes, value)
    missing = sorted(set(classes) - set(table))
    if missing:
        raise ValueError(f"no NSD tolerance for labels {missing} (tolerance table has labels {sorted(table)})")
    bad = {k: table[k] for k in classes if not (math.isfinite(table[k]) and table[k] >= 0)}
    if bad:
        raise ValueError(f"NSD tolerances must be finite and >= 0, got {bad}")
    return {k: table[k] for k in classes}


def evaluate_case(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    spacing: float | Sequence[float],
    classes: Mapping[int, str],
    tolerances: Mapping[int, float] | float | str = TOTALSEG_TOLERANCE_MM,
    convention: str = "totalseg",
) -> dict[str, dict[str, float]]:
    """DSC and NSD of every class of one case, from integer label maps.

    Each class is cropped to the bounding box of ``pred | gt`` (found for all classes in one pass with
    ``scipy.ndimage.find_objects``) before its surfaces and distance transforms are computed, which is what makes
    many small classes in a large volume cheap. The crop is exact, not an approximation: every surfel of either
    mask lies within the box plus the one-voxel zero border that :func:`surface_distances` adds, and distances are
    measured between surfels only, so no tolerance-sized margin is needed.

    Args:
        pred_labels: Predicted label map ``[X, Y, Z]`` (or ``[X, Y]``), non-negative integers, 0 = background.
        gt_labels: Ground-truth label map of the same shape.
        spacing: Voxel size in mm.
        classes: label -> class name for the labels to score (background excluded). Every non-zero label present
            in either map must be in it.
        tolerances: label -> mm, one number of mm, or a spec for :func:`resolve_tolerances`.
        convention: ``"totalseg"`` or ``"flare"`` (module docstring).

    Returns:
        class name -> ``{"dsc": float, "nsd": float}``, in the order of ``classes``.
    """
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction and ground truth shapes differ: {pred_labels.shape} vs {gt_labels.shape}")
    spacing = _check_spacing(spacing, gt_labels.ndim)
    _check_convention(convention)
    if len(set(classes.values())) != len(classes):
        raise ValueError(f"class names must be unique, got {sorted(classes.values())}")
    tolerance = resolve_tolerances(tolerances, classes)
    if any(isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 for k in classes):
        raise ValueError(f"class labels must be positive integers (0 is background), got {sorted(classes)}")
    boxes = []
    for name, labels in (("prediction", pred_labels), ("ground truth", gt_labels)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name} label map must hold integers, got dtype {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise ValueError(f"{name} label map holds negative labels (min {labels.min()})")
        found = ndimage.find_objects(labels.astype(np.int32, copy=False))
        unknown = [i + 1 for i, box in enumerate(found) if box is not None and i + 1 not in classes]
        if unknown:
            raise ValueError(f"{name} holds labels {unknown} outside the class table {sorted(classes)}")
        boxes.append(found)
    results = {}
    for label, name in classes.items():
        box = _union_box([b[label - 1] if label - 1 < len(b) else None for b in boxes])
        if box is None:
            pred = gt = np.zeros((1,) * gt_labels.ndim, dtype=bool)
        else:
            pred, gt = pred_labels[box] == label, gt_labels[box] == label
        results[name] = {
            "dsc": dice(pred, gt, convention=convention),
            "nsd": surface_dice(pred, gt, spacing, tolerance[label], convention=convention),
        }
    return results


def _union_box(boxes: list[tuple[slice, ...] | None]) -> tuple[slice, ...] | None:
    present = [b for b in boxes if b is not None]
    if not present:
        return None
    return tuple(slice(min(s.start for s in axis), max(s.stop for s in axis)) for axis in zip(*present, strict=True))
