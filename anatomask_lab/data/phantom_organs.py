"""Soft-tissue painters of the CT phantom: body wall, bowel, muscles, thorax, abdominal organs and vessels.

Each painter takes the shared :class:`~anatomask_lab.data.phantom_canvas.Canvas`, draws its random numbers from
``canvas.rng`` and paints over what earlier painters left (later painters win). Hounsfield units are typical of the
portal-venous phase. The order in which :data:`ORGAN_PAINTERS` run fixes both the overlaps and the random draws,
so it is part of what a seed means.
"""

from __future__ import annotations

import numpy as np

from anatomask_lab.data.phantom_canvas import FULL, OWNER_ID, SIDES, Canvas, inside, spine_y
from anatomask_lab.data.phantom_shapes import ellipsoid, rotation, tube

__all__ = ["ORGAN_PAINTERS"]



def paint_body_wall(cv: Canvas) -> None:
    """Subcutaneous fat, body-wall muscle, fat filling the cavity, and the diaphragm between the domes."""
    t, body = cv.tex, cv.body
    cv.paint(FULL, body.skin, "_subcut_fat", -104.0 + 2.0 * t.organ)
    cv.paint(FULL, body.fascia, "_muscle", 52.0 + 4.0 * t.fine)
    cv.paint(FULL, body.cavity, "_fat", -94.0 + 2.5 * t.organ)
    cv.paint(FULL, body.cavity & ~body.below & ~body.above, "_diaphragm", 55.0)


def paint_colon(cv: Canvas) -> None:
    """Colon from caecum to rectum: enhancing wall, faeces with gas pockets."""
    nrm, t = cv.rng.normal, cv.tex
    colon_pts = np.array([
        (75, 10, -130), (90, -10, -60), (95, 10, 20), (50, 68, 15), (0, 78, 5), (-60, 62, 35), (-95, 5, 60),
        (-100, -15, -20), (-95, -5, -110), (-50, 20, -170), (-10, -20, -200), (0, -52, -230), (0, -52, -290),
    ], float) + nrm(0, 6, size=(13, 3))
    colon_r = np.array([24, 21, 19, 19, 17, 19, 19, 17, 17, 16, 16, 18, 14]) * cv.rng.uniform(0.85, 1.15)
    sl, d = tube(cv.grid, colon_pts, colon_r)
    if sl is None:
        return
    colon = (d <= 1) & cv.body.cavity[sl]
    gas = t.loop[sl] + 0.5 * t.fine[sl] > cv.rng.uniform(0.5, 1.2)
    content = np.where(gas, -960.0 + 10 * t.fine[sl], -250.0 + 160.0 * np.clip(t.fine[sl], -1.5, 1.5))
    content = np.where(d > 0.86, 48.0, content)  # wall
    cv.paint(sl, colon, "colon", content)


def paint_small_bowel(cv: Canvas) -> None:
    """Small-bowel loops in the free abdominal fat: fluid, enhancing wall at the loop edge, gas pockets."""
    t = cv.tex
    sl = cv.grid.box((-110, -40, -200), (110, 110, 15))
    if sl is None:
        return
    x, y, z = cv.grid.coords(sl)
    free = (cv.owner[sl] == OWNER_ID["_fat"]) & cv.body.below[sl] & (y > -35 + 0.3 * np.abs(x))
    loops = np.abs(t.loop[sl]) < 0.55
    content = 38.0 + 14.0 * t.fine[sl]
    content = np.where(np.abs(t.loop[sl]) > 0.42, 62.0, content)  # enhancing wall at the loop edge
    content = np.where(t.v1[sl] > 1.6, -930.0, content)  # gas pockets
    cv.paint(sl, free & loops, "_bowel", content)


