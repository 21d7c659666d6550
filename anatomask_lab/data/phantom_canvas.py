"""The canvas the phantom painters share: label table, placed and warped grid, texture fields, body frame.

:func:`make_canvas` makes every random draw that comes before painting, in a fixed order (scanner position, trunk
proportions, field-of-view fit, warp, texture fields, then the body landmarks), and returns a :class:`Canvas`: the
arrays the painters write (``hu``, ``owner``) next to everything they read. Painters then draw the rest of their
random numbers from ``canvas.rng`` in the order :func:`anatomask_lab.data.phantom._render` calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anatomask_lab.data.phantom_shapes import Box, Grid, noise, superellipse

__all__ = [
    "FULL",
    "OWNER_ID",
    "PHANTOM_STRUCTURES",
    "RIBS",
    "SIDES",
    "Body",
    "Canvas",
    "Textures",
    "Trunk",
    "inside",
    "make_canvas",
    "spine_y",
]

VERTEBRAE = ("T3", "T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")
RIBS = tuple(range(3, 13))
SIDES = (("left", -1), ("right", 1))  # name, sign of template x (+x is the patient's right)

#: Labelled structures written to ``segmentations/`` (TotalSegmentator names, present in both v1 and v2).
PHANTOM_STRUCTURES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "aorta",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "urinary_bladder", "colon",
    "lung_lower_lobe_left", "lung_upper_lobe_left", "lung_lower_lobe_right", "lung_middle_lobe_right",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right",
    "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right",
    *(f"vertebrae_{v}" for v in VERTEBRAE), "sacrum",
    *(f"rib_left_{k}" for k in RIBS), *(f"rib_right_{k}" for k in RIBS),
    "hip_left", "hip_right", "femur_left", "femur_right",
)

# unlabelled tissues (owner ids 1..), then the labelled structures
TISSUES = ("_subcut_fat", "_muscle", "_fat", "_bowel", "_diaphragm", "_heart", "_vessel", "_disc", "_canal",
           "_sinus", "_stomach_air")
OWNERS = ("air", *TISSUES, *PHANTOM_STRUCTURES)
#: Owner id (value in ``Canvas.owner``) of every tissue and structure name.
OWNER_ID = {name: i for i, name in enumerate(OWNERS)}

#: Slices selecting the whole volume.
FULL: Box = (slice(None),) * 3


@dataclass(frozen=True)
class Trunk:
    """Template trunk proportions in mm: the abdominal cavity, then muscle and fat outwards.

    Attributes:
        half_width: cavity half-width.
        depth_ant: cavity half-depth anteriorly.
        depth_post: cavity half-depth posteriorly.
        fat: subcutaneous fat thickness scale (varies most between people).
        muscle: body-wall muscle thickness.
    """

    half_width: float
    depth_ant: float
    depth_post: float
    fat: float
    muscle: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Trunk:
        """Random adult proportions (five draws from ``rng``)."""
        half_width = 118.0 * rng.uniform(0.95, 1.05)
        depth_ant, depth_post = 82.0 * rng.uniform(0.93, 1.07), 80.0 * rng.uniform(0.95, 1.05)
        fat = rng.uniform(8, 30)
        muscle = rng.uniform(8, 13)
        return cls(half_width, depth_ant, depth_post, fat, muscle)

    def cavity_axes(self, tz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cavity half-width, anterior and posterior half-depth at template heights ``tz`` (wider at the hips).

        Args:
            tz: template z (mm), [X, Y, Z].

        Returns:
            Three [X, Y, Z] arrays (mm), of ``tz``'s float type.
        """
        hips = 1.0 / (1.0 + np.exp((tz + 150.0) / 25.0))
        a_z = self.half_width * (1.0 + 0.10 * hips)
        return a_z, self.depth_ant * (1.0 + 0.04 * hips), self.depth_post * (1.0 + 0.04 * hips)


@dataclass(frozen=True, eq=False)
class Body:
    """Trunk proportions, random landmarks (template mm) and the body regions they define (bool [X, Y, Z]).

    Attributes:
        trunk: the trunk proportions.
        crest: height of the iliac crests.
        floor: height of the pelvic floor (below it the trunk splits into the thighs).
        dome_right: height of the right diaphragm dome; ``dome_left`` likewise.
        skin: inside the skin (the whole body, thighs included).
        fascia: inside the subcutaneous fat (body-wall muscle and what it holds).
        cavity: inside the abdominal and thoracic cavity.
        below: cavity under the diaphragm (abdomen and pelvis).
        above: cavity over the diaphragm (thorax).
    """

    trunk: Trunk
    crest: float
    floor: float
    dome_right: float
    dome_left: float
    skin: np.ndarray
    fascia: np.ndarray
    cavity: np.ndarray
    below: np.ndarray
    above: np.ndarray


