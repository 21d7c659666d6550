"""Geometry for the CT phantom: the warped voxel grid and the shapes painters draw with.

The phantom is drawn in template coordinates (adult abdomen, millimetres, RAS axes). :class:`Grid` maps every voxel
to its (warped) template position; :func:`ellipsoid`, :func:`tube` and :func:`superellipse` give normalised
coordinates or distances whose ``<= 1`` region is the shape, over the smallest voxel box that can hold it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Grid", "ellipsoid", "noise", "rotation", "superellipse", "tube"]

Box = tuple[slice, slice, slice]


@dataclass(frozen=True, eq=False)
class Grid:
    """Voxel grid and its map to template coordinates.

    Attributes:
        tx: template x (mm, +right) of every voxel, float32 [X, Y, Z]; ``ty`` (+anterior) and ``tz`` (+superior)
            likewise.
        origin: world position (mm) of voxel (0, 0, 0), [3].
        step: signed spacing per axis (diagonal affine), [3].
        center: world position of the template origin, [3].
        scale: world mm per template mm, per axis, [3].
        warp_max: largest template displacement the warp can add (mm); boxes are widened by it.
        shape: (X, Y, Z) voxels.
    """

    tx: np.ndarray
    ty: np.ndarray
    tz: np.ndarray
    origin: np.ndarray
    step: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    warp_max: float
    shape: tuple[int, int, int]

    def box(self, lo, hi) -> Box | None:
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

    def coords(self, sl: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Template (x, y, z) over the voxel box ``sl``, each float32 [x, y, z] of the box."""
        return self.tx[sl], self.ty[sl], self.tz[sl]


def rotation(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` [3, 3] for angles in degrees."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def noise(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    """Smooth Gaussian random field with unit standard deviation and correlation length ``sigma_vox`` voxels.

    Small scales filter white noise; large scales interpolate a coarse random grid with separable Gaussian
    weights (three small matrix products instead of a wide convolution).

    Args:
        rng: random source (one ``standard_normal`` draw).
        shape: (X, Y, Z) voxels.
        sigma_vox: correlation length per axis, in voxels (scalar or [3]).

    Returns:
        float32 [X, Y, Z], zero mean, unit standard deviation.
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


def ellipsoid(grid: Grid, center, semi, rot=None):
    """Normalised local coordinates of an ellipsoid over its bounding box.

    Args:
        grid: the voxel grid.
        center: template centre (mm), [3].
        semi: semi-axes (mm) along the local axes, [3].
        rot: rotation [3, 3] from local to template axes (identity when None).

    Returns:
        ``(slices, (u, v, w))``: the voxel box and the local coordinates over it (each float [x, y, z] of the box;
        inside is ``u² + v² + w² <= 1``), or ``(None, (None, None, None))`` when outside the field of view.
    """
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


def tube(grid: Grid, points, radii):
    """Normalised distance to a chain of capsules (radius interpolated along each segment).

    Args:
        grid: the voxel grid.
        points: template points (mm) along the chain, [N, 3].
        radii: radius (mm) at each point, scalar or [N].

    Returns:
        ``(slices, dist)``: the chain's voxel box and float32 [x, y, z] of the box (inside is ``dist <= 1``,
        ``inf`` where no segment is near), or ``(None, None)`` when outside the field of view.
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


def superellipse(x, y, a, b_ant, b_post, p=2.3):
    """Normalised superellipse radius in the axial plane (inside is ``<= 1``).

    Args:
        x: template x (mm), any shape.
        y: template y (mm), broadcastable with ``x``.
        a: half-width (mm).
        b_ant: half-depth anteriorly (``y > 0``), mm.
        b_post: half-depth posteriorly, mm.
        p: exponent (2 is an ellipse; larger is boxier).

    Returns:
        Array of the broadcast shape of the inputs.
    """
    b = np.where(y > 0, b_ant, b_post)
    return (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)
