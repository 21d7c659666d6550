"""Preprocessing: resampling geometry, normalisation, the dataset folder, restoring predictions, resuming, bad input."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from anatomask_lab.data import preprocess as pp
from anatomask_lab.data.io import DataError, save_nifti
from anatomask_lab.data.phantom import generate_cohort
from anatomask_lab.data.prepare import preparer
from anatomask_lab.data.preprocess import CaseSource, make_label_table, preprocess_case, restore_to_original

SHAPE, SPACING, TARGET = (40, 40, 24), (4.8, 4.8, 10.0), (4.0, 4.0, 4.0)
LPS = np.diag([-2.0, -2.0, 3.0, 1.0])


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    generate_cohort(root, 4, seed=1, shape=SHAPE, spacing=SPACING, workers=0, progress=False)
    return root


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "ds"
    preparer("totalsegmentator").prepare(raw, out, classes="phantom", spacing=TARGET, workers=0, progress=False)
    return out


def _copy_raw(raw, dst):
    shutil.copytree(raw, dst)
    return dst


# -- resampling and normalisation --------------------------------------------------------------------------------


def test_cubic_resampling_keeps_geometry_and_reproduces_linear_ramps():
    i, j, k = np.meshgrid(np.arange(20), np.arange(16), np.arange(12), indexing="ij")
    image = (1.0 * i + 2.0 * j - 3.0 * k).astype(np.float32)
    ratio = (2.0, 0.5, 1.5)
    out = pp.resample_image(image, ratio, antialias=False)
    assert out.shape == (10, 31, 8) and out.dtype == np.float32
    ni, nj, nk = np.meshgrid(*(np.arange(n) * r for n, r in zip(out.shape, ratio, strict=True)), indexing="ij")
    expect = ni + 2 * nj - 3 * nk
    inner = (slice(1, -1), slice(2, -3), slice(1, -1))
    np.testing.assert_allclose(out[inner], expect[inner], atol=1e-3)
    assert pp.resample_image(image, (1.0, 1.0, 1.0)).shape == image.shape


def test_label_resampling_nearest_and_one_hot_linear():
    label = np.zeros((20, 20, 10), np.uint8)
    label[5:15, 5:15, 2:8] = 3
    label[8:12, 8:12, 4:6] = 7
    for mode in ("nearest", "linear"):
        out = pp.resample_label(label, (0.5, 0.5, 2.0), mode=mode)
        assert out.shape == (39, 39, 5) and out.dtype == np.uint8
        assert set(np.unique(out)) == {0, 3, 7}
        np.testing.assert_allclose((out == 3).sum() / (label == 3).sum(), 4 / 2, rtol=0.25)
    with pytest.raises(ValueError):
        pp.resample_label(label, (1, 1, 1), mode="cubic")


def _ct_like():
    rng = np.random.default_rng(0)
    ct = np.full((40, 40, 6), -1000.0, np.float32)
    x, y = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    body = (x - 20) ** 2 + (y - 20) ** 2 < 15**2
    lung = (x - 20) ** 2 + (y - 14) ** 2 < 5**2
    ct[body] = 40.0
    ct[lung] = -850.0
    return ct + rng.normal(0, 10, ct.shape).astype(np.float32), body


def test_ct_normalisation_clips_to_body_percentiles_then_z_scores():
    ct, body = _ct_like()
    out, stats = pp.normalise(ct, "CT", clip=True)
    lo, hi = stats["clip"]
    assert lo < -800 < hi  # lungs are inside the body mask, so their HU set the lower bound
    assert stats["fg_voxels"] == body.sum() * 6
    inside = out[np.broadcast_to(body[..., None], ct.shape)]
    assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1) < 1e-3
    assert out.min() >= (lo - stats["mean"]) / stats["std"] - 1e-5  # air clipped
    plain, s2 = pp.normalise(ct, "CT", clip=False)
    assert s2["clip"] is None and plain.min() < out.min()
    mr = np.where(body[..., None], ct + 1000, 0).astype(np.float32)
    z, s3 = pp.normalise(mr, "MR")
    assert s3["clip"] is None and abs(z[mr != 0].mean()) < 1e-3


def test_constant_volume_is_refused(tmp_path):
    path = save_nifti(tmp_path / "ct.nii.gz", np.full((8, 8, 6), 7, np.int16), LPS)
    with pytest.raises(DataError, match=r"ct\.nii\.gz: constant \(zero-variance\) volume"):
        preprocess_case(CaseSource("a", (path,)), None, spacing=(2, 2, 3))


def test_random_splits_are_70_10_20_and_reproducible():
    ids = [f"c{i:02d}" for i in range(20)]
    a = pp.random_splits(ids, seed=3)
    assert a == pp.random_splits(list(reversed(ids)), seed=3)
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 14, "val": 2, "test": 4}
    assert a != pp.random_splits(ids, seed=4)
    groups = [i[:2] for i in ids]  # c0, c1: two patients
    g = pp.random_splits(ids, seed=0, groups=groups)
    assert len({g[i] for i in ids if i.startswith("c0")}) == 1


def test_class_table_selection_and_groups():
    src = ("spleen", "liver", "vertebrae_L1", "vertebrae_L2", "rib_left_1")
    t = make_label_table(src, ["liver", "spine=vertebrae_*", "rest=*"])
    assert t.names == ("liver", "spine", "rest")
    assert t.sources == (("liver",), ("vertebrae_L1", "vertebrae_L2"), ("spleen", "rib_left_1"))
    np.testing.assert_array_equal(t.lut(), [0, 3, 1, 2, 2, 3])
    assert make_label_table(src).names == src
    with pytest.raises(DataError, match="'kidney'.*matches no structure"):
        make_label_table(src, ["kidney"])
    with pytest.raises(DataError, match="listed twice"):
        make_label_table(src, ["liver", "liver=spleen"])


# -- the dataset folder ------------------------------------------------------------------------------------------


def test_prepared_folder_layout(prepared, raw):
    ds = json.loads((prepared / "dataset.json").read_text())
    assert ds["channels"] == ["CT"] and ds["spacing"] == list(TARGET)
    assert ds["class_names"][0] == "background" and len(ds["class_names"]) == 16
    assert ds["labels"]["liver"] == ds["class_names"].index("liver")
    assert "vertebrae_L1" in ds["class_sources"]["vertebrae"]
    meta_csv = (raw / "meta.csv").read_text().splitlines()
    own = {line.split(";")[0]: line.split(";")[5] for line in meta_csv[1:]}
    assert {c["id"]: c["split"] for c in ds["cases"]} == own  # the release's own split is kept
    assert sorted(sum(ds["splits"].values(), [])) == ["s0000", "s0001", "s0002", "s0003"]
    for c in ds["cases"]:
        d = prepared / "cases" / c["id"]
        image = np.load(d / "image.npy", mmap_mode="r")
        label = np.load(d / "label.npy", mmap_mode="r")
        meta = json.loads((d / "meta.json").read_text())
        assert image.dtype == np.float32 and image.shape == (1, *c["shape"])
        assert label.dtype == np.uint8 and label.shape == tuple(c["shape"])
        assert label.max() <= 15 and c["has_label"]
        assert meta["original"]["shape"] == list(SHAPE) and meta["original"]["axcodes"] == "LPS"
        np.testing.assert_allclose(meta["original"]["spacing"], SPACING)
        assert np.all(np.isfinite(image)) and -6 < image.min() < image.max() < 15
        assert meta["classes_present"] == sorted(int(v) for v in np.unique(label) if v)
        fg = np.load(d / "fg.npy")
        assert fg.shape[1] == 4 and np.all(label[fg[:, 1], fg[:, 2], fg[:, 3]] == fg[:, 0])
    assert not [p for p in (prepared / "cases").iterdir() if p.name.startswith(".")]


def test_restore_to_original_matches_the_source_masks(prepared, raw, tmp_path):
    meta = json.loads((prepared / "cases" / "s0001" / "meta.json").read_text())
    label = np.load(prepared / "cases" / "s0001" / "label.npy")
    restored = restore_to_original(label, meta)
    assert restored.shape == SHAPE
    for name in ("liver", "aorta", "kidney_left"):
        truth = nib.load(raw / "s0001" / "segmentations" / f"{name}.nii.gz").get_fdata() > 0
        pred = restored == meta_class(prepared, name)
        dice = 2 * (truth & pred).sum() / (truth.sum() + pred.sum())
        assert dice > 0.75, (name, dice)
    path = pp.write_prediction(label, meta, tmp_path / "pred.nii.gz")
    img = nib.load(path)
    assert img.shape == SHAPE and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, meta["original"]["affine"])
    with pytest.raises(DataError, match="prediction shape"):
        restore_to_original(label[:-1], meta)


def meta_class(prepared, name):
    return json.loads((prepared / "dataset.json").read_text())["labels"][name]


def test_restore_is_exact_at_the_original_spacing(raw, tmp_path):
    out = preparer("totalsegmentator").prepare(raw, tmp_path / "ds", classes=["liver", "spleen"],
                                               spacing=SPACING, workers=0, progress=False)
    meta = json.loads((out / "cases" / "s0002" / "meta.json").read_text())
    restored = restore_to_original(np.load(out / "cases" / "s0002" / "label.npy"), meta)
    truth = np.zeros(SHAPE, np.uint8)
    for i, name in enumerate(("liver", "spleen"), start=1):
        truth[nib.load(raw / "s0002" / "segmentations" / f"{name}.nii.gz").get_fdata() > 0] = i
    np.testing.assert_array_equal(restored, truth)


def test_restore_handles_permuted_axes(tmp_path):
    rng = np.random.default_rng(0)
    label = (rng.random((6, 7, 8)) > 0.7).astype(np.uint8)
    image = rng.normal(size=(6, 7, 8)).astype(np.float32)
    aff = np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 5], [0, 3.0, 0, -7], [0, 0, 0, 1]])  # axes permuted + flipped
    img_p = save_nifti(tmp_path / "ct.nii.gz", image, aff)
    lab_p = save_nifti(tmp_path / "seg.nii.gz", label, aff)
    table = make_label_table(["thing"])
    res = preprocess_case(CaseSource("p", (img_p,), label=lab_p), table, spacing=(2.0, 1.5, 3.0))
    np.testing.assert_array_equal(restore_to_original(res["label"], res["meta"]), label)


def test_resume_skips_finished_cases(prepared, monkeypatch, raw):
    before = {p.name: (p / "image.npy").stat().st_mtime_ns for p in (prepared / "cases").iterdir()}

    def boom(*args, **kwargs):
        raise AssertionError("a finished case was processed again")

    monkeypatch.setattr(pp, "preprocess_case", boom)
    preparer("totalsegmentator").prepare(raw, prepared, classes="phantom", spacing=TARGET, workers=0,
                                         progress=False)
    after = {p.name: (p / "image.npy").stat().st_mtime_ns for p in (prepared / "cases").iterdir()}
    assert before == after


def test_other_settings_are_refused(prepared, raw):
    with pytest.raises(DataError, match="other settings.*spacing"):
        preparer("totalsegmentator").prepare(raw, prepared, classes="phantom", spacing=(2, 2, 2), workers=0,
                                             progress=False)


def test_failed_case_leaves_finished_ones_and_rerun_completes(raw, tmp_path):
    src = _copy_raw(raw, tmp_path / "raw")
    ct = src / "s0002" / "ct.nii.gz"
    good = ct.read_bytes()
    img = nib.load(ct)
    data = img.get_fdata().astype(np.float32)
    data[3, 3, 3] = np.nan
    save_nifti(ct, data, img.affine)
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=r"s0002/ct\.nii\.gz: 1 NaN or infinite"):
        preparer("totalsegmentator").prepare(src, out, spacing=TARGET, workers=0, progress=False)
    done = sorted(p.name for p in (out / "cases").iterdir())
    assert done == ["s0000", "s0001"]  # earlier outputs intact, no partial folder for s0002
    assert not (out / "dataset.json").exists()
    ct.write_bytes(good)
    preparer("totalsegmentator").prepare(src, out, spacing=TARGET, workers=2, progress=False)
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["s0000", "s0001", "s0002", "s0003"]
    ds = json.loads((out / "dataset.json").read_text())
    assert len(ds["class_names"]) == 118  # full v2 table: background + 117


def test_parallel_and_serial_runs_agree(raw, prepared, tmp_path):
    out = preparer("totalsegmentator").prepare(raw, tmp_path / "par", classes="phantom", spacing=TARGET,
                                               workers=2, progress=False)
    for cid in ("s0000", "s0003"):
        for f in ("image.npy", "label.npy"):
            np.testing.assert_array_equal(np.load(out / "cases" / cid / f), np.load(prepared / "cases" / cid / f))


# -- bad input at case level -------------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    img = save_nifti(tmp_path / "ct.nii.gz", rng.normal(0, 100, (8, 9, 10)).astype(np.float32), LPS)
    return tmp_path, img


def test_label_with_other_shape(pair):
    d, img = pair
    lab = save_nifti(d / "seg.nii.gz", np.zeros((8, 9, 11), np.uint8), LPS)
    with pytest.raises(DataError, match=r"seg\.nii\.gz: shape \(8, 9, 11\) differs from .*ct\.nii\.gz"):
        preprocess_case(CaseSource("a", (img,), label=lab), make_label_table(["x"]))


def test_label_with_other_affine(pair):
    d, img = pair
    shifted = LPS.copy()
    shifted[2, 3] = 5.0
    lab = save_nifti(d / "seg.nii.gz", np.zeros((8, 9, 10), np.uint8), shifted)
    with pytest.raises(DataError, match=r"seg\.nii\.gz: affine differs"):
        preprocess_case(CaseSource("a", (img,), label=lab), make_label_table(["x"]))


def test_label_values_outside_the_table(pair):
    d, img = pair
    lab = np.zeros((8, 9, 10), np.uint8)
    lab[1, 1, 1] = 14
    path = save_nifti(d / "seg.nii.gz", lab, LPS)
    with pytest.raises(DataError, match=r"seg\.nii\.gz: label values \[14\] outside the class table \(0\.\.13\)"):
        preprocess_case(CaseSource("a", (img,), label=path), make_label_table([f"c{i}" for i in range(13)]))


def test_mask_values_outside_zero_one(pair):
    d, img = pair
    m = np.zeros((8, 9, 10), np.uint8)
    m[2, 2, 2] = 2
    path = save_nifti(d / "liver.nii.gz", m, LPS)
    with pytest.raises(DataError, match=r"liver\.nii\.gz: mask values \[0, 2\] outside \{0, 1\}"):
        preprocess_case(CaseSource("a", (img,), masks=(("liver", path),)), make_label_table(["liver"]))


def test_second_channel_on_another_grid(pair):
    d, img = pair
    pet = save_nifti(d / "suv.nii.gz", np.ones((8, 9, 9), np.float32), LPS)
    with pytest.raises(DataError, match=r"suv\.nii\.gz: shape"):
        preprocess_case(CaseSource("a", (img, pet), ("CT", "PET")), None)


def test_bad_case_ids_and_empty_case_lists(pair, tmp_path):
    _, img = pair
    with pytest.raises(DataError, match="no cases"):
        pp.preprocess_dataset([], tmp_path / "o", name="x", channels=["CT"], table=None)
    with pytest.raises(DataError, match="appears twice"):
        pp.preprocess_dataset([CaseSource("a", (img,)), CaseSource("a", (img,))], tmp_path / "o", name="x",
                              channels=["CT"], table=None)


def test_mr_is_cropped_to_non_zero_and_restored_exactly(tmp_path):
    rng = np.random.default_rng(0)
    img = np.zeros((20, 18, 16), np.float32)
    img[3:15, 4:16, 2:12] = rng.normal(100, 10, (12, 12, 10))
    lab = np.zeros(img.shape, np.uint8)
    lab[5:10, 6:12, 4:9] = 1
    aff = np.diag([-2.0, 2.0, -3.0, 1.0])
    src = CaseSource("m", (save_nifti(tmp_path / "i.nii.gz", img, aff),), ("MR",),
                     label=save_nifti(tmp_path / "l.nii.gz", lab, aff))
    res = preprocess_case(src, make_label_table(["x"]), spacing=(2.0, 2.0, 3.0))
    assert res["meta"]["crop_box"] == [[5, 17], [4, 16], [4, 14]]  # canonical (flipped x and z) indices
    assert res["image"].shape == (1, 12, 12, 10)
    np.testing.assert_array_equal(restore_to_original(res["label"], res["meta"]), lab)
