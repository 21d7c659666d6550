"""Benchmark: NSD on a 256^3 label map with 20 classes, anatomask_lab.metrics vs MONAI, side by side.

Run ``python bench/bench_metrics.py [--size 256] [--classes 20] [--repeats 1]``. Both sides score the same synthetic
case (ellipsoid "organs", the prediction a shifted and resized copy of the ground truth) at anisotropic spacing
with a 3 mm tolerance. Ours starts from the label maps (class cropping included); MONAI
(``compute_surface_dice(..., use_subvoxels=True)``) gets its one-hot tensors ready-made, outside the timing.
Prints seconds for each, the ratio MONAI / ours and the largest absolute difference of the per-class NSD.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from anatomask_lab.metrics import evaluate_case

SPACING = (0.8, 0.8, 1.5)
TOLERANCE_MM = 3.0


def synthetic_case(size: int, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth and predicted label maps ``[size]*3`` (uint8) with ``n_classes`` ellipsoids each."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[:size, :size, :size]
    gt = np.zeros((size,) * 3, dtype=np.uint8)
    pred = np.zeros_like(gt)
    for label in range(1, n_classes + 1):
        centre = rng.uniform(0.2, 0.8, 3) * size
        radii = rng.uniform(0.04, 0.2, 3) * size
        shift = rng.normal(0.0, 1.5, 3)
        scale = rng.uniform(0.9, 1.1, 3)
        for labels, c, r in ((gt, centre, radii), (pred, centre + shift, radii * scale)):
            inside = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r, strict=True)) <= 1.0
            labels[inside] = label
    return pred, gt


def ours(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> np.ndarray:
    classes = {k: f"class_{k}" for k in range(1, n_classes + 1)}
    result = evaluate_case(pred, gt, SPACING, classes, TOLERANCE_MM)
    return np.array([result[name]["nsd"] for name in classes.values()])


def monai_nsd(pred_onehot, gt_onehot, n_classes: int) -> np.ndarray:
    from monai.metrics import compute_surface_dice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nsd = compute_surface_dice(pred_onehot, gt_onehot, [TOLERANCE_MM] * n_classes, include_background=False,
                                   spacing=list(SPACING), use_subvoxels=True)
    return nsd[0].numpy().astype(np.float64)


def one_hot(labels: np.ndarray, n_classes: int):
    import torch

    return torch.from_numpy(labels).long()[None] == torch.arange(n_classes + 1)[:, None, None, None]


def timed(fn, repeats: int):
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs each")
    args = parser.parse_args(argv)
    pred, gt = synthetic_case(args.size, args.classes)
    t_ours, v_ours = timed(lambda: ours(pred, gt, args.classes), args.repeats)
    pred_oh, gt_oh = one_hot(pred, args.classes)[None], one_hot(gt, args.classes)[None]
    t_monai, v_monai = timed(lambda: monai_nsd(pred_oh, gt_oh, args.classes), args.repeats)
    diff = float(np.nanmax(np.abs(v_ours - v_monai)))
    print(f"NSD, {args.size}^3 voxels, {args.classes} classes, spacing {SPACING} mm, tolerance {TOLERANCE_MM} mm")
    print(f"| {'implementation':<24} | {'seconds':>8} | {'ratio':>6} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 8}|")
    print(f"| {'anatomask_lab.metrics':<24} | {t_ours:8.2f} | {1.0:6.2f} |")
    print(f"| {'MONAI 1.x (subvoxels)':<24} | {t_monai:8.2f} | {t_monai / t_ours:6.2f} |")
    print(f"max |NSD ours - NSD MONAI| over classes: {diff:.2e}; mean NSD {np.nanmean(v_ours):.4f}")


if __name__ == "__main__":
    main()
