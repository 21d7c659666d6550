"""A procedural abdominal CT phantom cohort, written in the TotalSegmentator release layout.

Each case is drawn from a template abdomen (adult proportions, millimetres, RAS axes: +x patient right, +y anterior,
+z superior) that is randomly scaled, shifted, rotated per organ and smoothly warped, then painted with typical
portal-venous-phase Hounsfield units (see ``shared/reference/method-notes.md``). Organs get internal texture
(liver vessels and cysts, kidney cortex / medulla / sinus, pancreatic lobulation, trabecular bone, lung vessels,
gastric and colonic content) while fat and air stay smooth, so masked-image reconstruction is harder inside organs.
The painted volume is blurred (scanner point spread + partial volume across slices) and gets correlated noise.

The template is scaled to fill the field of view: at the default 128 x 128 voxels of 1.5 mm (19.2 cm) the body is
child-sized (about 0.5 x adult in-plane; cranio-caudally at most 1.1 x the in-plane scale, so that the default
32 cm of slices reach from the heart to the upper thighs); about 2.7 mm in-plane gives an adult-sized body.
Labels use TotalSegmentator structure names, so the TotalSegmentator preparer reads the cohort.

    anatomask-lab phantom --out data/phantom --cases 32 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from anatomask_lab.data.io import atomic_dir, atomic_write, save_nifti

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

_VERTEBRAE = ("T3", "T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")
_RIBS = tuple(range(3, 13))

#: Labelled structures written to ``segmentations/`` (TotalSegmentator names, present in both v1 and v2).
PHANTOM_STRUCTURES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "aorta",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "urinary_bladder", "colon",
    "lung_lower_lobe_left", "lung_upper_lobe_left", "lung_lower_lobe_right", "lung_middle_lobe_right",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right",
    "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right",
    *(f"vertebrae_{v}" for v in _VERTEBRAE), "sacrum",
    *(f"rib_left_{k}" for k in _RIBS), *(f"rib_right_{k}" for k in _RIBS),
    "hip_left", "hip_right", "femur_left", "femur_right",
)

#: The demo's 15-class table: organ names plus three groups (``name=glob``), for ``prepare --classes``.
PHANTOM_CLASSES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "aorta",
    "inferior_vena_cava", "urinary_bladder", "lung_lower_lobe_left", "lung_lower_lobe_right",
    "vertebrae=vertebrae_*+sacrum", "ribs=rib_*", "hip=hip_*",
)

# unlabelled tissues (owner ids 1..), then the labelled structures
_TISSUES = ("_subcut_fat", "_muscle", "_fat", "_bowel", "_diaphragm", "_heart", "_vessel", "_disc", "_canal",
            "_sinus", "_stomach_air")
_OWNERS = ("air", *_TISSUES, *PHANTOM_STRUCTURES)
_ID = {name: i for i, name in enumerate(_OWNERS)}


@dataclass(frozen=True)
class _Grid:
    """Voxel grid and its map to template coordinates (all arrays float32 [X, Y, Z])."""

    tx: np.ndarray
    ty: np.ndarray
    tz: np.ndarray
    origin: np.ndarray  # world position of voxel (0, 0, 0)
    step: np.ndarray  # signed spacing per axis (diagonal affine)
    center: np.ndarray  # world position of template origin
    scale: np.ndarray  # world mm per template mm, per axis
    warp_max: float
    shape: tuple[int, int, int]

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Voxel slices covering the template box [lo, hi] (with room for the warp), or None when outside."""
        lo = np.asarray(lo, float) - self.warp_max
        hi = np.asarray(hi, float) + self.warp_max
        w0 = (self.center + self.scale * lo - self.origin) / self.step
        w1 = (self.center + self.scale * hi - self.origin) / self.step
        a = np.floor(np.minimum(w0, w1)).astype(int) - 1
        b = np.ceil(np.maximum(w0, w1)).astype(int) + 2
        a = np.clip(a, 0, self.shape)
        b = np.clip(b, 0, self.shape)
        if np.any(b <= a):
            return None
        return tuple(slice(int(i), int(j)) for i, j in zip(a, b, strict=True))

    def coords(self, sl):
        return self.tx[sl], self.ty[sl], self.tz[sl]