def paint_trunk_muscles(cv: Canvas) -> None:
    """Paraspinal (autochthon) and iliopsoas muscles, left then right."""
    nrm, fine = cv.rng.normal, cv.tex.fine
    for side, sgn in SIDES:
        zs = np.linspace(-170, 330, 9)
        pts = np.stack([np.full(9, sgn * 30.0), spine_y(zs) - 40.0, zs], 1) + nrm(0, 2, (9, 3))
        rad = 20.0 + 4.0 * np.exp(-(((zs + 60) / 90) ** 2))
        sl, d = tube(cv.grid, pts, rad)
        cv.paint(sl, inside(d), f"autochthon_{side}", 50.0 + 5.0 * fine[sl])
        pts = np.array([(30, -36, 45), (43, -30, -40), (52, -22, -110), (68, 5, -185), (78, 25, -240),
                        (80, 30, -290)], float)
        pts[:, 0] *= sgn
        pts += nrm(0, 3, pts.shape)
        rad = np.array([5, 17, 24, 22, 17, 15]) * cv.rng.uniform(0.85, 1.15)
        sl, d = tube(cv.grid, pts, rad)
        cv.paint(sl, inside(d), f"iliopsoas_{side}", 54.0 + 5.0 * fine[sl])


def paint_thorax(cv: Canvas) -> None:
    """Heart over the diaphragm, and the lung bases around it (lobes split by an oblique fissure)."""
    nrm, t, body = cv.rng.normal, cv.tex, cv.body
    hc = np.array([-30, 28, 0.5 * (body.dome_right + body.dome_left) + 30]) + nrm(0, 5, 3)
    semi = np.array([78, 55, 52]) * cv.rng.uniform(0.9, 1.1)
    sl, (u, v, w) = ellipsoid(cv.grid, hc, semi, rotation(0, -20, 30))
    if sl is not None:
        r2 = u * u + v * v + w * w
        heart = (r2 <= 1) & body.above[sl]
        cv.paint(sl, heart, "_heart", np.where(r2 > 0.72, 105.0, 150.0 + 6 * t.organ[sl]))
    fissure = nrm(0, 5)
    sl = cv.grid.box((-250, -250, 30), (250, 250, 600))
    if sl is None:
        return
    x, y, z = cv.grid.coords(sl)
    lung = body.above[sl] & (cv.owner[sl] != OWNER_ID["_heart"]) & (np.abs(x) > 14)
    lung_hu = -865.0 + 22.0 * t.organ[sl] + np.where(t.vessels[sl] < 0.02, 880.0, 0.0) + 12.0 * t.fine[sl]
    lower = y < 60.0 - 1.1 * (z - 110.0) + fissure
    cv.paint(sl, lung & (x < 0) & lower, "lung_lower_lobe_left", lung_hu)
    cv.paint(sl, lung & (x < 0) & ~lower, "lung_upper_lobe_left", lung_hu)
    cv.paint(sl, lung & (x > 0) & lower, "lung_lower_lobe_right", lung_hu)
    cv.paint(sl, lung & (x > 0) & ~lower, "lung_middle_lobe_right", lung_hu)


def paint_liver(cv: Canvas) -> None:
    """Liver: a large right lobe and a left lobe under the domes, oblique inferior border; vessels and cysts."""
    nrm, rng, t = cv.rng.normal, cv.rng, cv.tex
    liv = rng.uniform(0.88, 1.12)
    c_r = np.array([58, -2, 62]) + nrm(0, 6, 3)
    c_l = np.array([-25, 40, 98]) + nrm(0, 6, 3)
    sl = cv.grid.box(np.minimum(c_r - 120 * liv, c_l - 80 * liv), np.maximum(c_r + 120 * liv, c_l + 80 * liv))
    if sl is None:
        return
    x, y, z = cv.grid.coords(sl)
    rr, rl = rotation(nrm(0, 5), 10 + nrm(0, 5), nrm(0, 5)), rotation(0, 0, -20 + nrm(0, 6))
    liver = np.zeros(x.shape, bool)
    for c, s, r in ((c_r, np.array([92, 98, 110]) * liv, rr), (c_l, np.array([68, 42, 40]) * liv, rl)):
        d = np.stack([x - c[0], y - c[1], z - c[2]], -1) @ r
        liver |= ((d / s) ** 2).sum(-1) <= 1
    z_inf = c_r[2] - 100 * liv + 0.55 * (c_r[0] + 85 - x) + 0.25 * np.abs(y - 20)
    liver &= z > z_inf
    value = 108.0 + nrm(0, 4) + 7.0 * t.organ[sl] + 6.0 * t.v2[sl] + 4.0 * t.fine[sl]
    value = np.where(t.vessels[sl] < 0.06, 165.0, value)  # portal and hepatic veins
    for _ in range(rng.integers(0, 3)):  # cysts
        cc = c_r + nrm(0, 30, 3)
        rc = rng.uniform(5, 12)
        value = np.where((x - cc[0]) ** 2 + (y - cc[1]) ** 2 + (z - cc[2]) ** 2 < rc * rc, 8.0, value)
    cv.paint(sl, cv.abdominal(sl, liver & cv.body.cavity[sl]), "liver", value)


