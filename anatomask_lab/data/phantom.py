"""A procedural abdominal CT phantom cohort, written in the TotalSegmentator release layout.

Each case is drawn from a template abdomen (adult proportions, millimetres, RAS axes: +x patient right, +y anterior,
+z superior) that is randomly scaled, shifted, rotated per organ and smoothly warped, then painted with typical
portal-venous-phase Hounsfield units (see ``docs/data.md``). Organs get internal texture
(liver vessels and cysts, kidney cortex / medulla / sinus, pancreatic lobulation, trabecular bone, lung vessels,
gastric and colonic content) while fat and air stay smooth, so masked-image reconstruction is harder inside organs.
The painted volume is blurred (scanner point spread + partial volume across slices) and gets correlated noise.

The template is scaled to fill the field of view: at the default 128 x 128 voxels of 1.5 mm (19.2 cm) the body is
child-sized (about 0.5 x adult in-plane; cranio-caudally at most 1.1 x the in-plane scale, so that the default
32 cm of slices reach from the heart to the upper thighs); about 2.7 mm in-plane gives an adult-sized body.
Labels use TotalSegmentator structure names, so the TotalSegmentator preparer reads the cohort.

    anatomask-lab phantom --out data/phantom --cases 32 --seed 0

This module is the public face (cases, cohorts, the command line). The painting lives beside it:
``phantom_shapes`` (warped grid, ellipsoids, tubes, noise), ``phantom_canvas`` (the context painters share),
``phantom_organs`` and ``phantom_skeleton`` (one painter per structure or group), ``phantom_png`` (the figure).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from anatomask_lab.data.io import atomic_dir, atomic_write, save_nifti
from anatomask_lab.data.phantom_canvas import OWNER_ID, PHANTOM_STRUCTURES, make_canvas
from anatomask_lab.data.phantom_organs import ORGAN_PAINTERS
from anatomask_lab.data.phantom_png import phantom_figure, write_png
from anatomask_lab.data.phantom_skeleton import paint_pelvis, paint_ribs, paint_sacrum, paint_spine, vertebra_levels

__all__ = [
    "PHANTOM_CLASSES",
    "PHANTOM_STRUCTURES",
    "add_cli",
    "generate_case",
    "generate_cohort",
    "phantom_figure",
    "save_phantom_png",
    "write_png",
]

#: The demo's 15-class table: organ names plus three groups (``name=glob``), for ``prepare --classes``.
PHANTOM_CLASSES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "aorta",
    "inferior_vena_cava", "urinary_bladder", "lung_lower_lobe_left", "lung_lower_lobe_right",
    "vertebrae=vertebrae_*+sacrum", "ribs=rib_*", "hip=hip_*",
)


def _render(seed: int, shape, spacing):
    """Paint one case: soft tissue first, then bone over it (the order fixes overlaps and random draws).

    Returns:
        ``(hu, owner, affine, grid, rng)``: painted HU float32 [X, Y, Z] before blur and noise, owner id uint8
        [X, Y, Z] (see ``phantom_canvas.OWNER_ID``), the [4, 4] affine, the template grid, and the random source
        positioned for :func:`_finish`.
    """
    cv = make_canvas(seed, shape, spacing)
    for paint in ORGAN_PAINTERS:
        paint(cv)
    levels = vertebra_levels(cv)
    paint_spine(cv, levels)
    paint_sacrum(cv, levels)
    paint_ribs(cv, levels)
    paint_pelvis(cv)
    return cv.hu, cv.owner, cv.affine, cv.grid, cv.rng


def _finish(hu: np.ndarray, spacing, rng: np.random.Generator) -> np.ndarray:
    """Scan the painted volume: blur (point spread + partial volume) and add correlated noise.

    Args:
        hu: painted HU, float32 [X, Y, Z].
        spacing: mm per voxel (x, y, z).
        rng: the case's random source, as :func:`_render` left it.

    Returns:
        int16 HU [X, Y, Z], clipped to -1024..3071.
    """
    spacing = np.asarray(spacing, float)
    psf_mm = 0.5
    sigma = np.sqrt(0.42 ** 2 + (psf_mm / spacing) ** 2)
    out = ndimage.gaussian_filter(hu, sigma, mode="nearest")
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), (0.7, 0.7, 0.4))
    noise *= rng.uniform(10.0, 16.0) / (noise.std() + 1e-6)
    out += noise
    np.clip(out, -1024, 3071, out=out)
    return np.rint(out).astype(np.int16)


def _case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` in the cohort of seed ``seed`` (independent of the other cases)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def generate_case(seed: int, shape=(128, 128, 128), spacing=(1.5, 1.5, 2.5)):
    """Generate one phantom CT with organ labels.

    Args:
        seed: any non-negative integer; the same seed, shape and spacing give the same case.
        shape: voxels along the stored array axes (X, Y, Z).
        spacing: voxel size in mm (in-plane x, y; slice z).

    Returns:
        ``(ct, labels, affine)``: ``ct`` int16 HU [X, Y, Z] in the stored (LPS-like) voxel order; ``labels`` maps
        each name of :data:`PHANTOM_STRUCTURES` to a bool [X, Y, Z] mask (possibly empty when outside the field of
        view); ``affine`` [4, 4] voxel-to-RAS-mm matrix ``diag(-sx, -sy, sz)`` plus a scanner-like origin.
    """
    hu, owner, affine, _, rng = _render(seed, shape, spacing)
    ct = _finish(hu, spacing, rng)
    labels = {name: owner == OWNER_ID[name] for name in PHANTOM_STRUCTURES}
    return ct, labels, affine


def _write_case(args) -> Path:
    """Render and write one case folder (skipped when already complete); ``args`` is one job tuple."""
    out_dir, case_id, seed, shape, spacing = args
    final = Path(out_dir) / case_id
    if (final / "ct.nii.gz").is_file() and (final / "segmentations").is_dir():
        return final
    hu, owner, affine, _, rng = _render(seed, shape, spacing)
    ct = _finish(hu, spacing, rng)

    def fill(tmp: Path) -> None:
        save_nifti(tmp / "ct.nii.gz", ct, affine)
        for name in PHANTOM_STRUCTURES:
            save_nifti(tmp / "segmentations" / f"{name}.nii.gz", (owner == OWNER_ID[name]).astype(np.uint8), affine)

    return atomic_dir(final, fill)


def _splits(n: int, seed: int) -> list[str]:
    """70/10/20 train/val/test assignment of ``n`` items, fixed by ``seed``."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(round(0.7 * n)), int(round(0.1 * n))
    out = ["test"] * n
    for rank, i in enumerate(order):
        out[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out


def generate_cohort(out_dir, n_cases: int, seed: int = 0, shape=(128, 128, 128), spacing=(1.5, 1.5, 2.5),
                    workers: int | None = None, progress: bool = True) -> list[Path]:
    """Write a phantom cohort in the TotalSegmentator release layout.

    Layout: ``<out>/s0000/ct.nii.gz`` (int16 HU), ``<out>/s0000/segmentations/<structure>.nii.gz`` (uint8 0/1, one
    per :data:`PHANTOM_STRUCTURES`), and ``<out>/meta.csv`` (``;``-separated, ``image_id`` and ``split`` columns
    among others; 70/10/20 train/val/test). Each case folder appears atomically; finished cases are skipped,
    so an interrupted run resumes. Case ``i`` depends only on ``(seed, i)``.

    Args:
        out_dir: output folder (created).
        n_cases: number of cases.
        seed: cohort seed.
        shape: voxels per case (X, Y, Z).
        spacing: mm per voxel.
        workers: processes (default: CPU count, at most ``n_cases``); 0 or 1 runs in this process.
        progress: show a tqdm bar.

    Returns:
        The case folders, in order.
    """
    from anatomask_lab.progress import progress as progress_bar

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [f"s{i:04d}" for i in range(n_cases)]
    jobs = [(str(out), cid, _case_seed(seed, i), tuple(shape), tuple(spacing)) for i, cid in enumerate(ids)]
    workers = min(os.cpu_count() or 1, n_cases) if workers is None else workers
    bar = progress_bar(total=n_cases, desc="phantom", unit="case", disable=not progress)
    paths = []
    if workers <= 1 or n_cases <= 1:
        for job in jobs:
            paths.append(_write_case(job))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for p in pool.map(_write_case, jobs):
                paths.append(p)
                bar.update()
    bar.close()
    _write_meta(out / "meta.csv", ids, seed)
    return paths


def _write_meta(path: Path, ids: list[str], seed: int) -> None:
    """Write the TotalSegmentator-style ``meta.csv`` (``;``-separated; made-up age and sex, the split) for ``ids``."""
    rng = np.random.default_rng([seed, 1])
    rows = []
    for cid, split in zip(ids, _splits(len(ids), seed), strict=True):
        rows.append({"image_id": cid, "age": int(rng.integers(4, 18)), "gender": "mf"[int(rng.integers(0, 2))],
                     "institute": "phantom", "study_type": "ct abdomen", "split": split,
                     "manufacturer": "anatomask-lab", "scanner_model": "procedural phantom", "kvp": 120,
                     "pathology": "no_pathology", "pathology_location": ""})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["image_id", "split"], delimiter=";",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda p: p.write_text(buf.getvalue()))