def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles in degrees."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _noise(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    """Smooth Gaussian random field with unit standard deviation and correlation length ``sigma_vox`` voxels.

    Small scales filter white noise; large scales interpolate a coarse random grid with separable Gaussian
    weights (three small matrix products instead of a wide convolution).
    """
    sigma = np.maximum(np.asarray(sigma_vox, float), 0.3)
    if np.all(sigma <= 3.0):
        field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    else:
        mats = []
        for n, s in zip(shape, sigma, strict=True):
            step = max(s, 1.0)
            k = int(math.ceil(n / step)) + 5
            pos = (np.arange(k) - 2.5) * step
            mats.append(np.exp(-0.5 * ((np.arange(n)[:, None] - pos[None, :]) / s) ** 2).astype(np.float32))
        k = tuple(m.shape[1] for m in mats)
        g = rng.standard_normal(k, dtype=np.float32)
        field = (mats[0] @ g.reshape(k[0], -1)).reshape(shape[0], k[1], k[2])  # [X, k1, k2]
        field = np.matmul(mats[1], field)  # [X, Y, k2]
        field = (field.reshape(-1, k[2]) @ mats[2].T).reshape(shape)  # [X, Y, Z]
    field = field.astype(np.float32, copy=False)
    field -= field.mean()
    field /= field.std() + 1e-6
    return field


def _ellipsoid(grid: _Grid, center, semi, rot=None):
    """Normalised local coordinates (u, v, w) of an ellipsoid over its bounding box: inside is u²+v²+w² <= 1."""
    c = np.asarray(center, float)
    s = np.asarray(semi, float)
    r = np.eye(3) if rot is None else rot
    ext = np.abs(r) @ s
    sl = grid.box(c - ext, c + ext)
    if sl is None:
        return None, (None, None, None)
    x, y, z = grid.coords(sl)
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    # local = R^T d, then scaled
    u = (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz) / s[0]
    v = (r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz) / s[1]
    w = (r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz) / s[2]
    return sl, (u, v, w)


def _tube(grid: _Grid, points, radii):
    """Normalised distance to a chain of capsules (radius interpolated along each segment); inside is <= 1.

    Returns ``(slices, dist)`` over the chain's bounding box, ``dist = inf`` where no segment is near.
    """
    p = np.asarray(points, float)
    r = np.broadcast_to(np.asarray(radii, float), (len(p),))
    sl = grid.box(p.min(0) - r.max(), p.max(0) + r.max())
    if sl is None:
        return None, None
    x, y, z = grid.coords(sl)
    out = np.full(x.shape, np.inf, dtype=np.float32)
    off = np.array([s.start for s in sl])
    for i in range(len(p) - 1):
        a, b = p[i], p[i + 1]
        rm = max(r[i], r[i + 1])
        sub = grid.box(np.minimum(a, b) - rm, np.maximum(a, b) + rm)
        if sub is None:
            continue
        loc = tuple(
            slice(max(s.start, t.start) - o, min(s.stop, t.stop) - o) for s, t, o in zip(sub, sl, off, strict=True)
        )
        if any(q.stop <= q.start for q in loc):
            continue
        xs, ys, zs = x[loc], y[loc], z[loc]
        d = b - a
        ll = float(d @ d) or 1.0
        t = np.clip(((xs - a[0]) * d[0] + (ys - a[1]) * d[1] + (zs - a[2]) * d[2]) / ll, 0.0, 1.0)
        dist2 = (xs - a[0] - t * d[0]) ** 2 + (ys - a[1] - t * d[1]) ** 2 + (zs - a[2] - t * d[2]) ** 2
        rad = r[i] + t * (r[i + 1] - r[i])
        np.minimum(out[loc], np.sqrt(dist2) / rad, out=out[loc])
    return sl, out


def _paint(hu, owner, sl, mask, name: str, value) -> None:
    """Set ``owner`` to ``name``'s id and ``hu`` to ``value`` (scalar or box-shaped array) where ``mask``."""
    if sl is None or mask is None or not mask.any():
        return
    h = hu[sl]
    h[mask] = value[mask] if np.ndim(value) else value
    owner[sl][mask] = _ID[name]


def _superellipse(x, y, a, b_ant, b_post, p=2.3):
    b = np.where(y > 0, b_ant, b_post)
    return (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)


