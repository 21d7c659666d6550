"""Folder import: every image under a folder (any depth, mixed endings) becomes an unlabelled pretraining case."""

import json
import re
import sys

import nibabel as nib
import numpy as np
import pytest

from anatomask_lab.cli import main
from anatomask_lab.data.dataset import DatasetInfo, check_case_id
from anatomask_lab.data.io import DataError, save_nifti
from anatomask_lab.data.prepare import folder

AFF = np.diag([-1.5, -1.5, 2.5, 1.0])


def _ct(path, seed, shape=(11, 12, 13)):
    rng = np.random.default_rng(seed)
    return save_nifti(path, np.where(rng.random(shape) < 0.6, rng.normal(50, 30, shape), -1000).astype(np.float32),
                      AFF)


def _tree(root):
    """Nested folders, .nii.gz and .nii, a name that needs cleaning, two files that map to the same id, other
    files."""
    _ct(root / "site A" / "p1" / "scan.nii.gz", 0)
    _ct(root / "site A" / "p2" / "scan.nii", 1)
    _ct(root / "top.nii.gz", 2)
    _ct(root / "site_A__p1" / "scan.nii.gz", 3)  # cleans to the same id as site A/p1/scan
    (root / "notes.txt").write_text("not an image")
    (root / "site A" / "table.csv").write_text("a,b\n")
    (root / "site A" / "p1" / "scan.json").write_text("{}")
    _ct(root / ".cache" / "hidden.nii.gz", 4)
    return root


def _prepare(src, out, *more):
    return main(["prepare", "folder", "--src", str(src), "--out", str(out), "--spacing", "3", "--workers", "0",
                 "--no-progress", *more])


def test_every_image_becomes_an_unlabelled_train_case_with_a_unique_plain_id(tmp_path):
    src = _tree(tmp_path / "scans")
    assert _prepare(src, tmp_path / "out") == 0
    info = DatasetInfo.read(tmp_path / "out")
    assert info.case_ids == ("site_A__p1__scan", "site_A__p2__scan", "site_A__p1__scan-2", "top")
    assert all(check_case_id(c) for c in info.case_ids)
    assert info.splits["train"] == info.case_ids and not any(c.has_label for c in info.cases)
    assert info.channels == ("CT",) and info.class_names == ("background",) and info.num_training == 0
    assert info.file_ending is None  # mixed .nii.gz and .nii
    ds = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT"} and ds["numTraining"] == 0 and "file_ending" not in ds
    for case, rel in zip(info.case_ids, ("site A/p1/scan.nii.gz", "site A/p2/scan.nii", "site_A__p1/scan.nii.gz",
                                         "top.nii.gz"), strict=True):
        meta = json.loads((tmp_path / "out" / "cases" / case / "meta.json").read_text())
        assert meta["source"]["images"] == [str((src / rel).resolve())] and meta["source"]["relative_path"] == rel
        image = np.load(tmp_path / "out" / "cases" / case / "image.npy")
        assert image.shape[0] == 1 and meta["normalisation"][0]["clip"] is not None  # CT rule
    with pytest.raises(DataError, match="no classes"):
        from anatomask_lab.predict import write_reference_labels

        write_reference_labels(tmp_path / "out", tmp_path / "gt", split="train")


def test_order_and_ids_do_not_depend_on_the_file_system(tmp_path):
    a = folder.find_cases(_tree(tmp_path / "a"))
    assert [c.case_id for c in a] == [c.case_id for c in folder.find_cases(tmp_path / "a")]
    assert [c.images[0].relative_to(tmp_path / "a").as_posix() for c in a] == sorted(
        c.images[0].relative_to(tmp_path / "a").as_posix() for c in a)


def test_mr_modality_is_z_scored_over_non_zero_voxels(tmp_path):
    rng = np.random.default_rng(0)
    mr = np.zeros((9, 10, 11), np.float32)
    mr[2:7, 2:8, 2:9] = rng.normal(300, 40, (5, 6, 7))
    save_nifti(tmp_path / "mr" / "a.nii.gz", mr, np.eye(4))
    assert _prepare(tmp_path / "mr", tmp_path / "out", "--modality", "mr", "--spacing", "1") == 0
    image = np.load(tmp_path / "out" / "cases" / "a" / "image.npy")[0]
    inner = mr[2:7, 2:8, 2:9]  # the crop to the non-zero box leaves exactly this block
    np.testing.assert_allclose(image, (inner - inner.mean()) / inner.std(), atol=1e-4)
    assert DatasetInfo.read(tmp_path / "out").channels == ("MR",)


def test_no_images_and_a_missing_folder_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    assert _prepare(tmp_path / "docs", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"docs: no image files .* found, recursively; 1 other", err)
    assert _prepare(tmp_path / "nowhere", tmp_path / "out") == 2
    assert "nowhere: not a folder" in capsys.readouterr().err


def test_a_corrupt_image_is_named_and_finished_cases_stay(tmp_path, capsys):
    src = tmp_path / "src"
    _ct(src / "a.nii.gz", 0)
    (src / "b.nii.gz").write_bytes(b"\x1f\x8b broken")
    assert _prepare(src, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"src/b\.nii\.gz: not a readable NIfTI", err)
    assert (tmp_path / "out" / "cases" / "a" / "image.npy").is_file()
    assert not (tmp_path / "out" / "cases" / "b").exists() and not (tmp_path / "out" / "dataset.json").exists()
    _ct(src / "b.nii.gz", 1)
    assert _prepare(src, tmp_path / "out") == 0  # resumes
    assert DatasetInfo.read(tmp_path / "out").case_ids == ("a", "b")


def test_itk_files_without_simpleitk_fail_before_any_work(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    _ct(src / "a.nii.gz", 0)
    (src / "b.mha").write_bytes(b"ObjectType = Image\n")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    assert _prepare(src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert re.search(r"b\.mha: reading \.mha files needs SimpleITK; .*anatomask-lab\[sitk\]", err)
    assert not (tmp_path / "out").exists()


def test_mha_and_nrrd_files_are_read_through_simpleitk(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    src = tmp_path / "src"
    path = _ct(src / "a.nii.gz", 0)
    img = sitk.ReadImage(str(path))
    sitk.WriteImage(img, str(src / "b.mha"))
    (src / "sub").mkdir()
    sitk.WriteImage(img, str(src / "sub" / "c.nrrd"))
    assert _prepare(src, tmp_path / "out") == 0
    info = DatasetInfo.read(tmp_path / "out")
    assert info.case_ids == ("a", "b", "sub__c")
    ref = np.load(tmp_path / "out" / "cases" / "a" / "image.npy")
    for case in ("b", "sub__c"):
        np.testing.assert_allclose(np.load(tmp_path / "out" / "cases" / case / "image.npy"), ref, atol=1e-5)
    assert nib.aff2axcodes(np.array(json.loads((tmp_path / "out" / "cases" / "b" / "meta.json").read_text())
                                    ["original"]["affine"])) == ("L", "P", "S")
