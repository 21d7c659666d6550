"""The procedural CT phantom: determinism, anatomy, Hounsfield units, texture, the written layout, the figure."""

import argparse
import csv
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from anatomask_lab.data import phantom, phantom_organs, phantom_png
from anatomask_lab.data.phantom import PHANTOM_CLASSES, PHANTOM_STRUCTURES, generate_case, generate_cohort
from anatomask_lab.data.phantom_canvas import FULL, OWNER_ID, make_canvas
from anatomask_lab.data.phantom_shapes import Grid, ellipsoid, tube
from anatomask_lab.data.prepare.totalsegmentator import V1_STRUCTURES, V2_STRUCTURES

ROOT = Path(__file__).resolve().parents[1]
SHAPE, SPACING = (64, 64, 48), (3.0, 3.0, 5.0)  # the default field of view at a quarter of the voxels


@pytest.fixture(scope="module")
def case():
    return generate_case(3, SHAPE, SPACING)


def test_same_seed_same_case_other_seed_other_case(case):
    ct, labels, affine = case
    ct2, labels2, affine2 = generate_case(3, SHAPE, SPACING)
    np.testing.assert_array_equal(ct, ct2)
    np.testing.assert_array_equal(affine, affine2)
    assert all(np.array_equal(labels[k], labels2[k]) for k in labels)
    ct3, labels3, _ = generate_case(4, SHAPE, SPACING)
    assert not np.array_equal(ct, ct3)
    assert labels["liver"].sum() != labels3["liver"].sum()


def test_case_format_and_geometry(case):
    ct, labels, affine = case
    assert ct.shape == SHAPE and ct.dtype == np.int16
    assert set(labels) == set(PHANTOM_STRUCTURES)
    assert all(m.shape == SHAPE and m.dtype == bool for m in labels.values())
    np.testing.assert_allclose(np.diag(affine)[:3], [-3.0, -3.0, 5.0])  # LPS-ordered voxels, as DICOM converters
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    stacked = np.stack(list(labels.values())).sum(0)
    assert stacked.max() == 1  # structures do not overlap


def test_structures_map_into_both_totalsegmentator_tables():
    assert set(PHANTOM_STRUCTURES) <= set(V1_STRUCTURES)
    assert set(PHANTOM_STRUCTURES) <= set(V2_STRUCTURES)
    assert len(PHANTOM_CLASSES) == 15


def test_organs_present_with_plausible_sizes(case):
    _, labels, _ = case
    voxel_ml = np.prod(SPACING) / 1000.0
    vol = {k: v.sum() * voxel_ml for k, v in labels.items()}
    for organ in ("liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach", "aorta",
                  "inferior_vena_cava", "urinary_bladder", "lung_lower_lobe_left", "lung_lower_lobe_right",
                  "vertebrae_L1", "vertebrae_L3", "rib_right_10", "gallbladder"):
        assert vol[organ] > 0, organ
    assert vol["liver"] > 3 * vol["spleen"]
    assert vol["liver"] > vol["kidney_left"] + vol["kidney_right"]
    # liver on the patient's right, spleen on the left (world x = right)
    def world_x(mask):
        return (affine_apply(case[2], np.argwhere(mask).mean(0)))[0]
    assert world_x(labels["liver"]) > world_x(labels["spleen"])
    assert world_x(labels["kidney_right"]) > world_x(labels["kidney_left"])


def affine_apply(affine, ijk):
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _median(ct, mask, erode=1):
    m = ndimage.binary_erosion(mask, iterations=erode) if erode else mask
    if m.sum() < 5:
        m = mask
    return float(np.median(ct[m]))