def _render(seed: int, shape, spacing):
    """Paint one case. Returns (hu float32 [X, Y, Z] before blur/noise, owner uint8 [X, Y, Z], affine, grid, rng)."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in shape)
    spacing = np.asarray(spacing, float)
    nrm = rng.normal

    # -- geometry: LPS-ordered voxels as DICOM converters write them (affine diag(-sx, -sy, sz)), scanner-like origin
    step = np.array([-spacing[0], -spacing[1], spacing[2]])
    fov = spacing * (np.array(shape) - 1)
    world_center = np.array([nrm(0, 3), nrm(-20, 8), rng.uniform(-700, -400)])
    origin = world_center - step * (np.array(shape) - 1) / 2
    affine = np.diag([*step, 1.0])
    affine[:3, 3] = origin
    # body: abdominal cavity of fixed proportions, then muscle and fat outwards (fat varies most between people)
    a_c = 118.0 * rng.uniform(0.95, 1.05)  # cavity half-width
    b_ca, b_cp = 82.0 * rng.uniform(0.93, 1.07), 80.0 * rng.uniform(0.95, 1.05)  # anterior / posterior half-depth
    fat = rng.uniform(8, 30)
    muscle = rng.uniform(8, 13)
    half_w = a_c * 1.1 + muscle + 0.8 * fat
    half_d = max(b_ca * 1.04 + muscle + 1.2 * fat, b_cp * 1.04 + muscle + 0.7 * fat)
    s_xy = 0.9 * min(fov[0] / 2 / half_w, fov[1] / 2 / half_d) * rng.uniform(0.92, 1.0)
    scale = np.array([s_xy, s_xy, min(fov[2] / 460.0, 1.1 * s_xy)])
    t_center = np.array([nrm(0, 4), nrm(0, 4), -45 + rng.uniform(-25, 25)])  # template point at FOV centre
    center = world_center - scale * t_center

    # template coordinates per voxel, with a smooth random warp (template mm)
    warp_amp = 7.0
    vox_per_mm = scale / spacing
    idx = [np.arange(n, dtype=np.float32) for n in shape]
    base = [((origin[a] + step[a] * idx[a]) - center[a]) / scale[a] for a in range(3)]
    wsig = 60.0 * vox_per_mm
    tx = base[0][:, None, None] + warp_amp * _noise(rng, shape, wsig)
    ty = base[1][None, :, None] + warp_amp * _noise(rng, shape, wsig)
    tz = base[2][None, None, :] + warp_amp * _noise(rng, shape, wsig)
    grid = _Grid(tx.astype(np.float32), ty.astype(np.float32), tz.astype(np.float32), origin, step, center, scale,
                 warp_amp * 4.5, shape)

    # texture fields (unit std): organ heterogeneity, two vessel fields, bowel loops, fine grain
    f_org = _noise(rng, shape, 22.0 * vox_per_mm)
    f_v1 = _noise(rng, shape, 9.0 * vox_per_mm)
    f_v2 = _noise(rng, shape, 9.0 * vox_per_mm)
    f_loop = _noise(rng, shape, 13.0 * vox_per_mm)
    f_fine = _noise(rng, shape, np.maximum(2.5 * vox_per_mm, 0.6))
    vessels = f_v1 ** 2 + f_v2 ** 2  # small near curves where both fields cross zero

    hu = np.full(shape, -1000.0, dtype=np.float32)
    owner = np.zeros(shape, dtype=np.uint8)
    full = (slice(None),) * 3

    # -- body wall: skin/subcutaneous fat, muscle, abdominal cavity
    crest = -105.0 + nrm(0, 6)  # iliac crest
    floor = crest - 150.0  # pelvic floor; below it the trunk splits into the thighs
    hips = 1.0 / (1.0 + np.exp((tz + 150.0) / 25.0))
    a_z = a_c * (1.0 + 0.10 * hips)
    ba_z, bp_z = b_ca * (1.0 + 0.04 * hips), b_cp * (1.0 + 0.04 * hips)
    legs = np.clip((floor + 10.0 - tz) / 50.0, 0.0, 1.0)
    a_b = a_z + muscle + 0.8 * fat
    xl = np.abs(tx) - 0.53 * a_b * legs  # distance from the thigh axis
    shrink = 1.0 - 0.56 * legs
    rho_body = _superellipse(xl, ty, a_b * shrink, (ba_z + muscle + 1.2 * fat) * (1 - 0.12 * legs),
                             (bp_z + muscle + 0.7 * fat) * (1 - 0.12 * legs))
    _paint(hu, owner, full, rho_body <= 1, "_subcut_fat", -104.0 + 2.0 * f_org)
    rho_in = _superellipse(xl, ty, (a_z + muscle) * shrink - 0.8 * fat * legs, (ba_z + muscle) * (1 - 0.12 * legs),
                           (bp_z + muscle) * (1 - 0.12 * legs))
    _paint(hu, owner, full, rho_in <= 1, "_muscle", 52.0 + 4.0 * f_fine)
    rho_cav = _superellipse(tx, ty, a_z, ba_z, bp_z, p=2.6)
    cavity = (rho_cav <= 1) & (tz > floor)
    del legs, xl, shrink
    _paint(hu, owner, full, cavity, "_fat", -94.0 + 2.5 * f_org)
    del rho_body, rho_in

    # diaphragm: two domes, lower posteriorly and laterally
    zr, zl = 135 + nrm(0, 8), 122 + nrm(0, 8)
    dome = np.maximum(zr - 0.0094 * (tx - 60) ** 2 - 0.0068 * (ty - 10) ** 2,
                      zl - 0.0094 * (tx + 60) ** 2 - 0.0068 * (ty - 10) ** 2)
    dome = np.maximum(dome, 40.0)
    below = cavity & (tz < dome - 2.5)
    above = cavity & (tz > dome + 2.5)
    _paint(hu, owner, full, cavity & ~below & ~above, "_diaphragm", 55.0)

    # spine axis (lordosis / kyphosis)
    def spine_y(z):
        return -42.0 + 8.0 * np.exp(-(((z + 60.0) / 80.0) ** 2)) - 6.0 / (1.0 + np.exp(-(z - 120.0) / 40.0))

    # -- colon and small bowel
    colon_pts = np.array([
        (75, 10, -130), (90, -10, -60), (95, 10, 20), (50, 68, 15), (0, 78, 5), (-60, 62, 35), (-95, 5, 60),
        (-100, -15, -20), (-95, -5, -110), (-50, 20, -170), (-10, -20, -200), (0, -52, -230), (0, -52, -290),
    ], float) + nrm(0, 6, size=(13, 3))
    colon_r = np.array([24, 21, 19, 19, 17, 19, 19, 17, 17, 16, 16, 18, 14]) * rng.uniform(0.85, 1.15)
    sl, d = _tube(grid, colon_pts, colon_r)
    if sl is not None:
        inside = (d <= 1) & cavity[sl]
        gas = f_loop[sl] + 0.5 * f_fine[sl] > rng.uniform(0.5, 1.2)
        content = np.where(gas, -960.0 + 10 * f_fine[sl], -250.0 + 160.0 * np.clip(f_fine[sl], -1.5, 1.5))
        content = np.where(d > 0.86, 48.0, content)  # wall
        _paint(hu, owner, sl, inside, "colon", content)
    sl = grid.box((-110, -40, -200), (110, 110, 15))
    if sl is not None:
        x, y, z = grid.coords(sl)
        free = (owner[sl] == _ID["_fat"]) & below[sl] & (y > -35 + 0.3 * np.abs(x))
        loops = np.abs(f_loop[sl]) < 0.55
        content = 38.0 + 14.0 * f_fine[sl]
        content = np.where(np.abs(f_loop[sl]) > 0.42, 62.0, content)  # enhancing wall at the loop edge
        content = np.where(f_v1[sl] > 1.6, -930.0, content)  # gas pockets
        _paint(hu, owner, sl, free & loops, "_bowel", content)

    # -- muscles: paraspinal (autochthon) and iliopsoas
    for side, sgn in (("left", -1), ("right", 1)):
        zs = np.linspace(-170, 330, 9)
        pts = np.stack([np.full(9, sgn * 30.0), spine_y(zs) - 40.0, zs], 1) + nrm(0, 2, (9, 3))
        rad = 20.0 + 4.0 * np.exp(-(((zs + 60) / 90) ** 2))
        sl, d = _tube(grid, pts, rad)
        _paint(hu, owner, sl, d <= 1 if d is not None else None, f"autochthon_{side}", 50.0 + 5.0 * f_fine[sl])
        pts = np.array([(30, -36, 45), (43, -30, -40), (52, -22, -110), (68, 5, -185), (78, 25, -240),
                        (80, 30, -290)], float)
        pts[:, 0] *= sgn
        pts += nrm(0, 3, pts.shape)
        rad = np.array([5, 17, 24, 22, 17, 15]) * rng.uniform(0.85, 1.15)
        sl, d = _tube(grid, pts, rad)
        _paint(hu, owner, sl, d <= 1 if d is not None else None, f"iliopsoas_{side}", 54.0 + 5.0 * f_fine[sl])

    # -- thorax: heart and lung bases (lobes split by an oblique fissure)
    hc = np.array([-30, 28, 0.5 * (zr + zl) + 30]) + nrm(0, 5, 3)
    sl, (u, v, w) = _ellipsoid(grid, hc, np.array([78, 55, 52]) * rng.uniform(0.9, 1.1), _rot(0, -20, 30))
    if sl is not None:
        r2 = u * u + v * v + w * w
        heart = (r2 <= 1) & above[sl]
        _paint(hu, owner, sl, heart, "_heart", np.where(r2 > 0.72, 105.0, 150.0 + 6 * f_org[sl]))
    fissure = nrm(0, 5)
    sl = grid.box((-250, -250, 30), (250, 250, 600))
    if sl is not None:
        x, y, z = grid.coords(sl)
        lung = above[sl] & (owner[sl] != _ID["_heart"]) & (np.abs(x) > 14)
        lung_hu = -865.0 + 22.0 * f_org[sl] + np.where(vessels[sl] < 0.02, 880.0, 0.0) + 12.0 * f_fine[sl]
        lower = y < 60.0 - 1.1 * (z - 110.0) + fissure
        _paint(hu, owner, sl, lung & (x < 0) & lower, "lung_lower_lobe_left", lung_hu)
        _paint(hu, owner, sl, lung & (x < 0) & ~lower, "lung_upper_lobe_left", lung_hu)
        _paint(hu, owner, sl, lung & (x > 0) & lower, "lung_lower_lobe_right", lung_hu)
        _paint(hu, owner, sl, lung & (x > 0) & ~lower, "lung_middle_lobe_right", lung_hu)

    def organ(sl, mask):
        return mask & below[sl] if mask is not None else None

    # -- liver: a large right lobe and a left lobe under the domes, oblique inferior border; vessels, cysts
    liv = rng.uniform(0.88, 1.12)
    c_r = np.array([58, -2, 62]) + nrm(0, 6, 3)
    c_l = np.array([-25, 40, 98]) + nrm(0, 6, 3)
    box_lo = np.minimum(c_r - 120 * liv, c_l - 80 * liv)
    box_hi = np.maximum(c_r + 120 * liv, c_l + 80 * liv)
    sl = grid.box(box_lo, box_hi)
    if sl is not None:
        x, y, z = grid.coords(sl)
        rr, rl = _rot(nrm(0, 5), 10 + nrm(0, 5), nrm(0, 5)), _rot(0, 0, -20 + nrm(0, 6))
        inside = np.zeros(x.shape, bool)
        for c, s, r in ((c_r, np.array([92, 98, 110]) * liv, rr), (c_l, np.array([68, 42, 40]) * liv, rl)):
            d = np.stack([x - c[0], y - c[1], z - c[2]], -1) @ r
            inside |= ((d / s) ** 2).sum(-1) <= 1
        z_inf = c_r[2] - 100 * liv + 0.55 * (c_r[0] + 85 - x) + 0.25 * np.abs(y - 20)
        inside &= z > z_inf
        value = 108.0 + nrm(0, 4) + 7.0 * f_org[sl] + 6.0 * f_v2[sl] + 4.0 * f_fine[sl]
        value = np.where(vessels[sl] < 0.06, 165.0, value)  # portal and hepatic veins
        for _ in range(rng.integers(0, 3)):
            cc = c_r + nrm(0, 30, 3)
            rc = rng.uniform(5, 12)
            value = np.where((x - cc[0]) ** 2 + (y - cc[1]) ** 2 + (z - cc[2]) ** 2 < rc * rc, 8.0, value)
        _paint(hu, owner, sl, organ(sl, inside & cavity[sl]), "liver", value)

    # -- spleen: crescent
    sp = rng.uniform(0.8, 1.2)
    c = np.array([-82, -36, 62]) + nrm(0, 5, 3)
    r = _rot(-30 + nrm(0, 8), 0, 225 + nrm(0, 10))
    sl, (u, v, w) = _ellipsoid(grid, c, np.array([22, 40, 58]) * sp, r)
    if sl is not None:
        x, y, z = grid.coords(sl)
        hil = c - r @ np.array([30 * sp, 0, 0])
        d = np.stack([x - hil[0], y - hil[1], z - hil[2]], -1) @ r
        notch = ((d / (np.array([20, 28, 40]) * sp)) ** 2).sum(-1) <= 1
        mask = (u * u + v * v + w * w <= 1) & ~notch & cavity[sl]
        _paint(hu, owner, sl, organ(sl, mask), "spleen",
               114.0 + nrm(0, 4) + 6.0 * f_org[sl] + 9.0 * f_v1[sl] + 4.0 * f_fine[sl])

    # -- stomach: fundus/body + antrum, wall, air-fluid level (supine: air anterior)
    st = rng.uniform(0.85, 1.15)
    parts = (
        (np.array([-62, 28, 82]) + nrm(0, 6, 3), np.array([40, 38, 62]) * st, _rot(0, -25 + nrm(0, 6), nrm(0, 6))),
        (np.array([-5, 55, 35]) + nrm(0, 6, 3), np.array([45, 20, 22]) * st, _rot(0, 0, 15 + nrm(0, 8))),
    )
    sl = grid.box(np.min([p[0] - p[1].max() for p in parts], 0), np.max([p[0] + p[1].max() for p in parts], 0))
    if sl is not None:
        x, y, z = grid.coords(sl)
        outer = np.zeros(x.shape, bool)
        inner = np.zeros(x.shape, bool)
        for c, s, r in parts:
            d = ((np.stack([x - c[0], y - c[1], z - c[2]], -1) @ r) / s) ** 2
            q = d.sum(-1)
            outer |= q <= 1
            inner |= (d * (s / np.maximum(s - 4.5, 1)) ** 2).sum(-1) <= 1
        level = parts[0][0][1] + rng.uniform(-10, 35)
        lumen = np.where(y > level, -985.0, 18.0 + 22.0 * np.clip(f_fine[sl], -1, 2))
        value = np.where(inner, lumen, 62.0)
        _paint(hu, owner, sl, organ(sl, outer & cavity[sl]), "stomach", value)

    # -- vessels feeding the organs (unlabelled) and the portal / splenic vein (labelled)
    for pts, rad, hval in (
        ([(-50, -30, 5), (-15, 8, 8), (22, -8, 5)], 5.0, 150.0),  # left renal vein
        ([(50, -32, -12), (24, -12, -10)], 5.0, 150.0),  # right renal vein
        ([(-12, 0, 25), (-8, 22, 5), (-5, 30, -90)], 4.0, 172.0),  # superior mesenteric artery
        ([(5, 12, 18), (8, 32, -90)], 5.0, 150.0),  # superior mesenteric vein
    ):
        sl, d = _tube(grid, np.array(pts, float) + nrm(0, 2, (len(pts), 3)), rad)
        _paint(hu, owner, sl, organ(sl, d <= 1) if d is not None else None, "_vessel", hval)
    pv = np.array([(-88, -28, 42), (-45, -5, 25), (-5, 8, 18), (15, 12, 25), (40, 10, 58), (55, 5, 75)], float)
    sl, d = _tube(grid, pv + nrm(0, 3, pv.shape), np.array([5, 6, 6, 7, 7, 5]) * rng.uniform(0.85, 1.15))
    _paint(hu, owner, sl, organ(sl, d <= 1) if d is not None else None, "portal_vein_and_splenic_vein",
           155.0 + nrm(0, 5))

    # -- pancreas: head to tail, lobulated
    pa = np.array([(35, -5, -22), (40, 5, -8), (20, 16, 2), (0, 20, 8), (-30, 12, 15), (-60, -8, 25),
                   (-88, -30, 38)], float) + nrm(0, 4, (7, 3))
    sl, d = _tube(grid, pa, np.array([10, 15, 12, 10, 10, 11, 9]) * rng.uniform(0.85, 1.15))
    if sl is not None:
        value = np.where(f_fine[sl] > 0.8, -45.0, 100.0 + nrm(0, 5) + 6.0 * f_org[sl] + 8.0 * f_v1[sl])
        _paint(hu, owner, sl, organ(sl, (d <= 1) & cavity[sl]), "pancreas", value)

    # -- kidneys: cortex, medulla with pyramids, sinus fat and pelvis at the medial hilum
    for side, sgn, zc in (("left", -1, 2.0), ("right", 1, -18.0)):
        ks = rng.uniform(0.88, 1.12)
        c = np.array([sgn * 70, -44, zc]) + nrm(0, 4, 3)
        # upper pole medial and posterior, hilum facing antero-medially
        r = _rot(10 + nrm(0, 4), -sgn * (12 + nrm(0, 4)), -sgn * (30 + nrm(0, 6)))
        semi = np.array([28, 22, 55]) * ks  # u: width (lateral), v: thickness (AP), w: length
        sl, (u, v, w) = _ellipsoid(grid, c, semi, r)
        if sl is None:
            continue
        u = u * sgn  # +u lateral on both sides
        r2 = u * u + v * v + w * w
        kidney = r2 <= 1
        sinus = ((u + 0.85) / 0.5) ** 2 + (v / 0.5) ** 2 + (w / 0.42) ** 2 <= 1
        value = np.where(r2 > 0.62, 182.0 + nrm(0, 6), np.where(f_v1[sl] > -0.2, 118.0, 172.0))
        value = value + 4.0 * f_fine[sl]
        _paint(hu, owner, sl, organ(sl, kidney & ~sinus & cavity[sl]), f"kidney_{side}", value)
        pelvis = ((u + 0.7) / 0.3) ** 2 + (v / 0.25) ** 2 + (w / 0.2) ** 2 <= 1
        _paint(hu, owner, sl, organ(sl, sinus & kidney & cavity[sl]), "_sinus", np.where(pelvis, 12.0, -80.0))

    # -- gallbladder (bile, thin wall), carved into the liver
    gb = rng.uniform(0.7, 1.2)
    sl, (u, v, w) = _ellipsoid(grid, np.array([42, 52, 5]) + nrm(0, 5, 3), np.array([16, 18, 40]) * gb,
                               _rot(35 + nrm(0, 8), 0, 15 + nrm(0, 8)))
    if sl is not None:
        r2 = u * u + v * v + w * w
        _paint(hu, owner, sl, organ(sl, (r2 <= 1) & cavity[sl]), "gallbladder",
               np.where(r2 > 0.85, 45.0, 10.0 + 3.0 * f_org[sl]))

    # -- urinary bladder (fill varies)
    bl = rng.uniform(0.65, 1.3)
    sl, (u, v, w) = _ellipsoid(grid, np.array([0, 35, -200 + 12 * (bl - 1)]) + nrm(0, 4, 3),
                               np.array([40, 32, 30]) * bl, _rot(nrm(0, 5), 0, nrm(0, 5)))
    if sl is not None:
        r2 = u * u + v * v + w * w
        _paint(hu, owner, sl, (r2 <= 1) & cavity[sl], "urinary_bladder", np.where(r2 > 0.85, 40.0, 8.0))

    # -- aorta, IVC and iliac vessels
    bif = -95.0 + nrm(0, 8)
    ao = np.array([(-26, -30, 330), (-24, -32, 200), (-20, -22, 120), (-14, -12, 40), (-10, -8, -40),
                   (-8, -8, bif)], float) + nrm(0, 2, (6, 3))
    sl, d = _tube(grid, ao, np.array([12.5, 12.5, 12, 11, 10.5, 10]) * rng.uniform(0.9, 1.15))
    _paint(hu, owner, sl, d <= 1 if d is not None else None, "aorta", 172.0 + nrm(0, 8) + 3.0 * f_org[sl])
    cf = bif - 10
    ivc = np.array([(22, -10, cf), (24, -12, -20), (28, -8, 60), (22, 5, 115), (15, 15, 150)], float)
    sl, d = _tube(grid, ivc + nrm(0, 2, ivc.shape), np.array([10, 12, 13, 14, 15]) * rng.uniform(0.9, 1.1))
    _paint(hu, owner, sl, d <= 1 if d is not None else None, "inferior_vena_cava", 142.0 + nrm(0, 8))
    for side, sgn in (("left", -1), ("right", 1)):
        art = np.array([(-8, -8, bif), (sgn * 45, 0, -150), (sgn * 70, 25, -210), (sgn * 85, 45, -260),
                        (sgn * 90, 50, -300)], float)
        sl, d = _tube(grid, art + nrm(0, 2, art.shape), 6.5)
        _paint(hu, owner, sl, d <= 1 if d is not None else None, f"iliac_artery_{side}", 172.0)
        ven = np.array([(22, -10, cf), (sgn * 40, -14, -150), (sgn * 64, 10, -210), (sgn * 78, 33, -260),
                        (sgn * 84, 38, -300)], float)
        sl, d = _tube(grid, ven + nrm(0, 2, ven.shape), 8.0)
        _paint(hu, owner, sl, d <= 1 if d is not None else None, f"iliac_vena_{side}", 140.0)

    # -- spine: discs, vertebrae (body, arch, processes), canal
    heights = {"L": (26.0, 9.0), "T": (22.0, 6.0)}
    centers, z = {}, 0.0 + nrm(0, 5)  # z = L1/L2 disc
    for name in ("L2", "L3", "L4", "L5"):
        h, dsk = heights["L"]
        z -= dsk / 2 + h / 2 if name == "L2" else dsk + h
        centers[name] = (z, h)
    z = centers["L2"][0] + centers["L2"][1] / 2 + heights["L"][1]
    for name in ("L1", "T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4", "T3"):
        h, dsk = heights[name[0]]
        h = h if name[0] == "L" or int(name[1:]) >= 10 else h - 3
        centers[name] = (z + h / 2, h)
        z += h + dsk
    fine_bone = 55.0 * f_fine
    for name, (zc, h) in centers.items():
        lumbar = name[0] == "L"
        ax, ay = (24.0, 17.0) if lumbar else (19.0, 15.0)
        yc = float(spine_y(zc))
        lab = f"vertebrae_{name}"
        sl = grid.box((-50, yc - ay - 60, zc - h / 2 - 12), (50, yc + ay + 2, zc + h / 2 + 6))
        if sl is None:
            continue
        x, y, z = grid.coords(sl)
        q = (x / ax) ** 2 + ((y - yc) / ay) ** 2
        dz = np.abs(z - zc)
        body = (q <= 1) & (dz <= h / 2)
        cortex = (q > 0.8) | (dz > h / 2 - 1.5)
        value = np.where(cortex, 620.0, 240.0 + fine_bone[sl])
        yk = yc - ay - 10.0  # canal centre
        rk = np.hypot(x, y - yk)
        arch = (rk >= 8) & (rk <= 14) & (y <= yc - ay + 3) & (dz <= h / 2 - 1)
        spinous = (np.abs(x) <= 4) & (y < yk - 8) & (y > yk - (38 if lumbar else 30)) & (z < zc + h / 2 - 4) & (
            z > zc - h / 2 - 10)
        transverse = (np.abs(x) >= 10) & (np.abs(x) <= (38 if lumbar else 30)) & (np.abs(y - yk - 2) <= 3.5) & (
            dz <= 4)
        post = (arch | spinous | transverse) & ~body
        value = np.where(post, np.where(f_fine[sl] > 0.0, 700.0, 400.0), value)
        _paint(hu, owner, sl, body | post, lab, value)
        # disc below this vertebra
        sl2 = grid.box((-30, yc - 25, zc - h / 2 - 12), (30, yc + 25, zc - h / 2))
        if sl2 is not None:
            x, y, z = grid.coords(sl2)
            dsk = ((x / ax) ** 2 + ((y - yc) / ay) ** 2 <= 1) & (z < zc - h / 2) & (z > zc - h / 2 - 10)
            dsk &= owner[sl2] != _ID[lab]
            _paint(hu, owner, sl2, dsk & (owner[sl2] < _ID["spleen"]), "_disc", 90.0)
    zs = np.linspace(-150, 330, 12)
    canal = np.stack([np.zeros(12), spine_y(zs) - np.where(zs > 55, 25, 27), zs], 1)
    sl, d = _tube(grid, canal, 8.0)
    _paint(hu, owner, sl, d <= 1 if d is not None else None, "_canal", 28.0)

    # -- sacrum: wedge tilting backwards
    zl5 = centers["L5"][0] - centers["L5"][1] / 2 - 9
    zz = np.array([zl5, zl5 - 40, zl5 - 90, zl5 - 135])
    yy = np.array([spine_y(zl5) - 2, -65, -88, -92])
    ax_s = np.array([52, 40, 22, 10])
    ay_s = np.array([18, 15, 11, 8])
    sl = grid.box((-60, -110, zz[-1]), (60, -20, zz[0]))
    if sl is not None:
        x, y, z = grid.coords(sl)
        order = np.argsort(zz)
        yi = np.interp(z, zz[order], yy[order])
        axi = np.interp(z, zz[order], ax_s[order])
        ayi = np.interp(z, zz[order], ay_s[order])
        q = (x / axi) ** 2 + ((y - yi) / ayi) ** 2
        inside = (q <= 1) & (z <= zz[0]) & (z >= zz[-1])
        _paint(hu, owner, sl, inside, "sacrum", np.where(q > 0.75, 600.0, 230.0 + fine_bone[sl]))

    # -- ribs 5-12, descending anteriorly around the inner body wall
    phi_end = {3: 3.0, 4: 3.0, 5: 2.9, 6: 2.8, 7: 2.6, 8: 2.4, 9: 2.2, 10: 1.95, 11: 1.55, 12: 1.05}
    for side, sgn in (("left", -1), ("right", 1)):
        for k in _RIBS:
            zc = centers[f"T{k}"][0] + nrm(0, 3)
            phi = np.linspace(0.38, phi_end[k] + nrm(0, 0.08), 12)
            frac = (phi - phi[0]) / (math.pi - phi[0])
            zp = zc + 6 - (75 + 6 * (12 - min(k, 10))) * frac ** 1.25 * rng.uniform(0.85, 1.15)
            hz = 1.0 / (1.0 + np.exp((zp + 150.0) / 25.0))
            ar = a_c * (1 + 0.1 * hz) + muscle * 0.55
            br = np.where(np.cos(phi) > 0, b_cp, b_ca) + muscle * 0.55
            px = sgn * ar * np.abs(np.sin(phi)) ** (2 / 2.3)
            py = -br * np.sign(np.cos(phi)) * np.abs(np.cos(phi)) ** (2 / 2.3)
            sl, d = _tube(grid, np.stack([px, py, zp], 1), 5.5)
            if sl is None:
                continue
            _paint(hu, owner, sl, d <= 1, f"rib_{side}_{k}", np.where(d > 0.6, 780.0, 260.0 + fine_bone[sl]))

    # -- pelvis: iliac wings, acetabulum, pubis, ischium; femora
    for side, sgn in (("left", -1), ("right", 1)):
        sl = grid.box((min(sgn * 140, sgn * 10), -110, -280), (max(sgn * 140, sgn * 10), 90, crest))
        hip_hu = None
        if sl is not None:
            x, y, z = grid.coords(sl)
            t = np.clip((crest - z) / 90.0, 0, 1)
            cxw, cyw = sgn * (25 + 30 * t), -10 + 10 * t
            aw, bw = 100 - 45 * t, 72 - 35 * t
            rr = np.hypot((x - cxw) / aw, (y - cyw) / bw)
            ang = np.arctan2(sgn * (x - cxw), -(y - cyw))  # 0 posterior, pi/2 lateral
            wing = (np.abs(rr - 1) * bw < 4.5) & (ang > 0.15) & (ang < 2.1 - 0.8 * t) & (z <= crest) & (
                z >= crest - 95) & (sgn * x > 20)
            hip_hu = np.where(np.abs(rr - 1) * bw > 2.8, 650.0, 250.0 + fine_bone[sl])
            _paint(hu, owner, sl, wing, f"hip_{side}", hip_hu)
        fh = np.array([sgn * 85, 10, crest - 110]) + nrm(0, 3, 3)
        sl, (u, v, w) = _ellipsoid(grid, fh, (36, 36, 36))
        if sl is not None:
            x, y, z = grid.coords(sl)
            r = np.sqrt(u * u + v * v + w * w) * 36
            cup = (r >= 26) & (r <= 35) & ((x - fh[0]) * sgn < 8) & (z - fh[2] > -18)
            _paint(hu, owner, sl, cup, f"hip_{side}", np.where(r > 32, 650.0, 260.0 + fine_bone[sl]))
        for pts, rad in (
            ([(sgn * 95, 0, crest - 75), (sgn * 88, 6, crest - 95)], 16.0),
            ([(sgn * 75, 32, fh[2] - 10), (sgn * 40, 58, fh[2] - 17), (sgn * 6, 66, fh[2] - 24)], 9.0),
            ([(sgn * 82, -15, fh[2] - 15), (sgn * 70, -35, fh[2] - 50)], 12.0),
        ):
            sl, d = _tube(grid, np.array(pts, float), rad)
            if sl is not None:
                _paint(hu, owner, sl, d <= 1, f"hip_{side}", np.where(d > 0.7, 650.0, 260.0 + fine_bone[sl]))
        for pts, rad in (
            ([fh, fh], 23.0),
            ([fh, fh + (sgn * 30, -10, -25)], 14.0),
            ([fh + (sgn * 30, -10, -25), fh + (sgn * 40, -12, -30)], 18.0),
            ([fh + (sgn * 35, -10, -30), fh + (sgn * 26, 5, -200)], 14.0),
        ):
            sl, d = _tube(grid, np.array(pts, float), rad)
            if sl is not None:
                marrow = np.where(d > 0.6, 1100.0, np.where(f_fine[sl] > 0, 280.0, 60.0))
                _paint(hu, owner, sl, d <= 1, f"femur_{side}", marrow)
    return hu, owner, affine, grid, rng


def _finish(hu: np.ndarray, spacing, rng: np.random.Generator) -> np.ndarray:
    """Blur (point spread + partial volume) and add correlated noise; return int16 HU."""
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
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def generate_case(seed: int, shape=(128, 128, 128), spacing=(1.5, 1.5, 2.5)):
    """Generate one phantom CT with organ labels.

    Args:
        seed: any integer; the same seed, shape and spacing give the same case.
        shape: voxels along the stored array axes (X, Y, Z).
        spacing: voxel size in mm (in-plane x, y; slice z).

    Returns:
        ``(ct, labels, affine)``: ``ct`` int16 HU [X, Y, Z] in the stored (LPS-like) voxel order; ``labels`` maps
        each name of :data:`PHANTOM_STRUCTURES` to a bool [X, Y, Z] mask (possibly empty when outside the field of
        view); ``affine`` [4, 4] voxel-to-RAS-mm matrix ``diag(-sx, -sy, sz)`` plus a scanner-like origin.
    """
    hu, owner, affine, _, rng = _render(seed, shape, spacing)
    ct = _finish(hu, spacing, rng)
    labels = {name: owner == _ID[name] for name in PHANTOM_STRUCTURES}
    return ct, labels, affine


def _write_case(args) -> Path:
    out_dir, case_id, seed, shape, spacing = args
    final = Path(out_dir) / case_id
    if (final / "ct.nii.gz").is_file() and (final / "segmentations").is_dir():
        return final
    hu, owner, affine, _, rng = _render(seed, shape, spacing)
    ct = _finish(hu, spacing, rng)

    def fill(tmp: Path) -> None:
        save_nifti(tmp / "ct.nii.gz", ct, affine)
        for name in PHANTOM_STRUCTURES:
            save_nifti(tmp / "segmentations" / f"{name}.nii.gz", (owner == _ID[name]).astype(np.uint8), affine)

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
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [f"s{i:04d}" for i in range(n_cases)]
    jobs = [(str(out), cid, _case_seed(seed, i), tuple(shape), tuple(spacing)) for i, cid in enumerate(ids)]
    workers = min(os.cpu_count() or 1, n_cases) if workers is None else workers
    bar = tqdm(total=n_cases, desc="phantom", unit="case", disable=not progress)
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
    rng = np.random.default_rng([seed, 1])
    rows = []
    for cid, split in zip(ids, _splits(n_cases, seed), strict=True):
        rows.append({"image_id": cid, "age": int(rng.integers(4, 18)), "gender": "mf"[int(rng.integers(0, 2))],
                     "institute": "phantom", "study_type": "ct abdomen", "split": split,
                     "manufacturer": "anatomask-lab", "scanner_model": "procedural phantom", "kvp": 120,
                     "pathology": "no_pathology", "pathology_location": ""})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["image_id", "split"], delimiter=";",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "meta.csv", lambda p: p.write_text(buf.getvalue()))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Figures: slices with and without label overlay, written as PNG without any imaging library.

def _palette(n: int) -> np.ndarray:
    """``n`` distinct saturated colours (golden-ratio hue steps), float32 [n, 3] in 0..255."""
    h = (np.arange(n) * 0.618034) % 1.0
    k = (np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6.0) % 6.0
    return (255.0 * (1.0 - 0.75 * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))).astype(np.float32)


def write_png(path, rgb: np.ndarray) -> Path:
    """Write an 8-bit RGB (or grey) image [H, W(, 3)] as PNG using zlib only."""
    img = np.asarray(rgb, dtype=np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    h, w, c = img.shape
    color = {1: 0, 3: 2}[c]
    rows = img.reshape(h, w * c).astype(np.int16)
    sub = np.concatenate([rows[:, :c], np.diff(rows, axis=1)[:, c - 1:] if c == 1 else rows[:, c:] - rows[:, :-c]],
                         axis=1)
    raw = np.concatenate([np.ones((h, 1), np.uint8), (sub & 0xFF).astype(np.uint8)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    return atomic_write(path, lambda p: p.write_bytes(png))


def _resample_rows(img: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Stretch rows so that pixels are square (nearest neighbour)."""
    n = max(1, int(round(img.shape[0] * row_mm / col_mm)))
    idx = np.minimum((np.arange(n) * col_mm / row_mm).astype(int), img.shape[0] - 1)
    return img[idx]


