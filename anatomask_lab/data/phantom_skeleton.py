"""Bone painters of the CT phantom: vertebrae T3-L5 with discs and canal, sacrum, ribs, hip bones and femora.

Bone has a dense cortex around trabecular texture (``canvas.tex.bone``). The vertebral levels are drawn once by
:func:`vertebra_levels`; the sacrum and the ribs hang from them.
"""

from __future__ import annotations

import math

import numpy as np

from anatomask_lab.data.phantom_canvas import OWNER_ID, RIBS, SIDES, Canvas, inside, spine_y
from anatomask_lab.data.phantom_shapes import ellipsoid, tube

__all__ = ["paint_pelvis", "paint_ribs", "paint_sacrum", "paint_spine", "vertebra_levels"]

#: Vertebral body and disc heights (mm) of the lumbar and thoracic spine.
HEIGHTS = {"L": (26.0, 9.0), "T": (22.0, 6.0)}
#: Angle (radians from posterior) where each rib ends anteriorly.
RIB_END = {3: 3.0, 4: 3.0, 5: 2.9, 6: 2.8, 7: 2.6, 8: 2.4, 9: 2.2, 10: 1.95, 11: 1.55, 12: 1.05}

Levels = dict[str, tuple[float, float]]


def vertebra_levels(cv: Canvas) -> Levels:
    """Template height of each vertebral body, stacked from the L1/L2 disc (one random draw).

    Returns:
        Vertebra name (``"L2"``, ``"T11"``, ...) -> ``(z centre, body height)`` in mm, L2-L5 first, then L1 up to T3.
    """
    centers, z = {}, 0.0 + cv.rng.normal(0, 5)  # z = L1/L2 disc
    for name in ("L2", "L3", "L4", "L5"):
        h, dsk = HEIGHTS["L"]
        z -= dsk / 2 + h / 2 if name == "L2" else dsk + h
        centers[name] = (z, h)
    z = centers["L2"][0] + centers["L2"][1] / 2 + HEIGHTS["L"][1]
    for name in ("L1", "T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4", "T3"):
        h, dsk = HEIGHTS[name[0]]
        h = h if name[0] == "L" or int(name[1:]) >= 10 else h - 3
        centers[name] = (z + h / 2, h)
        z += h + dsk
    return centers


def _paint_vertebra(cv: Canvas, name: str, zc: float, h: float) -> None:
    """One vertebra (body, arch, spinous and transverse processes) and the disc below it."""
    fine = cv.tex.fine
    lumbar = name[0] == "L"
    ax, ay = (24.0, 17.0) if lumbar else (19.0, 15.0)
    yc = float(spine_y(zc))
    lab = f"vertebrae_{name}"
    sl = cv.grid.box((-50, yc - ay - 60, zc - h / 2 - 12), (50, yc + ay + 2, zc + h / 2 + 6))
    if sl is None:
        return
    x, y, z = cv.grid.coords(sl)
    q = (x / ax) ** 2 + ((y - yc) / ay) ** 2
    dz = np.abs(z - zc)
    body = (q <= 1) & (dz <= h / 2)
    cortex = (q > 0.8) | (dz > h / 2 - 1.5)
    value = np.where(cortex, 620.0, 240.0 + cv.tex.bone[sl])
    yk = yc - ay - 10.0  # canal centre
    rk = np.hypot(x, y - yk)
    arch = (rk >= 8) & (rk <= 14) & (y <= yc - ay + 3) & (dz <= h / 2 - 1)
    spinous = (np.abs(x) <= 4) & (y < yk - 8) & (y > yk - (38 if lumbar else 30)) & (z < zc + h / 2 - 4) & (
        z > zc - h / 2 - 10)
    transverse = (np.abs(x) >= 10) & (np.abs(x) <= (38 if lumbar else 30)) & (np.abs(y - yk - 2) <= 3.5) & (
        dz <= 4)
    post = (arch | spinous | transverse) & ~body
    value = np.where(post, np.where(fine[sl] > 0.0, 700.0, 400.0), value)
    cv.paint(sl, body | post, lab, value)
    # disc below this vertebra
    sl2 = cv.grid.box((-30, yc - 25, zc - h / 2 - 12), (30, yc + 25, zc - h / 2))
    if sl2 is not None:
        x, y, z = cv.grid.coords(sl2)
        dsk = ((x / ax) ** 2 + ((y - yc) / ay) ** 2 <= 1) & (z < zc - h / 2) & (z > zc - h / 2 - 10)
        dsk &= cv.owner[sl2] != OWNER_ID[lab]
        cv.paint(sl2, dsk & (cv.owner[sl2] < OWNER_ID["spleen"]), "_disc", 90.0)