def paint_spleen(cv: Canvas) -> None:
    """Spleen: an ellipsoid with a notch at the hilum (a crescent)."""
    nrm, t = cv.rng.normal, cv.tex
    sp = cv.rng.uniform(0.8, 1.2)
    c = np.array([-82, -36, 62]) + nrm(0, 5, 3)
    r = rotation(-30 + nrm(0, 8), 0, 225 + nrm(0, 10))
    sl, (u, v, w) = ellipsoid(cv.grid, c, np.array([22, 40, 58]) * sp, r)
    if sl is None:
        return
    x, y, z = cv.grid.coords(sl)
    hil = c - r @ np.array([30 * sp, 0, 0])
    d = np.stack([x - hil[0], y - hil[1], z - hil[2]], -1) @ r
    notch = ((d / (np.array([20, 28, 40]) * sp)) ** 2).sum(-1) <= 1
    mask = (u * u + v * v + w * w <= 1) & ~notch & cv.body.cavity[sl]
    cv.paint(sl, cv.abdominal(sl, mask), "spleen",
             114.0 + nrm(0, 4) + 6.0 * t.organ[sl] + 9.0 * t.v1[sl] + 4.0 * t.fine[sl])


def paint_stomach(cv: Canvas) -> None:
    """Stomach: fundus/body and antrum, a 4.5 mm wall, air-fluid level (supine: air anterior)."""
    nrm, fine = cv.rng.normal, cv.tex.fine
    st = cv.rng.uniform(0.85, 1.15)
    parts = (
        (np.array([-62, 28, 82]) + nrm(0, 6, 3), np.array([40, 38, 62]) * st,
         rotation(0, -25 + nrm(0, 6), nrm(0, 6))),
        (np.array([-5, 55, 35]) + nrm(0, 6, 3), np.array([45, 20, 22]) * st, rotation(0, 0, 15 + nrm(0, 8))),
    )
    sl = cv.grid.box(np.min([p[0] - p[1].max() for p in parts], 0), np.max([p[0] + p[1].max() for p in parts], 0))
    if sl is None:
        return
    x, y, z = cv.grid.coords(sl)
    outer = np.zeros(x.shape, bool)
    inner = np.zeros(x.shape, bool)
    for c, s, r in parts:
        d = ((np.stack([x - c[0], y - c[1], z - c[2]], -1) @ r) / s) ** 2
        outer |= d.sum(-1) <= 1
        inner |= (d * (s / np.maximum(s - 4.5, 1)) ** 2).sum(-1) <= 1
    level = parts[0][0][1] + cv.rng.uniform(-10, 35)
    lumen = np.where(y > level, -985.0, 18.0 + 22.0 * np.clip(fine[sl], -1, 2))
    value = np.where(inner, lumen, 62.0)
    cv.paint(sl, cv.abdominal(sl, outer & cv.body.cavity[sl]), "stomach", value)