def save_phantom_png(path, seed: int = 0, shape=(128, 128, 128), spacing=(1.5, 1.5, 2.5), zoom: int = 1) -> Path:
    """Generate case ``seed`` and write :func:`phantom_figure` of it to ``path``."""
    ct, labels, affine = generate_case(seed, shape, spacing)
    return write_png(path, phantom_figure(ct, labels, affine, zoom=zoom))


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _run_cli(args: argparse.Namespace) -> int:
    paths = generate_cohort(args.out, args.cases, seed=args.seed, shape=tuple(args.shape),
                            spacing=tuple(args.spacing), workers=args.workers, progress=not args.no_progress)
    if args.png:
        save_phantom_png(args.png, seed=_case_seed(args.seed, 0), shape=tuple(args.shape),
                         spacing=tuple(args.spacing))
    print(f"wrote {len(paths)} phantom cases to {args.out}")
    return 0


def add_cli(subparsers) -> None:
    """Register ``anatomask-lab phantom``."""
    p = subparsers.add_parser(
        "phantom", help="generate the procedural abdominal CT phantom cohort (TotalSegmentator layout)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cases", type=int, default=32, help="number of cases (default 32)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 128), metavar=("X", "Y", "Z"),
                   help="volume size in voxels")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.5), metavar=("SX", "SY", "SZ"),
                   help="voxel spacing in mm")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--png", default=None, help="also write a figure of the first case to this PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_cli)
