"""Preparers on tiny fake trees that mimic each release layout; the CLI and the thin data_scripts."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anatomask_lab.data.io import DataError, save_nifti
from anatomask_lab.data.prepare import PREPARERS, add_cli, amos22, autopet2, flare22, preparer, totalsegmentator
from anatomask_lab.data.prepare.totalsegmentator import V1_STRUCTURES, V2_STRUCTURES

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (10, 9, 8)
AFF = np.diag([-3.0, -3.0, 5.0, 1.0])
FAST = {"spacing": (4.0, 4.0, 4.0), "workers": 0, "progress": False}


def _ct(path, seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return save_nifti(path, rng.normal(0, 200, shape).astype(np.int16), AFF)


def _label(path, n_classes, seed=0, shape=SHAPE, dtype=np.uint8):
    rng = np.random.default_rng(seed + 100)
    return save_nifti(path, rng.integers(0, n_classes + 1, shape).astype(dtype), AFF)


def _dataset(out):
    return json.loads((Path(out) / "dataset.json").read_text())


# -- TotalSegmentator ----------------------------------------------------------------------------------------------


def test_official_class_tables():
    assert len(V1_STRUCTURES) == 104 == len(set(V1_STRUCTURES))
    assert len(V2_STRUCTURES) == 117 == len(set(V2_STRUCTURES))
    assert V1_STRUCTURES[:5] == ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver")
    assert V1_STRUCTURES[103] == "urinary_bladder" and V1_STRUCTURES[17] == "vertebrae_L5"
    assert V2_STRUCTURES[6] == "pancreas" and V2_STRUCTURES[116] == "costal_cartilages"
    assert V2_STRUCTURES[50] == "heart" and V2_STRUCTURES[91] == "rib_left_1"


def _totalseg_tree(root, names, n=3, split=True):
    rows = ["image_id;age;gender;institute;study_type;split"]
    for i in range(n):
        d = root / f"s{i:04d}"
        _ct(d / "ct.nii.gz", i)
        rng = np.random.default_rng(i)
        for k, name in enumerate(names):
            m = np.zeros(SHAPE, np.uint8)
            if rng.random() < 0.7:  # some structures are empty, as in the release
                m[k % 10, :, k % 8] = 1
            save_nifti(d / "segmentations" / f"{name}.nii.gz", m, AFF)
        rows.append(f"s{i:04d};60;m;A;ct;{['train', 'val', 'test'][i % 3]}")
    if split:
        (root / "meta.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize(("table", "version"), [(V1_STRUCTURES, "v1"), (V2_STRUCTURES, "v2")])
def test_totalsegmentator_release_merges_masks_with_the_official_table(tmp_path, table, version):
    src = _totalseg_tree(tmp_path / "src", table)
    cases, found = totalsegmentator.find_cases(src)
    assert found == version and len(cases) == 3 and len(cases[0].masks) == len(table)
    out = totalsegmentator.prepare(src, tmp_path / "out", **FAST)
    ds = _dataset(out)
    assert ds["class_names"] == ["background", *table]
    assert ds["source_table"] == f"TotalSegmentator {version}"
    assert ds["splits"] == {"train": ["s0000"], "val": ["s0001"], "test": ["s0002"]}
    # voxel-level check at the original spacing: each mask lands on its class id
    out2 = totalsegmentator.prepare(src, tmp_path / "out2", spacing=(3.0, 3.0, 5.0), workers=0, progress=False)
    lab = np.load(out2 / "cases" / "s0000" / "label.npy")
    expect = np.zeros(SHAPE, np.uint8)
    for k, name in enumerate(table):  # overlaps: the later structure of the table wins
        expect[np.asarray(nib.load(src / "s0000" / "segmentations" / f"{name}.nii.gz").dataobj) > 0] = k + 1
    np.testing.assert_array_equal(lab, expect[::-1, ::-1, :])  # LPS file -> RAS arrays


def test_totalsegmentator_class_subset_and_phantom_preset(tmp_path):
    src = _totalseg_tree(tmp_path / "src", V2_STRUCTURES, n=2, split=False)
    out = totalsegmentator.prepare(src, tmp_path / "o", classes="liver,spine=vertebrae_*+sacrum", **FAST)
    ds = _dataset(out)
    assert ds["class_names"] == ["background", "liver", "spine"]
    assert len(ds["class_sources"]["spine"]) == 26  # sacrum, S1, 24 vertebrae
    assert ds["split_source"].startswith("random 70/10/20")
    out = totalsegmentator.prepare(src, tmp_path / "p", classes="phantom", **FAST)
    assert len(_dataset(out)["class_names"]) == 16


def test_totalsegmentator_unknown_structure(tmp_path):
    src = _totalseg_tree(tmp_path / "src", ("liver", "spleen"), n=1)
    save_nifti(src / "s0000" / "segmentations" / "banana.nii.gz", np.zeros(SHAPE, np.uint8), AFF)
    with pytest.raises(DataError, match=r"banana\.nii\.gz.*neither the v1 \(104\) nor the v2 \(117\)"):
        totalsegmentator.find_cases(src)
    with pytest.raises(DataError, match=r"banana\.nii\.gz: structure 'banana' is not in the TotalSegmentator v1"):
        totalsegmentator.find_cases(src, "v1")


def test_totalsegmentator_empty_or_wrong_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no TotalSegmentator subjects .*it is empty"):
        totalsegmentator.find_cases(tmp_path / "empty")
    flat = tmp_path / "flat"
    _ct(flat / "FLARE22_Tr_0001_0000.nii.gz")
    with pytest.raises(DataError, match=r"flat: no TotalSegmentator subjects .*FLARE22_Tr_0001_0000"):
        totalsegmentator.find_cases(flat)
    with pytest.raises(DataError, match="not a folder"):
        totalsegmentator.find_cases(tmp_path / "missing")
    bad = _totalseg_tree(tmp_path / "badmeta", ("liver",), n=1)
    (bad / "meta.csv").write_text("id,split\nx,train\n")
    with pytest.raises(DataError, match=r"meta\.csv: expected .*image_id"):
        totalsegmentator.find_cases(bad)


def test_unlabelled_subject_and_truncated_mask(tmp_path):
    src = _totalseg_tree(tmp_path / "src", ("liver", "spleen"), n=2)
    _ct(src / "s0009" / "ct.nii.gz", 9)  # no segmentations/ folder
    out = totalsegmentator.prepare(src, tmp_path / "o", **FAST)
    cases = {c["id"]: c for c in _dataset(out)["cases"]}
    assert cases["s0009"]["has_label"] is False and cases["s0009"]["split"] == "train"
    assert not (out / "cases" / "s0009" / "label.npy").exists()
    mask = src / "s0001" / "segmentations" / "liver.nii.gz"
    mask.write_bytes(mask.read_bytes()[:60])
    with pytest.raises(DataError, match=r"s0001/segmentations/liver\.nii\.gz"):
        totalsegmentator.prepare(src, tmp_path / "o2", **FAST)


# -- FLARE22 -------------------------------------------------------------------------------------------------------


def _flare_tree(root, n_lab=4, n_unlab=2):
    for i in range(1, n_lab + 1):
        _ct(root / "FLARE22Train" / "images" / f"FLARE22_Tr_{i:04d}_0000.nii.gz", i)
        _label(root / "FLARE22Train" / "labels" / f"FLARE22_Tr_{i:04d}.nii.gz", 13, i)
    for i in range(1, n_unlab + 1):
        _ct(root / "UnlabeledCase1-1000" / f"Case_{i:05d}_0000.nii.gz", 50 + i)
    return root


def test_flare22_labelled_and_unlabelled(tmp_path):
    src = _flare_tree(tmp_path / "src")
    out = flare22.prepare(src, tmp_path / "o", **FAST)
    ds = _dataset(out)
    assert ds["class_names"][1:] == list(flare22.CLASSES) and len(flare22.CLASSES) == 13
    labelled = [c["id"] for c in ds["cases"] if c["has_label"]]
    assert labelled == [f"FLARE22_Tr_{i:04d}" for i in range(1, 5)]
    assert {c["split"] for c in ds["cases"] if not c["has_label"]} == {"train"}
    lab = np.load(out / "cases" / "FLARE22_Tr_0001" / "label.npy")
    assert lab.max() <= 13 and lab.dtype == np.uint8
    assert len(flare22.find_cases(src, unlabelled=False)) == 4


def test_flare22_layout_errors(tmp_path):
    src = _flare_tree(tmp_path / "a", 2, 0)
    (src / "FLARE22Train" / "labels" / "FLARE22_Tr_0002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"FLARE22_Tr_0002_0000\.nii\.gz: no label file FLARE22_Tr_0002\.nii\.gz"):
        flare22.find_cases(src)
    src = _flare_tree(tmp_path / "b", 2, 0)
    _label(src / "FLARE22Train" / "labels" / "FLARE22_Tr_0007.nii.gz", 13)
    with pytest.raises(DataError, match=r"FLARE22_Tr_0007\.nii\.gz: label without its image"):
        flare22.find_cases(src)
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match="no FLARE22 files"):
        flare22.find_cases(tmp_path / "c")
    src = _flare_tree(tmp_path / "d", 1, 0)
    _label(src / "FLARE22Train" / "labels" / "FLARE22_Tr_0001.nii.gz", 20, seed=3)  # values up to 20
    with pytest.raises(DataError, match=r"FLARE22_Tr_0001\.nii\.gz: label values .* outside the class table"):
        flare22.prepare(src, tmp_path / "o", **FAST)


# -- AMOS22 --------------------------------------------------------------------------------------------------------


def _amos_tree(root):
    for part, ids in (("Tr", (1, 2, 507)), ("Va", (3, 508)), ("Ts", (4,))):
        for i in ids:
            _ct(root / f"images{part}" / f"amos_{i:04d}.nii.gz", i)
            if part != "Ts":
                _label(root / f"labels{part}" / f"amos_{i:04d}.nii.gz", 15, i)
    return root


def test_amos22_keeps_its_split_and_tells_ct_from_mri(tmp_path):
    src = _amos_tree(tmp_path / "src")
    assert amos22.modality_of(499) == "CT" and amos22.modality_of(500) == "MR"
    out = amos22.prepare(src, tmp_path / "ct", **FAST)
    ds = _dataset(out)
    assert ds["channels"] == ["CT"]
    assert ds["splits"] == {"train": ["amos_0001", "amos_0002"], "val": ["amos_0003"], "test": ["amos_0004"]}
    assert {c["id"]: c["has_label"] for c in ds["cases"]}["amos_0004"] is False
    assert len(ds["class_names"]) == 16
    mr = amos22.find_cases(src, "mr")
    assert [c.case_id for c in mr] == ["amos_0507", "amos_0508"] and mr[0].modalities == ("MR",)
    both = amos22.prepare(src, tmp_path / "all", modality="all", **FAST)
    assert _dataset(both)["modality_by_case"]["amos_0508"] == "MR"
    meta = json.loads((both / "cases" / "amos_0507" / "meta.json").read_text())
    assert meta["modalities"] == ["MR"] and meta["normalisation"][0]["clip"] is None


def test_amos22_layout_errors(tmp_path):
    (tmp_path / "x").mkdir()
    _ct(tmp_path / "x" / "amos_0001.nii.gz")
    with pytest.raises(DataError, match=r"x: no imagesTr/imagesVa/imagesTs folder"):
        amos22.find_cases(tmp_path / "x")
    src = _amos_tree(tmp_path / "src")
    (src / "labelsTr" / "amos_0002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"imagesTr/amos_0002\.nii\.gz: no label"):
        amos22.find_cases(src)


# -- AutoPET II ----------------------------------------------------------------------------------------------------


def _autopet_tree(root, patients=4, studies=(1, 2, 1, 1)):
    for p in range(patients):
        for s in range(studies[p]):
            d = root / f"PETCT_{p:03x}abc" / f"0{s}-12-2000-NA-PET-CT Ganzkoerper  primaer mit KM-{p}{s}"
            _ct(d / "CTres.nii.gz", p * 10 + s)
            save_nifti(d / "SUV.nii.gz", np.random.default_rng(p).gamma(2, 1, SHAPE).astype(np.float32), AFF)
            _label(d / "SEG.nii.gz", 1, p)
    return root


def test_autopet2_two_channels_and_patient_grouped_split(tmp_path):
    src = _autopet_tree(tmp_path / "src")
    out = autopet2.prepare(src, tmp_path / "o", **FAST)
    ds = _dataset(out)
    assert ds["channels"] == ["CT", "PET"] and ds["class_names"] == ["background", "lesion"]
    ids = [c["id"] for c in ds["cases"]]
    assert ids == ["PETCT_000abc_0", "PETCT_001abc_0", "PETCT_001abc_1", "PETCT_002abc_0", "PETCT_003abc_0"]
    split = {c["id"]: c["split"] for c in ds["cases"]}
    assert split["PETCT_001abc_0"] == split["PETCT_001abc_1"]
    image = np.load(out / "cases" / "PETCT_001abc_1" / "image.npy")
    assert image.shape[0] == 2 and image.dtype == np.float32
    meta = json.loads((out / "cases" / "PETCT_001abc_1" / "meta.json").read_text())
    assert meta["source"]["study"].startswith("01-12-2000") and meta["modalities"] == ["CT", "PET"]


def test_autopet2_missing_channel(tmp_path):
    src = _autopet_tree(tmp_path / "src", 1, (1,))
    next(src.rglob("SUV.nii.gz")).unlink()
    with pytest.raises(DataError, match=r"SUV\.nii\.gz: missing"):
        autopet2.find_cases(src)
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no PETCT_"):
        autopet2.find_cases(tmp_path / "e")


def test_4d_image_is_named(tmp_path):
    src = _autopet_tree(tmp_path / "src", 1, (1,))
    suv = next(src.rglob("SUV.nii.gz"))
    save_nifti(suv, np.ones((*SHAPE, 2), np.float32), AFF)
    with pytest.raises(DataError, match=r"SUV\.nii\.gz: expected a 3D image, found 4D"):
        autopet2.prepare(src, tmp_path / "o", **FAST)


# -- CLI and scripts -----------------------------------------------------------------------------------------------


def test_cli_prepare_subcommands(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="anatomask-lab")
    add_cli(parser.add_subparsers(dest="command"))
    src = _totalseg_tree(tmp_path / "src", ("liver", "spleen", "vertebrae_L1"), n=2)
    args = parser.parse_args(["prepare", "totalsegmentator", "--src", str(src), "--out", str(tmp_path / "o"),
                              "--classes", "liver,spine=vertebrae_*", "--spacing", "4", "--workers", "0",
                              "--no-progress", "--no-clip"])
    assert args.func(args) == 0
    assert "prepared 2 cases" in capsys.readouterr().out
    ds = _dataset(tmp_path / "o")
    assert ds["class_names"] == ["background", "liver", "spine"] and ds["spacing"] == [4.0, 4.0, 4.0]
    assert "z-score" in ds["normalisation"] and "clip" not in ds["normalisation"].split(";")[0]
    for name in PREPARERS:
        assert preparer(name).HELP
        with pytest.raises(SystemExit):
            parser.parse_args(["prepare", name, "--help"])
    with pytest.raises(ValueError, match="unknown data set"):
        preparer("nope")


def test_data_script_is_the_same_code_path(tmp_path):
    src = _totalseg_tree(tmp_path / "src", ("liver",), n=1)
    script = ROOT / "data_scripts" / "prepare_totalsegmentator.py"
    run = subprocess.run([sys.executable, str(script), "--src", str(src), "--out", str(tmp_path / "o"),
                          "--spacing", "4", "--workers", "0", "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "o" / "dataset.json").is_file()
    bad = subprocess.run([sys.executable, str(script), "--src", str(tmp_path / "none"), "--out",
                          str(tmp_path / "o2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "none: not a folder" in bad.stderr
    for name in PREPARERS:
        assert (ROOT / "data_scripts" / f"prepare_{name}.py").is_file()


# -- reference labels: read again through the preparer's own code ---------------------------------------------------


def _reference(out, tmp_path, split="test"):
    from anatomask_lab.predict import write_reference_labels

    files = write_reference_labels(out, tmp_path / f"ref_{split}", split=split)
    return {f.name[: -len(".nii.gz")]: nib.load(f) for f in files}


def _prepared_in_original_geometry(out, case):
    from anatomask_lab.data.preprocess import restore_to_original

    meta = json.loads((out / "cases" / case / "meta.json").read_text())
    return restore_to_original(np.load(out / "cases" / case / "label.npy"), meta), meta


def _assert_reference_is_the_prepared_label(out, refs):
    assert refs
    for case, img in refs.items():
        expect, meta = _prepared_in_original_geometry(out, case)
        np.testing.assert_array_equal(np.asarray(img.dataobj), expect)
        np.testing.assert_allclose(img.affine, meta["original"]["affine"])


def test_reference_of_overlapping_masks_and_a_renumbered_subset_is_the_prepared_label(tmp_path):
    src = tmp_path / "src"
    masks = {"spleen": (slice(1, 6), slice(2, 7)), "liver": (slice(4, 9), slice(1, 5)),
             "kidney_left": (slice(0, 3), slice(0, 3))}  # spleen and liver overlap at x 4..5, y 2..4
    for i in range(3):
        _ct(src / f"s{i:04d}" / "ct.nii.gz", i)
        for name, (sx, sy) in masks.items():
            m = np.zeros(SHAPE, np.uint8)
            m[sx, sy, i : i + 4] = 1
            save_nifti(src / f"s{i:04d}" / "segmentations" / f"{name}.nii.gz", m, AFF)
    (src / "meta.csv").write_text("image_id;split\ns0000;train\ns0001;val\ns0002;test\n")
    # classes in another order than the release table (spleen is value 1, liver value 5 in TotalSegmentator v2)
    out = totalsegmentator.prepare(src, tmp_path / "o", classes="liver,spleen", spacing=(3.0, 3.0, 5.0),
                                   workers=0, progress=False)
    refs = _reference(out, tmp_path)
    _assert_reference_is_the_prepared_label(out, refs)
    ref = np.asarray(refs["s0002"].dataobj)
    assert set(np.unique(ref)) == {0, 1, 2}  # kidney_left is not selected
    assert np.all(ref[4:6, 2:5, 2:6] == 1)  # the overlap: liver, later in the release table, wins


def test_reference_of_a_renumbered_label_map_subset_is_the_prepared_label(tmp_path):
    src = _flare_tree(tmp_path / "src", n_lab=4, n_unlab=0)
    out = flare22.prepare(src, tmp_path / "o", classes="spleen,liver", spacing=(3.0, 3.0, 5.0), workers=0,
                          progress=False)
    refs = _reference(out, tmp_path)
    _assert_reference_is_the_prepared_label(out, refs)
    for case, img in refs.items():  # release values liver 1, spleen 3 -> prepared spleen 1, liver 2
        raw = np.asarray(nib.load(next(src.rglob(f"{case}.nii.gz"))).dataobj)
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.select([raw == 3, raw == 1], [1, 2], 0))


def _edit_json(path, edit):
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def test_reference_of_folders_prepared_before_the_release_table_was_recorded(tmp_path):
    src = _flare_tree(tmp_path / "src", n_lab=4, n_unlab=0)
    out = flare22.prepare(src, tmp_path / "o", classes="spleen,liver", spacing=(3.0, 3.0, 5.0), workers=0,
                          progress=False)
    _edit_json(out / "dataset.json", lambda d: d.pop("source_classes"))
    _assert_reference_is_the_prepared_label(out, _reference(out, tmp_path / "a"))  # the preparer's table
    full = flare22.prepare(src, tmp_path / "full", spacing=(3.0, 3.0, 5.0), workers=0, progress=False)
    old_names = ["background", "liver", "kidney_right", "spleen", *[f"organ_{k}" for k in range(4, 14)]]

    def rename(d):  # the whole table under the names older versions used, no source_classes
        d.pop("source_classes")
        d["class_names"], d["labels"] = old_names, {n: i for i, n in enumerate(old_names)}
        d["class_sources"] = {n: [n] for n in old_names[1:]}

    _edit_json(full / "dataset.json", rename)
    _assert_reference_is_the_prepared_label(full, _reference(full, tmp_path / "b"))


def test_reference_of_cases_prepared_before_mask_files_were_recorded(tmp_path):
    src = _totalseg_tree(tmp_path / "src", ("spleen", "liver", "aorta"), n=3)
    out = totalsegmentator.prepare(src, tmp_path / "o", classes="aorta,liver", spacing=(3.0, 3.0, 5.0), workers=0,
                                   progress=False)
    for meta in (out / "cases").glob("*/meta.json"):
        _edit_json(meta, lambda m: m["source"].pop("mask_files"))
    _assert_reference_is_the_prepared_label(out, _reference(out, tmp_path))


def test_reference_of_an_unlabelled_case_is_refused(tmp_path):
    out = amos22.prepare(_amos_tree(tmp_path / "src"), tmp_path / "o", spacing=(3.0, 3.0, 5.0), workers=0,
                         progress=False)  # imagesTs has no labels
    _assert_reference_is_the_prepared_label(out, _reference(out, tmp_path, split="val"))
    with pytest.raises(DataError, match=r"amos_0004/meta\.json: case 'amos_0004' was prepared without a label"):
        _reference(out, tmp_path, split="test")