def phantom_figure(ct: np.ndarray, labels: dict[str, np.ndarray], affine: np.ndarray, *, window=(-160, 240),
                   axial_structures=("spleen", "kidney_right", "vertebrae_L4", "urinary_bladder"),
                   zoom: int = 1) -> np.ndarray:
    """Montage of a case: axial slices through the given structures' centres, one coronal and one sagittal slice.

    Left: axial CT in an abdominal window (W 400 / L 40) above the same slices with labels (filled at 45 % opacity,
    outlined); right: coronal and sagittal CT, each followed by its labelled copy. Slices are shown as radiologists
    do: patient's right on the image left, anterior up (axial) or left (sagittal), head up.

    Args:
        ct: HU [X, Y, Z] in any orientation described by ``affine``.
        labels: name -> bool mask, same grid.
        affine: voxel-to-RAS matrix.
        window: display range in HU.
        axial_structures: one axial slice through the centre of each (the middle slice when absent).
        zoom: integer pixel replication.

    Returns:
        uint8 RGB image [H, W, 3].
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)

    def canon(a):
        return nib.orientations.apply_orientation(a, ornt)

    vol = canon(np.asarray(ct, dtype=np.float32))
    names = [n for n in labels if labels[n].any()]
    lab = np.zeros(vol.shape, np.int16)
    for i, n in enumerate(names):
        lab[canon(labels[n])] = i + 1
    sp = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))[np.argsort(ornt[:, 0])]
    pal = _palette(max(len(names), 1))
    lo, hi = window
    gray = np.clip((vol - lo) / (hi - lo), 0, 1)

    def tiles(g2, l2, row_mm, col_mm):
        g2 = _resample_rows(g2, row_mm, col_mm)
        l2 = _resample_rows(l2, row_mm, col_mm)
        rgb = np.repeat(g2[..., None] * 255.0, 3, axis=2)
        over = rgb.copy()
        m = l2 > 0
        over[m] = 0.55 * over[m] + 0.45 * pal[l2[m] - 1]
        edge = m & (ndimage.grey_dilation(l2, size=3) != ndimage.grey_erosion(l2, size=3))
        over[edge] = pal[l2[edge] - 1]
        return rgb, over

    def centre(name, axis, default):
        m = labels.get(name)
        return int(round(np.nonzero(canon(m))[axis].mean())) if m is not None and m.any() else default

    def hstack(ts, gap=4):
        h = max(t.shape[0] for t in ts)
        return np.concatenate([np.pad(t, ((0, h - t.shape[0]), (0, gap), (0, 0))) for t in ts], axis=1)

    axial = []
    for s in axial_structures:
        k = centre(s, 2, vol.shape[2] // 2)
        # rows: anterior at top (y descending); columns: patient's right at left (x descending)
        axial.append(tiles(gray[::-1, ::-1, k].T, lab[::-1, ::-1, k].T, sp[1], sp[0]))
    j = centre("aorta", 1, vol.shape[1] // 2)
    i = centre("kidney_right", 0, vol.shape[0] // 2)
    cor = tiles(gray[::-1, j, ::-1].T, lab[::-1, j, ::-1].T, sp[2], sp[0])
    sag = tiles(gray[i, ::-1, ::-1].T, lab[i, ::-1, ::-1].T, sp[2], sp[1])  # anterior on the left
    ct_row = hstack([a[0] for a in axial])
    left = np.concatenate([ct_row, np.zeros((4, ct_row.shape[1], 3)), hstack([a[1] for a in axial])], axis=0)
    out = hstack([left, cor[0], cor[1], sag[0], sag[1]], gap=6)[:, :-6].astype(np.uint8)
    return np.repeat(np.repeat(out, zoom, axis=0), zoom, axis=1)


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
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 128), metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.5), metavar=("SX", "SY", "SZ"))
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--png", default=None, help="also write a figure of the first case to this PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_cli)