def paint_visceral_vessels(cv: Canvas) -> None:
    """Vessels feeding the organs (unlabelled) and the portal / splenic vein (labelled)."""
    nrm = cv.rng.normal
    for pts, rad, hval in (
        ([(-50, -30, 5), (-15, 8, 8), (22, -8, 5)], 5.0, 150.0),  # left renal vein
        ([(50, -32, -12), (24, -12, -10)], 5.0, 150.0),  # right renal vein
        ([(-12, 0, 25), (-8, 22, 5), (-5, 30, -90)], 4.0, 172.0),  # superior mesenteric artery
        ([(5, 12, 18), (8, 32, -90)], 5.0, 150.0),  # superior mesenteric vein
    ):
        sl, d = tube(cv.grid, np.array(pts, float) + nrm(0, 2, (len(pts), 3)), rad)
        cv.paint(sl, cv.abdominal(sl, d <= 1) if d is not None else None, "_vessel", hval)
    pv = np.array([(-88, -28, 42), (-45, -5, 25), (-5, 8, 18), (15, 12, 25), (40, 10, 58), (55, 5, 75)], float)
    sl, d = tube(cv.grid, pv + nrm(0, 3, pv.shape), np.array([5, 6, 6, 7, 7, 5]) * cv.rng.uniform(0.85, 1.15))
    cv.paint(sl, cv.abdominal(sl, d <= 1) if d is not None else None, "portal_vein_and_splenic_vein",
             155.0 + nrm(0, 5))


def paint_pancreas(cv: Canvas) -> None:
    """Pancreas from head to tail, lobulated (fat between the lobules)."""
    nrm, t = cv.rng.normal, cv.tex
    pa = np.array([(35, -5, -22), (40, 5, -8), (20, 16, 2), (0, 20, 8), (-30, 12, 15), (-60, -8, 25),
                   (-88, -30, 38)], float) + nrm(0, 4, (7, 3))
    sl, d = tube(cv.grid, pa, np.array([10, 15, 12, 10, 10, 11, 9]) * cv.rng.uniform(0.85, 1.15))
    if sl is None:
        return
    value = np.where(t.fine[sl] > 0.8, -45.0, 100.0 + nrm(0, 5) + 6.0 * t.organ[sl] + 8.0 * t.v1[sl])
    cv.paint(sl, cv.abdominal(sl, (d <= 1) & cv.body.cavity[sl]), "pancreas", value)


def paint_kidneys(cv: Canvas) -> None:
    """Kidneys: cortex, medulla with pyramids, sinus fat and pelvis at the medial hilum; left then right."""
    nrm, t = cv.rng.normal, cv.tex
    for side, sgn, zc in (("left", -1, 2.0), ("right", 1, -18.0)):
        ks = cv.rng.uniform(0.88, 1.12)
        c = np.array([sgn * 70, -44, zc]) + nrm(0, 4, 3)
        # upper pole medial and posterior, hilum facing antero-medially
        r = rotation(10 + nrm(0, 4), -sgn * (12 + nrm(0, 4)), -sgn * (30 + nrm(0, 6)))
        semi = np.array([28, 22, 55]) * ks  # u: width (lateral), v: thickness (AP), w: length
        sl, (u, v, w) = ellipsoid(cv.grid, c, semi, r)
        if sl is None:
            continue
        u = u * sgn  # +u lateral on both sides
        r2 = u * u + v * v + w * w
        kidney = r2 <= 1
        sinus = ((u + 0.85) / 0.5) ** 2 + (v / 0.5) ** 2 + (w / 0.42) ** 2 <= 1
        value = np.where(r2 > 0.62, 182.0 + nrm(0, 6), np.where(t.v1[sl] > -0.2, 118.0, 172.0))
        value = value + 4.0 * t.fine[sl]
        cavity = cv.body.cavity[sl]
        cv.paint(sl, cv.abdominal(sl, kidney & ~sinus & cavity), f"kidney_{side}", value)
        pelvis = ((u + 0.7) / 0.3) ** 2 + (v / 0.25) ** 2 + (w / 0.2) ** 2 <= 1
        cv.paint(sl, cv.abdominal(sl, sinus & kidney & cavity), "_sinus", np.where(pelvis, 12.0, -80.0))


