"""NIfTI input/output: round trips, canonical orientation, atomic writes, and clear errors on bad files."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from anatomask_lab.data.io import DataError, atomic_write_json, check_same_grid, load_nifti, save_nifti

LPS = np.diag([-1.5, -1.5, 2.5, 1.0])


def _write(path, data, affine=LPS):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def test_save_and_load_round_trip(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = save_nifti(tmp_path / "a.nii.gz", data, LPS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporary file renamed away
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, LPS)
    assert img.get_data_dtype() == np.int16
    raw, affine, orig = load_nifti(path, canonical=False)
    np.testing.assert_array_equal(raw, data)
    assert raw.dtype == np.float32
    save_nifti(tmp_path / "b.nii", data, LPS)
    np.testing.assert_array_equal(load_nifti(tmp_path / "b.nii", canonical=False)[0], data)


def test_canonical_orientation_flips_lps_to_ras(tmp_path):
    data = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    path = _write(tmp_path / "a.nii.gz", data)
    canon, affine, orig = load_nifti(path)
    np.testing.assert_array_equal(canon, data[::-1, ::-1, :])
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert nib.aff2axcodes(orig.affine) == ("L", "P", "S")
    # the same voxel sits at the same world position
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], LPS @ [3, 4, 0, 1])


def test_singleton_fourth_axis_is_dropped(tmp_path):
    path = _write(tmp_path / "a.nii.gz", np.ones((3, 4, 5, 1), np.float32))
    assert load_nifti(path)[0].shape == (3, 4, 5)


@pytest.mark.parametrize("content", [b"this is not an image", b""])
def test_not_nifti(tmp_path, content):
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(content))
    with pytest.raises(DataError, match="ct.nii.gz.*not a readable NIfTI"):
        load_nifti(path)
    plain = tmp_path / "ct.nii"
    plain.write_bytes(content * 100)
    with pytest.raises(DataError, match="ct.nii"):
        load_nifti(plain)


def test_truncated_file(tmp_path):
    path = _write(tmp_path / "ct.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"ct\.nii\.gz: .*(truncated|not a readable)"):
        load_nifti(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.nii.gz: file not found"):
        load_nifti(tmp_path / "nope.nii.gz")


def test_4d_image_is_refused(tmp_path):
    path = _write(tmp_path / "pet.nii.gz", np.ones((3, 4, 5, 2), np.float32))
    with pytest.raises(DataError, match=r"pet\.nii\.gz: expected a 3D image, found 4D"):
        load_nifti(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, bad):
    data = np.zeros((3, 4, 5), np.float32)
    data[1, 2, 3] = bad
    path = _write(tmp_path / "ct.nii.gz", data)
    with pytest.raises(DataError, match=r"ct\.nii\.gz: 1 NaN or infinite voxels"):
        load_nifti(path)


def test_grid_check_names_both_files(tmp_path):
    a, b = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    check_same_grid((2, 3, 4), LPS, a, (2, 3, 4), LPS + 1e-6, b)
    with pytest.raises(DataError, match=r"seg\.nii\.gz: shape \(2, 3, 5\) differs from .*ct\.nii\.gz"):
        check_same_grid((2, 3, 4), LPS, a, (2, 3, 5), LPS, b)
    shifted = LPS.copy()
    shifted[0, 3] = 2.0
    with pytest.raises(DataError, match=r"seg\.nii\.gz: affine differs"):
        check_same_grid((2, 3, 4), LPS, a, (2, 3, 4), shifted, b)


def test_atomic_json_keeps_old_file_when_writing_fails(tmp_path):
    path = atomic_write_json(tmp_path / "d.json", {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert path.read_text().strip().startswith("{")
    assert '"a": 1' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]