def test_hounsfield_units_match_the_reference_table():
    ct, labels, _ = generate_case(3, (96, 96, 64), (2.0, 2.0, 3.75))
    expect = {
        "liver": (95, 130), "spleen": (95, 135), "aorta": (130, 200), "inferior_vena_cava": (110, 180),
        "urinary_bladder": (-10, 35), "gallbladder": (-10, 45), "pancreas": (60, 120),
        "lung_lower_lobe_right": (-950, -700), "vertebrae_L2": (150, 700), "kidney_left": (110, 200),
    }
    for name, (lo, hi) in expect.items():
        assert lo <= _median(ct, labels[name]) <= hi, (name, _median(ct, labels[name]))
    assert abs(np.median(ct[:4, :4, :]) + 1000) < 30  # air in the corners


def test_texture_makes_organs_harder_than_fat():
    """Organs carry internal structure (vessels, cortex/medulla, trabeculae); fat is smooth; noise is everywhere."""
    hu, owner, _, _, rng = phantom._render(3, SHAPE, SPACING)  # painted HU, before blur and noise

    def spread(name):
        return float(hu[ndimage.binary_erosion(owner == OWNER_ID[name])].std())

    fat = max(spread("_subcut_fat"), spread("_fat"))
    assert fat < 5
    for organ in ("liver", "spleen", "kidney_left", "lung_lower_lobe_right", "vertebrae_L2"):
        assert spread(organ) > 2.5 * fat, organ
    ct = phantom._finish(hu, SPACING, rng).astype(np.float32)
    corner = ct[:4, :4, :]
    assert 5 < corner.std() < 25  # CT-like noise (HU), also in air
    assert abs(corner.mean() + 1000) < 5


def test_cohort_layout_determinism_and_resume(tmp_path):
    paths = generate_cohort(tmp_path, 3, seed=5, shape=(40, 40, 24), spacing=(4.8, 4.8, 10.0), workers=2,
                            progress=False)
    assert [p.name for p in paths] == ["s0000", "s0001", "s0002"]
    img = nib.load(paths[0] / "ct.nii.gz")
    assert img.shape == (40, 40, 24) and img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.header.get_zooms(), (4.8, 4.8, 10.0))
    segs = sorted(p.name[:-7] for p in (paths[0] / "segmentations").glob("*.nii.gz"))
    assert segs == sorted(PHANTOM_STRUCTURES)
    ct, labels, affine = generate_case(phantom._case_seed(5, 0), (40, 40, 24), (4.8, 4.8, 10.0))
    np.testing.assert_array_equal(np.asarray(img.dataobj), ct)
    np.testing.assert_allclose(img.affine, affine)
    liver = nib.load(paths[0] / "segmentations" / "liver.nii.gz")
    assert liver.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(liver.dataobj) > 0, labels["liver"])
    rows = list(csv.DictReader((tmp_path / "meta.csv").read_text().splitlines(), delimiter=";"))
    assert [r["image_id"] for r in rows] == ["s0000", "s0001", "s0002"]
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    stamp = (paths[1] / "ct.nii.gz").stat().st_mtime_ns
    generate_cohort(tmp_path, 3, seed=5, shape=(40, 40, 24), spacing=(4.8, 4.8, 10.0), workers=0, progress=False)
    assert (paths[1] / "ct.nii.gz").stat().st_mtime_ns == stamp  # finished cases are skipped
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_phantom_cli(tmp_path):
    parser = argparse.ArgumentParser()
    phantom.add_cli(parser.add_subparsers())
    args = parser.parse_args(["phantom", "--out", str(tmp_path / "c"), "--cases", "1", "--shape", "32", "32",
                              "24", "--spacing", "6", "6", "10", "--workers", "0", "--no-progress",
                              "--png", str(tmp_path / "f.png")])
    assert args.func(args) == 0
    assert (tmp_path / "c" / "s0000" / "ct.nii.gz").is_file()
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _read_png(path):
    data = Path(path).read_bytes()
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, _, color, *_ = header
    c = {0: 1, 2: 3}[color]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * c)
    assert (raw[:, 0] == 1).all()  # Sub filter
    rows = raw[:, 1:].astype(np.int64)
    for i in range(c, w * c):
        rows[:, i] = (rows[:, i] + rows[:, i - c]) % 256
    return rows.reshape(h, w, c).astype(np.uint8)