def paint_gallbladder(cv: Canvas) -> None:
    """Gallbladder (bile, thin wall), carved into the liver."""
    nrm = cv.rng.normal
    gb = cv.rng.uniform(0.7, 1.2)
    sl, (u, v, w) = ellipsoid(cv.grid, np.array([42, 52, 5]) + nrm(0, 5, 3), np.array([16, 18, 40]) * gb,
                              rotation(35 + nrm(0, 8), 0, 15 + nrm(0, 8)))
    if sl is None:
        return
    r2 = u * u + v * v + w * w
    cv.paint(sl, cv.abdominal(sl, (r2 <= 1) & cv.body.cavity[sl]), "gallbladder",
             np.where(r2 > 0.85, 45.0, 10.0 + 3.0 * cv.tex.organ[sl]))


def paint_bladder(cv: Canvas) -> None:
    """Urinary bladder (its fill, hence size and height, varies)."""
    nrm = cv.rng.normal
    bl = cv.rng.uniform(0.65, 1.3)
    sl, (u, v, w) = ellipsoid(cv.grid, np.array([0, 35, -200 + 12 * (bl - 1)]) + nrm(0, 4, 3),
                              np.array([40, 32, 30]) * bl, rotation(nrm(0, 5), 0, nrm(0, 5)))
    if sl is None:
        return
    r2 = u * u + v * v + w * w
    cv.paint(sl, (r2 <= 1) & cv.body.cavity[sl], "urinary_bladder", np.where(r2 > 0.85, 40.0, 8.0))


def paint_great_vessels(cv: Canvas) -> None:
    """Aorta, inferior vena cava, and the iliac arteries and veins below the bifurcation."""
    nrm, rng = cv.rng.normal, cv.rng
    bif = -95.0 + nrm(0, 8)
    ao = np.array([(-26, -30, 330), (-24, -32, 200), (-20, -22, 120), (-14, -12, 40), (-10, -8, -40),
                   (-8, -8, bif)], float) + nrm(0, 2, (6, 3))
    sl, d = tube(cv.grid, ao, np.array([12.5, 12.5, 12, 11, 10.5, 10]) * rng.uniform(0.9, 1.15))
    cv.paint(sl, inside(d), "aorta", 172.0 + nrm(0, 8) + 3.0 * cv.tex.organ[sl])
    cf = bif - 10
    ivc = np.array([(22, -10, cf), (24, -12, -20), (28, -8, 60), (22, 5, 115), (15, 15, 150)], float)
    sl, d = tube(cv.grid, ivc + nrm(0, 2, ivc.shape), np.array([10, 12, 13, 14, 15]) * rng.uniform(0.9, 1.1))
    cv.paint(sl, inside(d), "inferior_vena_cava", 142.0 + nrm(0, 8))
    for side, sgn in SIDES:
        art = np.array([(-8, -8, bif), (sgn * 45, 0, -150), (sgn * 70, 25, -210), (sgn * 85, 45, -260),
                        (sgn * 90, 50, -300)], float)
        sl, d = tube(cv.grid, art + nrm(0, 2, art.shape), 6.5)
        cv.paint(sl, inside(d), f"iliac_artery_{side}", 172.0)
        ven = np.array([(22, -10, cf), (sgn * 40, -14, -150), (sgn * 64, 10, -210), (sgn * 78, 33, -260),
                        (sgn * 84, 38, -300)], float)
        sl, d = tube(cv.grid, ven + nrm(0, 2, ven.shape), 8.0)
        cv.paint(sl, inside(d), f"iliac_vena_{side}", 140.0)


#: The soft-tissue painters in painting (and random-draw) order.
ORGAN_PAINTERS = (
    paint_body_wall, paint_colon, paint_small_bowel, paint_trunk_muscles, paint_thorax, paint_liver, paint_spleen,
    paint_stomach, paint_visceral_vessels, paint_pancreas, paint_kidneys, paint_gallbladder, paint_bladder,
    paint_great_vessels,
)
