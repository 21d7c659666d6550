"""Slice display, headless: one radiological convention whatever the stored voxel order."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform

from anatomask_lab.viz import axis_codes, orient_slice, plane_axes, slice_of

SHAPE = (20, 24, 16)  # distinct sizes, so that a wrong transpose cannot pass
LPS_AFFINE = np.array([[-1.5, 0, 0, 120.0], [0, -1.5, 0, 90.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
MARKER = (2, 3, 13)  # LPS voxel: patient's right (low x), anterior (low y), superior (high z)


@pytest.fixture(scope="module")
def lps_image() -> nib.Nifti1Image:
    vol = np.random.default_rng(0).normal(0, 1, SHAPE).astype(np.float32)
    vol[MARKER] = 100.0
    return nib.Nifti1Image(vol, LPS_AFFINE)


def _voxel_in(img_to: nib.Nifti1Image, img_from: nib.Nifti1Image, ijk) -> tuple[int, int, int]:
    """The voxel of ``img_to`` at the world position of voxel ``ijk`` of ``img_from``."""
    xyz1 = img_from.affine @ np.array([*ijk, 1.0])
    return tuple(int(v) for v in np.rint(np.linalg.solve(img_to.affine, xyz1)[:3]))


def _same_slices(img_a: nib.Nifti1Image, img_b: nib.Nifti1Image, ijk_a) -> None:
    """Every plane through the voxel ``ijk_a`` looks the same from both images, given their codes or affines."""
    vol_a, vol_b = np.asanyarray(img_a.dataobj), np.asanyarray(img_b.dataobj)
    ijk_b = _voxel_in(img_b, img_a, ijk_a)
    axes_a, axes_b = plane_axes(img_a.affine), plane_axes(img_b.affine)
    codes_a = "".join(nib.aff2axcodes(img_a.affine))
    for plane in ("axial", "coronal", "sagittal"):
        a, b = axes_a[plane], axes_b[plane]
        shown_a = slice_of(vol_a, a, ijk_a[a], codes_a)
        shown_b = slice_of(vol_b, b, ijk_b[b], img_b.affine)
        np.testing.assert_array_equal(shown_a, shown_b, err_msg=plane)


def test_lps_and_canonical_ras_show_identical_slices(lps_image):
    ras_image = nib.as_closest_canonical(lps_image)
    assert nib.aff2axcodes(lps_image.affine) == ("L", "P", "S")
    assert nib.aff2axcodes(ras_image.affine) == ("R", "A", "S")
    assert not np.array_equal(np.asanyarray(ras_image.dataobj), np.asanyarray(lps_image.dataobj))
    for ijk in (MARKER, (10, 11, 5), (0, 23, 15)):
        _same_slices(lps_image, ras_image, ijk)


@pytest.mark.parametrize("codes", ["PIR", "SLA", "ASR"])
def test_permuted_orientations_show_identical_slices(lps_image, codes):
    other = lps_image.as_reoriented(ornt_transform(axcodes2ornt("LPS"), axcodes2ornt(codes)))
    assert "".join(nib.aff2axcodes(other.affine)) == codes
    _same_slices(lps_image, other, MARKER)


@pytest.mark.parametrize("codes", ["LPS", "RAS", "PIR"])
def test_marker_lands_on_the_radiological_side(lps_image, codes):
    img = nib.as_closest_canonical(lps_image) if codes == "RAS" else lps_image
    if codes == "PIR":
        img = lps_image.as_reoriented(ornt_transform(axcodes2ornt("LPS"), axcodes2ornt(codes)))
    vol = np.asanyarray(img.dataobj)
    ijk = _voxel_in(img, lps_image, MARKER)
    axes = plane_axes(codes)
    found = {}
    for plane, axis in axes.items():
        shown = slice_of(vol, axis, ijk[axis], codes)
        rows, cols = shown.shape
        r, c = np.unravel_index(np.argmax(shown), shown.shape)
        found[plane] = (r < rows / 2, c < cols / 2)
    # the marker is at the patient's right, anterior and superior
    assert found["axial"] == (True, True)  # anterior at the top, patient's right on the image's left
    assert found["coronal"] == (True, True)  # superior at the top, patient's right on the left
    assert found["sagittal"] == (True, True)  # superior at the top, anterior on the left
    # and exactly where the convention puts it (the marker is not centred on any axis)
    axial = slice_of(vol, axes["axial"], ijk[axes["axial"]], codes)
    assert np.unravel_index(np.argmax(axial), axial.shape) == (MARKER[1], MARKER[0])


def test_default_is_the_stored_lps_order():
    vol = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    np.testing.assert_array_equal(slice_of(vol, 2, 5), vol[:, :, 5].T)
    np.testing.assert_array_equal(slice_of(vol, 1, 5), vol[:, 5, :].T[::-1])
    np.testing.assert_array_equal(slice_of(vol, 0, 5), vol[5].T[::-1])
    np.testing.assert_array_equal(slice_of(vol, 2, 5, "RAS"), vol[:, :, 5].T[::-1, ::-1])
    np.testing.assert_array_equal(slice_of(vol, 0, 5, "RAS"), vol[5].T[::-1, ::-1])


def test_axis_codes_and_planes():
    assert axis_codes("ras") == ("R", "A", "S") and axis_codes(("L", "P", "S")) == ("L", "P", "S")
    assert axis_codes(LPS_AFFINE) == ("L", "P", "S") and axis_codes(LPS_AFFINE.tolist()) == ("L", "P", "S")
    assert plane_axes("RAS") == {"sagittal": 0, "coronal": 1, "axial": 2}
    assert plane_axes("PIR") == {"coronal": 0, "axial": 1, "sagittal": 2}
    for bad in ("RAX", "RRS", "RA", np.eye(3)):
        with pytest.raises(ValueError, match="orientation"):
            axis_codes(bad)
    with pytest.raises(ValueError, match="2-D"):
        orient_slice(np.zeros((2, 2, 2)), 0, "RAS")
    with pytest.raises(ValueError, match="axis"):
        slice_of(np.zeros(SHAPE), 3, 0)