def test_png_writer_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    phantom.write_png(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(_read_png(tmp_path / "a.png"), rgb)
    gray = rgb[..., 0]
    phantom.write_png(tmp_path / "g.png", gray)
    np.testing.assert_array_equal(_read_png(tmp_path / "g.png")[..., 0], gray)


def test_figure_code_lives_in_phantom_png_and_stays_importable_from_phantom(tmp_path):
    assert phantom.write_png is phantom_png.write_png and phantom.phantom_figure is phantom_png.phantom_figure
    img = np.zeros((3, 5, 3), np.uint8)
    img[1, 2] = (255, 0, 128)
    out = phantom_png.write_png(tmp_path / "sub" / "p.png", img)  # folder created
    assert out == tmp_path / "sub" / "p.png"
    np.testing.assert_array_equal(_read_png(out), img)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_figure_shape(case):
    ct, labels, affine = case
    fig = phantom.phantom_figure(ct, labels, affine)
    assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[2] == 3
    assert fig[: fig.shape[0] // 2].max() > 200  # bright bone in the CT row


def test_docs_figure_is_committed_and_small():
    png = ROOT / "docs" / "phantom.png"
    assert png.is_file()
    assert png.stat().st_size < 300_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _unwarped_grid(n=41):
    """Template mm == world mm == voxel index - n // 2 on every axis (no warp)."""
    c = np.arange(n, dtype=np.float32) - n // 2
    tx, ty, tz = np.meshgrid(c, c, c, indexing="ij")
    return Grid(tx, ty, tz, origin=np.full(3, -(n // 2), float), step=np.ones(3), center=np.zeros(3),
                scale=np.ones(3), warp_max=0.0, shape=(n, n, n))


def test_shapes_enclose_the_expected_volumes():
    grid = _unwarped_grid()
    sl, (u, v, w) = ellipsoid(grid, (0, 0, 0), (12, 8, 5))
    assert abs((u * u + v * v + w * w <= 1).sum() / (4 / 3 * np.pi * 12 * 8 * 5) - 1) < 0.05
    sl, d = tube(grid, [(0, 0, -10), (0, 0, 10)], 5.0)  # capsule: cylinder plus two half balls
    assert abs((d <= 1).sum() / (np.pi * 25 * 20 + 4 / 3 * np.pi * 125) - 1) < 0.05
    assert tube(grid, [(100, 0, 0), (120, 0, 0)], 5.0) == (None, None)  # outside the field of view
    assert ellipsoid(grid, (0, 100, 0), (5, 5, 5))[0] is None


def test_abdominal_painters_stay_under_the_diaphragm_and_own_only_their_structure():
    cv = make_canvas(3, SHAPE, SPACING)
    phantom_organs.paint_body_wall(cv)
    assert (cv.owner[cv.body.skin] != 0).all() and (cv.owner[~cv.body.skin] == 0).all()  # air outside the body
    for paint, names in ((phantom_organs.paint_liver, {"liver"}), (phantom_organs.paint_spleen, {"spleen"}),
                         (phantom_organs.paint_kidneys, {"kidney_left", "kidney_right", "_sinus"}),
                         (phantom_organs.paint_pancreas, {"pancreas"})):
        before = cv.owner.copy()
        paint(cv)
        changed = cv.owner != before
        assert changed.any(), paint.__name__
        assert not (changed & ~cv.body.below).any(), paint.__name__
        assert {int(i) for i in np.unique(cv.owner[changed])} == {OWNER_ID[n] for n in names}, paint.__name__
    before = cv.hu.copy()
    cv.paint(FULL, None, "liver", 0.0)  # nothing to paint: no-op
    cv.paint(None, np.ones(SHAPE, bool), "liver", 0.0)
    np.testing.assert_array_equal(cv.hu, before)