@dataclass(frozen=True, eq=False)
class Textures:
    """Smooth random fields (unit standard deviation, float32 [X, Y, Z]) that give tissues their texture.

    Attributes:
        organ: organ heterogeneity (22 mm correlation).
        v1: first vessel field (9 mm); ``v2`` the second.
        loop: bowel loops (13 mm).
        fine: fine grain (2.5 mm).
        vessels: ``v1² + v2²``, small near curves where both vessel fields cross zero.
        bone: trabecular texture in HU (``55 * fine``).
    """

    organ: np.ndarray
    v1: np.ndarray
    v2: np.ndarray
    loop: np.ndarray
    fine: np.ndarray
    vessels: np.ndarray
    bone: np.ndarray


@dataclass(frozen=True, eq=False)
class Canvas:
    """What every painter reads and writes.

    Attributes:
        grid: voxel grid with template coordinates.
        rng: the case's random source; painters draw from it in a fixed order.
        tex: texture fields.
        body: trunk proportions, landmarks and body regions.
        hu: painted Hounsfield units, float32 [X, Y, Z] (written in place).
        owner: owner id per voxel (see :data:`OWNER_ID`), uint8 [X, Y, Z] (written in place).
        affine: voxel-to-RAS-mm matrix [4, 4].
    """

    grid: Grid
    rng: np.random.Generator
    tex: Textures
    body: Body
    hu: np.ndarray
    owner: np.ndarray
    affine: np.ndarray

    def paint(self, sl: Box | None, mask, name: str, value) -> None:
        """Give ``name`` the voxels of box ``sl`` where ``mask``, with HU ``value`` (scalar or box-shaped array).

        Args:
            sl: voxel box (nothing is painted when None).
            mask: bool array over the box, or None (nothing painted).
            name: tissue or structure name (a key of :data:`OWNER_ID`).
            value: HU, a scalar or an array over the box.
        """
        if sl is None or mask is None or not mask.any():
            return
        h = self.hu[sl]
        h[mask] = value[mask] if np.ndim(value) else value
        self.owner[sl][mask] = OWNER_ID[name]

    def abdominal(self, sl: Box, mask):
        """``mask`` (over box ``sl``) restricted to the cavity under the diaphragm; None stays None."""
        return mask & self.body.below[sl] if mask is not None else None


def inside(dist):
    """``dist <= 1`` (inside a :func:`~anatomask_lab.data.phantom_shapes.tube`), or None when ``dist`` is None."""
    return dist <= 1 if dist is not None else None


def spine_y(z):
    """Template y (mm) of the vertebral bodies' centre at heights ``z`` (lumbar lordosis, thoracic kyphosis)."""
    return -42.0 + 8.0 * np.exp(-(((z + 60.0) / 80.0) ** 2)) - 6.0 / (1.0 + np.exp(-(z - 120.0) / 40.0))


def _place(rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray):
    """Place the scanner and the warped template body in it.

    Args:
        rng: the case's random source.
        shape: (X, Y, Z) voxels.
        spacing: mm per voxel, float [3].

    Returns:
        ``(grid, affine, trunk, (tx, ty, tz))``. Voxels are LPS-ordered as DICOM converters write them (affine
        ``diag(-sx, -sy, sz)``) with a scanner-like origin; the trunk is scaled to fill the field of view.
        ``tx, ty, tz`` are the warped template coordinates in float64 [X, Y, Z] (the grid keeps float32 copies);
        the body outline is computed from them.
    """
    nrm = rng.normal
    step = np.array([-spacing[0], -spacing[1], spacing[2]])
    fov = spacing * (np.array(shape) - 1)
    world_center = np.array([nrm(0, 3), nrm(-20, 8), rng.uniform(-700, -400)])
    origin = world_center - step * (np.array(shape) - 1) / 2
    affine = np.diag([*step, 1.0])
    affine[:3, 3] = origin
    trunk = Trunk.draw(rng)
    half_w = trunk.half_width * 1.1 + trunk.muscle + 0.8 * trunk.fat
    half_d = max(trunk.depth_ant * 1.04 + trunk.muscle + 1.2 * trunk.fat,
                 trunk.depth_post * 1.04 + trunk.muscle + 0.7 * trunk.fat)
    s_xy = 0.9 * min(fov[0] / 2 / half_w, fov[1] / 2 / half_d) * rng.uniform(0.92, 1.0)
    scale = np.array([s_xy, s_xy, min(fov[2] / 460.0, 1.1 * s_xy)])
    t_center = np.array([nrm(0, 4), nrm(0, 4), -45 + rng.uniform(-25, 25)])  # template point at FOV centre
    center = world_center - scale * t_center

    # template coordinates per voxel, with a smooth random warp (template mm)
    warp_amp = 7.0
    idx = [np.arange(n, dtype=np.float32) for n in shape]
    base = [((origin[a] + step[a] * idx[a]) - center[a]) / scale[a] for a in range(3)]
    wsig = 60.0 * (scale / spacing)
    tx = base[0][:, None, None] + warp_amp * noise(rng, shape, wsig)
    ty = base[1][None, :, None] + warp_amp * noise(rng, shape, wsig)
    tz = base[2][None, None, :] + warp_amp * noise(rng, shape, wsig)
    grid = Grid(tx.astype(np.float32), ty.astype(np.float32), tz.astype(np.float32), origin, step, center, scale,
                warp_amp * 4.5, shape)
    return grid, affine, trunk, (tx, ty, tz)