def paint_spine(cv: Canvas, levels: Levels) -> None:
    """Vertebrae with the discs below them (only over soft tissue), then the spinal canal."""
    for name, (zc, h) in levels.items():
        _paint_vertebra(cv, name, zc, h)
    zs = np.linspace(-150, 330, 12)
    canal = np.stack([np.zeros(12), spine_y(zs) - np.where(zs > 55, 25, 27), zs], 1)
    sl, d = tube(cv.grid, canal, 8.0)
    cv.paint(sl, inside(d), "_canal", 28.0)


def paint_sacrum(cv: Canvas, levels: Levels) -> None:
    """Sacrum: a wedge under L5 tilting backwards, narrowing towards the coccyx."""
    zl5 = levels["L5"][0] - levels["L5"][1] / 2 - 9
    zz = np.array([zl5, zl5 - 40, zl5 - 90, zl5 - 135])
    yy = np.array([spine_y(zl5) - 2, -65, -88, -92])
    ax_s = np.array([52, 40, 22, 10])
    ay_s = np.array([18, 15, 11, 8])
    sl = cv.grid.box((-60, -110, zz[-1]), (60, -20, zz[0]))
    if sl is None:
        return
    x, y, z = cv.grid.coords(sl)
    order = np.argsort(zz)
    yi = np.interp(z, zz[order], yy[order])
    axi = np.interp(z, zz[order], ax_s[order])
    ayi = np.interp(z, zz[order], ay_s[order])
    q = (x / axi) ** 2 + ((y - yi) / ayi) ** 2
    sacrum = (q <= 1) & (z <= zz[0]) & (z >= zz[-1])
    cv.paint(sl, sacrum, "sacrum", np.where(q > 0.75, 600.0, 230.0 + cv.tex.bone[sl]))


def paint_ribs(cv: Canvas, levels: Levels) -> None:
    """Ribs 3-12 from their thoracic vertebra, descending anteriorly around the inner body wall."""
    nrm, trunk = cv.rng.normal, cv.body.trunk
    for side, sgn in SIDES:
        for k in RIBS:
            zc = levels[f"T{k}"][0] + nrm(0, 3)
            phi = np.linspace(0.38, RIB_END[k] + nrm(0, 0.08), 12)
            frac = (phi - phi[0]) / (math.pi - phi[0])
            zp = zc + 6 - (75 + 6 * (12 - min(k, 10))) * frac ** 1.25 * cv.rng.uniform(0.85, 1.15)
            hz = 1.0 / (1.0 + np.exp((zp + 150.0) / 25.0))
            ar = trunk.half_width * (1 + 0.1 * hz) + trunk.muscle * 0.55
            br = np.where(np.cos(phi) > 0, trunk.depth_post, trunk.depth_ant) + trunk.muscle * 0.55
            px = sgn * ar * np.abs(np.sin(phi)) ** (2 / 2.3)
            py = -br * np.sign(np.cos(phi)) * np.abs(np.cos(phi)) ** (2 / 2.3)
            sl, d = tube(cv.grid, np.stack([px, py, zp], 1), 5.5)
            if sl is None:
                continue
            cv.paint(sl, d <= 1, f"rib_{side}_{k}", np.where(d > 0.6, 780.0, 260.0 + cv.tex.bone[sl]))


