"""nnU-Net v2 raw import: a generated two-channel data set with imagesTs and splits_final.json, through the CLI;
classes from nnU-Net labels (regions included); dataset.json's nnU-Net fields; SimpleITK formats; bad input."""

import json
import re
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from anatomask_lab.cli import main
from anatomask_lab.data.dataset import DatasetInfo
from anatomask_lab.data.io import DataError, load_image, save_nifti
from anatomask_lab.data.prepare import nnunet, reference_table
from anatomask_lab.data.preprocess import random_splits

SHAPE = (20, 22, 24)
SPACING = (1.2, 1.0, 2.0)
AFF = np.array([[-1.2, 0, 0, 30.0], [0, -1.0, 0, 20.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])  # LPS voxel order
LABELS = {"background": 0, "liver": 1, "tumor": 2, "cyst": 3, "tumor_and_cyst": [2, 3]}
TRAIN = [f"case_{i:03d}" for i in range(5)]
TEST = ["new_000", "new_001"]


def _volumes(seed):
    """CT (air -1000, body ~40 HU, liver ~100), T2 (0 outside the body) and a label map, [X, Y, Z]."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    body = x**2 + y**2 < 0.7 + 0.05 * rng.random()
    liver = body & ((x - 0.2) ** 2 + y**2 + (z * 0.8) ** 2 < 0.25)
    tumor = liver & ((x - 0.3) ** 2 + (y - 0.1) ** 2 + z**2 < 0.03)
    cyst = liver & ((x - 0.1) ** 2 + (y + 0.2) ** 2 + (z - 0.2) ** 2 < 0.02) & ~tumor
    ct = np.where(body, 40 + 20 * rng.normal(size=SHAPE), -1000.0)
    ct[liver] += 60
    t2 = np.where(body, 300 + 50 * rng.normal(size=SHAPE) + 80 * liver, 0.0)
    label = (liver * 1 + tumor * 1 + cyst * 2).astype(np.uint8)  # liver 1, tumor 2, cyst 3
    return ct.astype(np.float32), t2.astype(np.float32), label


def _save(path, array, ending):
    if ending.startswith(".nii"):
        return save_nifti(path, array, AFF)
    import SimpleITK as sitk

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ AFF  # written by hand: ITK stores LPS origin, spacing, directions
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(0))
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(img, str(path))
    return path


def _raw(root, ending=".nii.gz", labels=LABELS, n_train=5):
    root.mkdir(parents=True)
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d).mkdir()
    for i, case in enumerate(TRAIN[:n_train]):
        ct, t2, label = _volumes(i)
        _save(root / "imagesTr" / f"{case}_0000{ending}", ct, ending)
        _save(root / "imagesTr" / f"{case}_0001{ending}", t2, ending)
        _save(root / "labelsTr" / f"{case}{ending}", label, ending)
    for i, case in enumerate(TEST):
        ct, t2, _ = _volumes(10 + i)
        _save(root / "imagesTs" / f"{case}_0000{ending}", ct, ending)
        _save(root / "imagesTs" / f"{case}_0001{ending}", t2, ending)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "T2"}, "labels": labels, "numTraining": n_train, "file_ending": ending,
        "name": "Toy"}))
    return root


def _splits(path):
    path.write_text(json.dumps([{"train": TRAIN[:3], "val": TRAIN[3:]}, {"train": TRAIN[2:], "val": TRAIN[:2]}]))
    return path


def _prepare(src, out, *more):
    return main(["prepare", "nnunet", "--src", str(src), "--out", str(out), "--spacing", *map(str, SPACING),
                 "--workers", "0", "--no-progress", *more])


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return _raw(tmp_path_factory.mktemp("nn") / "Dataset042_Toy")


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "ds"
    assert _prepare(raw, out, "--splits", str(_splits(raw.parent / "splits_final.json")), "--fold", "1") == 0
    return out


def _canonical(array):
    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(array, AFF)).dataobj)


# -- the prepared data set ----------------------------------------------------------------------------------------


def test_cases_channels_labels_and_splits_follow_the_raw_set_and_the_fold(prepared):
    info = DatasetInfo.read(prepared)
    assert info.name == "Dataset042_Toy" and info.channels == ("CT", "T2") and info.in_channels == 2
    assert info.class_names == ("background", "liver", "tumor", "cyst")
    assert info.splits == {"train": tuple(TRAIN[2:]), "val": tuple(TRAIN[:2]), "test": (), "imagesTs": tuple(TEST)}
    assert [c.has_label for c in info.cases] == [True] * 5 + [False] * 2
    for case in TEST:
        assert not (prepared / "cases" / case / "label.npy").exists()
    for i, case in enumerate(TRAIN):
        image = np.load(prepared / "cases" / case / "image.npy")
        assert image.shape == (2, *SHAPE)  # source spacing kept, CT air is non-zero so nothing is cropped
        np.testing.assert_array_equal(np.load(prepared / "cases" / case / "label.npy"), _canonical(_volumes(i)[2]))
    assert info.extra["regions"] == {"tumor_and_cyst": [2, 3]}
    assert info.extra["nnunet_splits"]["fold"] == 1


def test_ct_channel_follows_the_ct_rule_and_t2_is_z_scored_over_its_non_zero_voxels(prepared):
    for i, case in enumerate(TRAIN[:2] + TEST[:1]):
        ct, t2, _ = (_canonical(v) for v in _volumes(i if case in TRAIN else 10))
        image = np.load(prepared / "cases" / case / "image.npy")
        body = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(ct > -500, 2, 0)], 2)
        lo, hi = np.percentile(ct[body], [0.5, 99.5])
        clipped = np.clip(ct, lo, hi)
        np.testing.assert_allclose(image[0], (clipped - clipped[body].mean()) / clipped[body].std(), atol=1e-4)
        assert abs(image[0].mean()) > 0.3  # not a plain z-score over the whole volume (air counts there)
        nz = t2 != 0
        np.testing.assert_allclose(image[1], (t2 - t2[nz].mean()) / t2[nz].std(), atol=1e-4)
        assert abs(image[1][nz].mean()) < 1e-4 and abs(image[1][nz].std() - 1) < 1e-4
        stats = json.loads((prepared / "cases" / case / "meta.json").read_text())["normalisation"]
        assert stats[0]["clip"] is not None and stats[1]["clip"] is None


def test_dataset_json_carries_nnunet_fields_that_agree_with_the_kit_fields(prepared, tmp_path):
    on_disk = json.loads((prepared / "dataset.json").read_text())
    assert on_disk["channel_names"] == {"0": "CT", "1": "T2"} and on_disk["channels"] == ["CT", "T2"]
    assert on_disk["labels"] == {"background": 0, "liver": 1, "tumor": 2, "cyst": 3}
    assert on_disk["numTraining"] == 5 and on_disk["file_ending"] == ".nii.gz"
    info = DatasetInfo.read(prepared)
    assert info.to_json() == on_disk and info.num_training == 5 and info.file_ending == ".nii.gz"
    # an nnU-Net-style file naming its channels only by channel_names reads the same channels
    only_nnunet = {k: v for k, v in on_disk.items() if k != "channels"}
    assert DatasetInfo.from_json(only_nnunet).channels == ("CT", "T2")
    for key, value, message in [("channel_names", {"0": "CT", "1": "T1"}, "'channel_names' .* disagree"),
                                ("channel_names", {"1": "CT"}, "'channel_names' must map"),
                                ("numTraining", 4, "'numTraining' is 4 but 5 cases are labelled"),
                                ("file_ending", "nii", "'file_ending' must be")]:
        with pytest.raises(DataError, match=message):
            DatasetInfo.from_json({**on_disk, key: value}, tmp_path / "dataset.json")


def test_reference_labels_of_an_nnunet_set_are_its_label_files(prepared, tmp_path):
    from anatomask_lab.predict import write_reference_labels

    info = DatasetInfo.read(prepared)
    assert reference_table(info).names == ("liver", "tumor", "cyst")
    files = write_reference_labels(prepared, tmp_path / "gt", split="val")
    assert sorted(f.name for f in files) == [f"{c}.nii.gz" for c in TRAIN[:2]]
    for i, f in enumerate(sorted(files)):
        img = nib.load(f)
        np.testing.assert_array_equal(np.asarray(img.dataobj), _volumes(i)[2])
        np.testing.assert_allclose(img.affine, AFF)
    with pytest.raises(DataError, match="without a label"):
        write_reference_labels(prepared, tmp_path / "gt_ts", split="imagesTs")


def test_seeded_split_without_splits_file_and_imagests_in_train_or_skipped(raw, tmp_path):
    assert _prepare(raw, tmp_path / "a", "--imagesTs", "train", "--seed", "3") == 0
    info = DatasetInfo.read(tmp_path / "a")
    expect = random_splits(TRAIN, 3)
    assert {c.id: c.split for c in info.cases if c.has_label} == expect
    assert [c.split for c in info.cases if not c.has_label] == ["train", "train"]
    assert "random 70/10/20" in info.split_source and info.file_ending == ".nii.gz"
    assert _prepare(raw, tmp_path / "b", "--imagesTs", "skip") == 0
    assert DatasetInfo.read(tmp_path / "b").case_ids == tuple(TRAIN)


def test_data_script_is_the_same_code_path(raw, tmp_path):
    import subprocess

    from anatomask_lab.data.prepare import script_main

    assert script_main("nnunet", ["--src", str(raw), "--out", str(tmp_path / "o"), "--spacing", "3",
                                  "--workers", "0", "--no-progress", "--imagesTs", "skip"]) == 0
    assert DatasetInfo.read(tmp_path / "o").num_training == 5
    script = nnunet.__file__.replace("anatomask_lab/data/prepare/nnunet.py", "data_scripts/prepare_nnunet.py")
    run = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--splits" in run.stdout and "--imagesTs" in run.stdout


# -- classes from nnU-Net labels ------------------------------------------------------------------------------------


def test_label_table_keeps_integer_labels_merges_free_regions_and_records_overlapping_ones():
    table, regions, notes = nnunet.label_table(LABELS)
    assert table.names == ("liver", "tumor", "cyst") and table.lut().tolist() == [0, 1, 2, 3]
    assert regions == {"tumor_and_cyst": [2, 3]} and any("tumor_and_cyst" in n for n in notes)
    # a region nothing else uses is one class merging its values
    table, regions, _ = nnunet.label_table({"background": 0, "liver": 1, "kidney": [2, 3]})
    assert table.names == ("liver", "kidney") and table.lut().tolist() == [0, 1, 2, 2] and regions == {}
    assert table.sources == (("liver",), ("label_2", "label_3"))
    # KiTS23-style: only regions name values 1 and 3
    table, regions, _ = nnunet.label_table({"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2})
    assert table.names == ("label_1", "tumor", "label_3") and table.lut().tolist() == [0, 1, 2, 3]
    assert regions == {"kidney": [1, 2, 3], "masses": [2, 3]}


@pytest.mark.parametrize(("labels", "message"), [
    ({"liver": 1}, "no background entry with value 0"),
    ({"background": 0, "liver": 1, "spleen": 1}, "'liver' and 'spleen' both have value 1"),
    ({"background": 0, "liver": 1, "spleen": 3}, r"label values \[2\] have no entry"),
    ({"background": 0, "liver": "1"}, "label 'liver' must be a non-negative integer"),
    ({"background": 0, "liver": 1, "ignore": 2}, "label 'ignore'"),
    ({"background": 0}, "no foreground label"),
])
def test_bad_label_tables(labels, message, tmp_path):
    with pytest.raises(DataError, match=message) as err:
        nnunet.label_table(labels, tmp_path / "dataset.json")
    assert str(tmp_path / "dataset.json") in str(err.value)


# -- SimpleITK formats ----------------------------------------------------------------------------------------------


def test_simpleitk_read_matches_nibabel_on_the_same_volume(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    arr = np.random.default_rng(0).normal(size=(9, 8, 7)).astype(np.float32)  # [k, j, i]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 1.3, 2.5))
    img.SetOrigin((10.0, -20.0, 5.0))
    c, s = np.cos(0.5), np.sin(0.5)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([1.0, 1.0, -1.0])  # rotated, z reversed
    img.SetDirection(rot.ravel().tolist())
    for name in ("a.mha", "a.nrrd", "a.nii.gz"):
        sitk.WriteImage(img, str(tmp_path / name))  # ITK's own NIfTI writer converts LPS to RAS
    for canonical in (False, True):
        ref, ref_aff, _ = load_image(tmp_path / "a.nii.gz", canonical=canonical)  # nibabel
        for name in ("a.mha", "a.nrrd"):
            data, aff, orig = load_image(tmp_path / name, canonical=canonical)
            np.testing.assert_array_equal(data, ref)
            np.testing.assert_allclose(aff, ref_aff, atol=1e-5)
            assert orig.shape == (7, 8, 9)
    _, aff, orig = load_image(tmp_path / "a.mha", canonical=False)
    point = np.array(img.TransformIndexToPhysicalPoint((1, 2, 3))) * [-1, -1, 1]  # LPS -> RAS
    np.testing.assert_allclose(aff @ [1, 2, 3, 1], [*point, 1], atol=1e-9)
    np.testing.assert_allclose(orig.affine, aff)


def test_mha_data_set_prepares_like_the_nifti_one(prepared, tmp_path):
    pytest.importorskip("SimpleITK")
    src = _raw(tmp_path / "Dataset043_ToyMha", ending=".mha")
    assert _prepare(src, tmp_path / "out", "--splits", str(_splits(tmp_path / "splits.json")), "--fold", "1") == 0
    info = DatasetInfo.read(tmp_path / "out")
    assert info.file_ending == ".mha" and info.split("imagesTs") == tuple(TEST)
    for case in (*TRAIN, *TEST):
        np.testing.assert_allclose(np.load(tmp_path / "out" / "cases" / case / "image.npy"),
                                   np.load(prepared / "cases" / case / "image.npy"), atol=1e-5)
    for case in TRAIN:
        np.testing.assert_array_equal(np.load(tmp_path / "out" / "cases" / case / "label.npy"),
                                      np.load(prepared / "cases" / case / "label.npy"))


def test_simpleitk_keeps_a_singleton_fourth_axis_only_and_refuses_vectors(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    vol = sitk.GetImageFromArray(np.arange(120, dtype=np.float32).reshape(4, 5, 6))
    sitk.WriteImage(sitk.JoinSeries([vol]), str(tmp_path / "one.mha"))
    np.testing.assert_array_equal(load_image(tmp_path / "one.mha", canonical=False)[0],
                                  np.arange(120, dtype=np.float32).reshape(4, 5, 6).transpose(2, 1, 0))
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(tmp_path / "two.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5, 6, 3), np.float32), isVector=True), str(tmp_path / "v.nrrd"))
    with pytest.raises(DataError, match=r"two\.mha: expected a 3D image, found 4D"):
        load_image(tmp_path / "two.mha")
    with pytest.raises(DataError, match=r"v\.nrrd: expected a scalar image, found 3 components"):
        load_image(tmp_path / "v.nrrd")


def test_missing_simpleitk_is_one_line_naming_the_file_and_the_extra(tmp_path, monkeypatch):
    (tmp_path / "a.mha").write_bytes(b"ObjectType = Image\n")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    with pytest.raises(DataError, match=r"a\.mha: reading \.mha files needs SimpleITK; .*anatomask-lab\[sitk\]"):
        load_image(tmp_path / "a.mha")


def test_corrupt_mha_is_named(tmp_path):
    pytest.importorskip("SimpleITK")
    (tmp_path / "a.mha").write_bytes(b"this is no image")
    with pytest.raises(DataError, match=r"a\.mha: not a readable image file") as err:
        load_image(tmp_path / "a.mha")
    assert "\n" not in str(err.value)


# -- bad input: one line naming the file or the argument -------------------------------------------------------------


def _broken(tmp_path, how):
    src = _raw(tmp_path / "Dataset001_Bad", n_train=3)
    meta = json.loads((src / "dataset.json").read_text())
    img, lab = src / "imagesTr", src / "labelsTr"
    if how == "missing channel":
        (img / "case_001_0001.nii.gz").unlink()
    elif how == "channel grid":
        save_nifti(img / "case_001_0001.nii.gz", _volumes(1)[1], AFF @ np.diag([1.0, 1.0, 1.5, 1.0]))
    elif how == "label grid":
        save_nifti(lab / "case_001.nii.gz", np.zeros((20, 22, 23), np.uint8), AFF)
    elif how == "label values":
        save_nifti(lab / "case_001.nii.gz", np.full(SHAPE, 7, np.uint8), AFF)
    elif how == "corrupt":
        (img / "case_001_0000.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    elif how == "no label":
        (lab / "case_001.nii.gz").unlink()
    elif how == "label only":
        shutil.copy(lab / "case_001.nii.gz", lab / "case_009.nii.gz")
    elif how == "extra channel":
        shutil.copy(img / "case_001_0001.nii.gz", img / "case_001_0002.nii.gz")
    elif how == "numTraining":
        meta["numTraining"] = 4
    elif how == "missing key":
        del meta["file_ending"]
    elif how == "ending":
        meta["file_ending"] = ".nii"
    elif how == "no imagesTr":
        shutil.rmtree(img)
    (src / "dataset.json").write_text(json.dumps(meta))
    return src


@pytest.mark.parametrize(("how", "message"), [
    ("missing channel", r"imagesTr/case_001_0001\.nii\.gz: missing \(case 'case_001' has channel"),
    ("channel grid", r"imagesTr/case_001_0001\.nii\.gz: affine differs from .*case_001_0000"),
    ("label grid", r"labelsTr/case_001\.nii\.gz: shape \(20, 22, 23\) differs"),
    ("label values", r"labelsTr/case_001\.nii\.gz: label values \[7\] outside the class table \(0\.\.3\)"),
    ("corrupt", r"imagesTr/case_001_0000\.nii\.gz: not a readable NIfTI"),
    ("no label", r"imagesTr/case_001_0000\.nii\.gz: no label .*labelsTr/case_001\.nii\.gz"),
    ("label only", r"labelsTr/case_009\.nii\.gz: label without images"),
    ("extra channel", r"case_001_0002\.nii\.gz: channel 0002 but dataset\.json names 2 channel"),
    ("numTraining", r"dataset\.json: numTraining is 4 but imagesTr/labelsTr hold 3 cases"),
    ("missing key", r"dataset\.json: missing required key 'file_ending'"),
    ("ending", r"imagesTr: no <case>_<XXXX>\.nii files"),
    ("no imagesTr", r"imagesTr: missing"),
])
def test_bad_raw_data_sets_are_one_line_errors(tmp_path, capsys, how, message):
    src = _broken(tmp_path, how)
    assert _prepare(src, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("anatomask-lab prepare: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "dataset.json").exists()


@pytest.mark.parametrize(("folds", "fold", "message"), [
    ([{"train": ["case_000", "nobody"], "val": ["case_001"]}], 0, r"splits\.json: names cases that are not in "
                                                                  r"imagesTr: \['nobody'\]"),
    ([{"train": ["case_000"], "val": ["case_001"]}], 1, r"--fold 1: .*splits\.json has folds 0\.\.0"),
    ([{"train": ["case_000"], "val": ["case_000"]}], 0, "fold 0 has cases in both train and val"),
    ({"train": []}, 0, r"splits\.json: expected a list"),
])
def test_bad_splits_files(raw, tmp_path, capsys, folds, fold, message):
    (tmp_path / "splits.json").write_text(json.dumps(folds))
    assert _prepare(raw, tmp_path / "out", "--splits", str(tmp_path / "splits.json"), "--fold", str(fold)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_fold_without_splits_and_a_missing_dataset_json(raw, tmp_path, capsys):
    assert _prepare(raw, tmp_path / "out", "--fold", "2") == 2
    assert "--fold 2: needs --splits" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _prepare(tmp_path / "empty", tmp_path / "out") == 2
    assert "empty/dataset.json: not found" in capsys.readouterr().err


def test_pretraining_takes_the_data_sets_channels(prepared, tmp_path, capsys):
    """A 2-channel set pretrains without --in-channels (the default follows the data); a contradicting count is
    refused in one line before anything of a run is written, so the corrected command needs no --overwrite."""
    from anatomask_lab.runs import load_checkpoint

    base = ["pretrain", "--preset", "tiny", "--data", str(prepared), "--epochs", "1", "--iters-per-epoch", "1",
            "--quiet"]
    assert main([*base, "--out", str(tmp_path / "pre")]) == 0
    state = load_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")
    assert state["config"]["model"]["in_channels"] == 2
    assert state["student"]["encoder.stages.0.0.conv1.weight"].shape[1] == 2
    capsys.readouterr()
    assert main([*base, "--in-channels", "3", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--in-channels 3" in err and "has 2 channels" in err
    assert not (tmp_path / "bad" / "config.json").exists()
    assert main([*base, "--in-channels", "2", "--out", str(tmp_path / "bad")]) == 0