def _textures(rng: np.random.Generator, shape: tuple[int, int, int], vox_per_mm: np.ndarray) -> Textures:
    """Draw the five texture fields (correlation lengths in template mm, ``vox_per_mm`` [3] converts)."""
    organ = noise(rng, shape, 22.0 * vox_per_mm)
    v1 = noise(rng, shape, 9.0 * vox_per_mm)
    v2 = noise(rng, shape, 9.0 * vox_per_mm)
    loop = noise(rng, shape, 13.0 * vox_per_mm)
    fine = noise(rng, shape, np.maximum(2.5 * vox_per_mm, 0.6))
    return Textures(organ, v1, v2, loop, fine, vessels=v1 ** 2 + v2 ** 2, bone=55.0 * fine)


def _outlines(trunk: Trunk, floor: float, tx, ty, tz):
    """Skin, deep fascia and cavity masks (bool [X, Y, Z]) from float64 template coordinates [X, Y, Z]."""
    muscle, fat = trunk.muscle, trunk.fat
    a_z, ba_z, bp_z = trunk.cavity_axes(tz)
    legs = np.clip((floor + 10.0 - tz) / 50.0, 0.0, 1.0)
    a_b = a_z + muscle + 0.8 * fat
    xl = np.abs(tx) - 0.53 * a_b * legs  # distance from the thigh axis
    shrink = 1.0 - 0.56 * legs
    skin = superellipse(xl, ty, a_b * shrink, (ba_z + muscle + 1.2 * fat) * (1 - 0.12 * legs),
                        (bp_z + muscle + 0.7 * fat) * (1 - 0.12 * legs)) <= 1
    fascia = superellipse(xl, ty, (a_z + muscle) * shrink - 0.8 * fat * legs, (ba_z + muscle) * (1 - 0.12 * legs),
                          (bp_z + muscle) * (1 - 0.12 * legs)) <= 1
    cavity = (superellipse(tx, ty, a_z, ba_z, bp_z, p=2.6) <= 1) & (tz > floor)
    return skin, fascia, cavity


def _body(rng: np.random.Generator, coords, trunk: Trunk) -> Body:
    """Draw the landmarks (iliac crest, diaphragm domes) and derive the body regions.

    Args:
        rng: the case's random source (three draws).
        coords: warped template coordinates ``(tx, ty, tz)``, float64 [X, Y, Z] each.
        trunk: the trunk proportions.
    """
    nrm = rng.normal
    tx, ty, tz = coords
    crest = -105.0 + nrm(0, 6)  # iliac crest
    floor = crest - 150.0  # pelvic floor; below it the trunk splits into the thighs
    zr, zl = 135 + nrm(0, 8), 122 + nrm(0, 8)
    skin, fascia, cavity = _outlines(trunk, floor, tx, ty, tz)
    # diaphragm: two domes, lower posteriorly and laterally
    dome = np.maximum(zr - 0.0094 * (tx - 60) ** 2 - 0.0068 * (ty - 10) ** 2,
                      zl - 0.0094 * (tx + 60) ** 2 - 0.0068 * (ty - 10) ** 2)
    dome = np.maximum(dome, 40.0)
    below = cavity & (tz < dome - 2.5)
    above = cavity & (tz > dome + 2.5)
    return Body(trunk, crest, floor, zr, zl, skin, fascia, cavity, below, above)


def make_canvas(seed: int, shape, spacing) -> Canvas:
    """A blank canvas (air everywhere) for case ``seed``.

    Args:
        seed: any non-negative integer.
        shape: (X, Y, Z) voxels.
        spacing: mm per voxel (x, y, z).

    Returns:
        The canvas; ``hu`` is -1000 and ``owner`` 0 (air) everywhere.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in shape)
    spacing = np.asarray(spacing, float)
    grid, affine, trunk, coords = _place(rng, shape, spacing)
    tex = _textures(rng, shape, grid.scale / spacing)
    body = _body(rng, coords, trunk)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    owner = np.zeros(shape, dtype=np.uint8)
    return Canvas(grid, rng, tex, body, hu, owner, affine)