def _paint_hip_bone(cv: Canvas, side: str, sgn: int) -> np.ndarray:
    """One hip bone (iliac wing, acetabular cup, pubis, ischium); returns the femoral head centre (mm, [3])."""
    bone, crest = cv.tex.bone, cv.body.crest
    sl = cv.grid.box((min(sgn * 140, sgn * 10), -110, -280), (max(sgn * 140, sgn * 10), 90, crest))
    if sl is not None:
        x, y, z = cv.grid.coords(sl)
        t = np.clip((crest - z) / 90.0, 0, 1)
        cxw, cyw = sgn * (25 + 30 * t), -10 + 10 * t
        aw, bw = 100 - 45 * t, 72 - 35 * t
        rr = np.hypot((x - cxw) / aw, (y - cyw) / bw)
        ang = np.arctan2(sgn * (x - cxw), -(y - cyw))  # 0 posterior, pi/2 lateral
        wing = (np.abs(rr - 1) * bw < 4.5) & (ang > 0.15) & (ang < 2.1 - 0.8 * t) & (z <= crest) & (
            z >= crest - 95) & (sgn * x > 20)
        cv.paint(sl, wing, f"hip_{side}", np.where(np.abs(rr - 1) * bw > 2.8, 650.0, 250.0 + bone[sl]))
    fh = np.array([sgn * 85, 10, crest - 110]) + cv.rng.normal(0, 3, 3)
    sl, (u, v, w) = ellipsoid(cv.grid, fh, (36, 36, 36))
    if sl is not None:
        x, y, z = cv.grid.coords(sl)
        r = np.sqrt(u * u + v * v + w * w) * 36
        cup = (r >= 26) & (r <= 35) & ((x - fh[0]) * sgn < 8) & (z - fh[2] > -18)
        cv.paint(sl, cup, f"hip_{side}", np.where(r > 32, 650.0, 260.0 + bone[sl]))
    for pts, rad in (
        ([(sgn * 95, 0, crest - 75), (sgn * 88, 6, crest - 95)], 16.0),
        ([(sgn * 75, 32, fh[2] - 10), (sgn * 40, 58, fh[2] - 17), (sgn * 6, 66, fh[2] - 24)], 9.0),
        ([(sgn * 82, -15, fh[2] - 15), (sgn * 70, -35, fh[2] - 50)], 12.0),
    ):
        sl, d = tube(cv.grid, np.array(pts, float), rad)
        if sl is not None:
            cv.paint(sl, d <= 1, f"hip_{side}", np.where(d > 0.7, 650.0, 260.0 + bone[sl]))
    return fh


def _paint_femur(cv: Canvas, side: str, sgn: int, fh: np.ndarray) -> None:
    """Femoral head at ``fh`` (template mm, [3]), neck, greater trochanter and shaft (fatty marrow)."""
    for pts, rad in (
        ([fh, fh], 23.0),
        ([fh, fh + (sgn * 30, -10, -25)], 14.0),
        ([fh + (sgn * 30, -10, -25), fh + (sgn * 40, -12, -30)], 18.0),
        ([fh + (sgn * 35, -10, -30), fh + (sgn * 26, 5, -200)], 14.0),
    ):
        sl, d = tube(cv.grid, np.array(pts, float), rad)
        if sl is not None:
            marrow = np.where(d > 0.6, 1100.0, np.where(cv.tex.fine[sl] > 0, 280.0, 60.0))
            cv.paint(sl, d <= 1, f"femur_{side}", marrow)


def paint_pelvis(cv: Canvas) -> None:
    """Hip bones (iliac wings, acetabulum, pubis, ischium) and femora, left then right."""
    for side, sgn in SIDES:
        fh = _paint_hip_bone(cv, side, sgn)
        _paint_femur(cv, side, sgn, fh)
