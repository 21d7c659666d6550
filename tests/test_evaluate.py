"""``anatomask-lab evaluate`` on NIfTI folders, its error messages, and the comparison report."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
from scipy import ndimage

from anatomask_lab import evaluate, metrics, report

nibabel = pytest.importorskip("nibabel")

SPACING = (0.8, 0.9, 2.0)
AFFINE = np.diag([*SPACING, 1.0])


def save(path, labels, affine=AFFINE):
    nibabel.save(nibabel.Nifti1Image(np.asarray(labels), affine), str(path))


def label_map(rng, shape=(20, 18, 10), classes=(1, 2, 3)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    for k in classes:
        labels[ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.52] = k
    return labels


@pytest.fixture
def cohort(tmp_path):
    """Three cases; case_2 has no class 3 in either map, case_1's prediction misses class 2."""
    rng = np.random.default_rng(0)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    cases = {}
    for i, classes in enumerate([(1, 2, 3), (1, 2, 3), (1, 2)]):
        gt = label_map(rng, classes=classes)
        pred = np.roll(gt, 1, axis=i % 3)
        if i == 1:
            pred[pred == 2] = 0
        save(gt_dir / f"case_{i}.nii.gz", gt)
        save(pred_dir / f"case_{i}.nii.gz", pred)
        cases[f"case_{i}"] = (pred, gt)
    return pred_dir, gt_dir, cases


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="anatomask-lab")
    evaluate.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------------
def test_cli_writes_per_case_per_class_and_paper_table(cohort, tmp_path, capsys):
    pred_dir, gt_dir, cases = cohort
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"name": "toy", "labels": {"background": 0, "liver": 1, "kidney": 2, "aorta": 3}}))
    out = tmp_path / "eval"
    assert run_cli(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--labels", str(labels),
                    "--tolerances", "2.5", "--out", str(out)]) == 0
    rows = read_csv(out / "per_case.csv")
    assert [(r["case"], r["class"]) for r in rows] == [
        (c, n) for c in sorted(cases) for n in ("liver", "kidney", "aorta")]
    for row in rows:
        pred, gt = (m == int(row["label"]) for m in cases[row["case"]])
        assert float(row["tolerance_mm"]) == 2.5
        np.testing.assert_equal(float(row["dsc"]), metrics.dice(pred, gt))
        np.testing.assert_allclose(float(row["nsd"]), metrics.surface_dice(pred, gt, SPACING, 2.5), rtol=1e-9)
    assert math.isnan(float(rows[-1]["dsc"]))  # case_2 has no aorta: excluded under the totalseg convention
    assert float(rows[4]["dsc"]) == 0.0  # case_1's prediction misses the kidney

    # patient-wise: mean over classes per case (NaN ignored), then mean and sample SD over cases
    summary = json.loads((out / "summary.json").read_text())
    for metric in ("dsc", "nsd"):
        means = [np.nanmean([float(r[metric]) for r in rows if r["case"] == c]) for c in sorted(cases)]
        assert summary["patient_wise"][metric]["mean"] == pytest.approx(np.mean(means))
        assert summary["patient_wise"][metric]["sd"] == pytest.approx(np.std(means, ddof=1))
        liver = [float(r[metric]) for r in rows if r["class"] == "liver"]
        assert summary["per_class"]["liver"][metric]["mean"] == pytest.approx(np.mean(liver))
    assert summary["per_class"]["aorta"]["dsc"]["n"] == 2
    assert summary["settings"]["convention"] == "totalseg"
    pw = summary["patient_wise"]["dsc"]
    expected = f"{100 * pw['mean']:.1f} ± {100 * pw['sd']:.1f}"
    assert expected in (out / "summary.md").read_text()
    assert expected in capsys.readouterr().out
    per_class = read_csv(out / "per_class.csv")
    assert [r["class"] for r in per_class] == ["liver", "kidney", "aorta"]


def test_flare22_defaults_and_label_discovery(cohort, tmp_path, capsys):
    pred_dir, gt_dir, cases = cohort
    rows = evaluate.evaluate_folders(pred_dir, gt_dir, tolerances="flare22", progress=False)
    assert {r["class"] for r in rows} == set(metrics.FLARE22_CLASSES.values())
    spleen = [r for r in rows if r["class"] == "spleen" and r["case"] == "case_2"][0]  # label 3, absent in case_2
    assert spleen["dsc"] == spleen["nsd"] == 1.0 and spleen["tolerance_mm"] == 3.0  # FLARE: empty vs empty -> 1
    liver = [r for r in rows if r["label"] == 1 and r["case"] == "case_0"][0]
    pred, gt = (m == 1 for m in cases["case_0"])
    assert liver["nsd"] == pytest.approx(metrics.surface_dice(pred, gt, SPACING, 5.0))

    # no class table: labels found in any case, absent ones filled by the convention
    rows = evaluate.evaluate_folders(pred_dir, gt_dir, progress=False)
    assert [(r["case"], r["class"]) for r in rows][-3:] == [("case_2", f"label_{k}") for k in (1, 2, 3)]
    assert math.isnan(rows[-1]["dsc"]) and math.isnan(rows[-1]["nsd"])
    assert run_cli(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert (pred_dir / "evaluation" / "summary.md").is_file()


@pytest.mark.parametrize(
    ("content", "expected"),
    [({"labels": {"background": 0, "liver": 1, "spleen": 3}}, {1: "liver", 3: "spleen"}),
     ({"labels": {"0": "background", "1": "liver", "2": "kidney"}}, {1: "liver", 2: "kidney"}),
     ({"2": "kidney", "1": "liver"}, {1: "liver", 2: "kidney"})],
    ids=["nnunet-v2", "msd", "plain"],
)
def test_load_class_table(tmp_path, content, expected):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(content))
    assert evaluate.load_class_table(path) == expected


def test_load_class_table_from_a_prepared_folder(tmp_path):
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, "liver": 1, "spleen": 2}, "class_names": ["background", "liver", "spleen"],
        "cases": [{"id": "a", "has_label": True, "split": "test"}]}))
    assert evaluate.load_class_table(folder) == {1: "liver", 2: "spleen"}
    assert evaluate.load_class_table(folder / "dataset.json") == {1: "liver", 2: "spleen"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty/dataset\.json: not found"):
        evaluate.load_class_table(tmp_path / "empty")


def test_region_labels_rejected(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2]}}))
    with pytest.raises(ValueError, match="region-based"):
        evaluate.load_class_table(path)


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------
def _corrupt(cohort, kind):
    pred_dir, gt_dir, cases = cohort
    pred, gt = cases["case_1"]
    target = pred_dir / "case_1.nii.gz"
    if kind == "shape":
        save(target, pred[:, :, :-1])
    elif kind == "spacing":
        save(target, pred, np.diag([0.8, 0.9, 2.5, 1.0]))
    elif kind == "affine":
        affine = AFFINE.copy()
        affine[:3, 3] = [10.0, 0.0, 0.0]
        save(target, pred, affine)
    elif kind == "label":
        save(target, np.where(gt == 1, 9, pred).astype(np.uint8))
    elif kind == "missing":
        target.unlink()
    elif kind == "extra":
        save(pred_dir / "case_9.nii.gz", pred)
    elif kind == "float":
        save(target, pred.astype(np.float32) + 0.25)
    return target


@pytest.mark.parametrize(
    ("kind", "message"),
    [("shape", r"differ in shape: \(20, 18, 9\) vs \(20, 18, 10\)"),
     ("spacing", r"differ in voxel spacing \(mm\): \(0.8, 0.9, 2.5\) vs \(0.8, 0.9, 2.0\)"),
     ("affine", "differ in affine"),
     ("label", r"prediction holds labels \[9\] outside the class table \[1, 2, 3\]"),
     ("missing", r"1 case\(s\) missing from .*pred: case_1.nii.gz"),
     ("extra", r"1 case\(s\) missing from .*gt: case_9.nii.gz"),
     ("float", "non-integer values")],
)
def test_bad_input_names_files(cohort, tmp_path, kind, message):
    pred_dir, gt_dir, _ = cohort
    target = _corrupt(cohort, kind)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"1": "a", "2": "b", "3": "c"}))
    with pytest.raises(ValueError, match=message) as info:
        run_cli(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--labels", str(labels), "--quiet"])
    if kind in ("shape", "spacing", "affine", "label"):
        assert str(target) in str(info.value) and str(gt_dir / "case_1.nii.gz") in str(info.value)
    if kind == "float":
        assert str(target) in str(info.value)


def test_bad_tolerance_argument(cohort, capsys):
    pred_dir, gt_dir, _ = cohort
    with pytest.raises(SystemExit):
        run_cli(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--tolerances", "amos"])
    assert "expected totalseg, flare22 or a number of mm" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# comparison report
# ----------------------------------------------------------------------------------------------------------------
class FrameLike:
    """Stands in for a pandas DataFrame: only ``to_dict("records")`` is used."""

    def __init__(self, records):
        self.records = records

    def to_dict(self, orient):
        assert orient == "records"
        return self.records


def test_compare_runs(cohort, tmp_path):
    pred_dir, gt_dir, _ = cohort
    good = evaluate.evaluate_folders(pred_dir, gt_dir, progress=False)
    report.write_per_case(good, tmp_path / "anatomask.csv")
    worse = [{**r, "dsc": r["dsc"] * 0.5, "nsd": r["nsd"] * 0.9} for r in good]
    runs = {"scratch": worse, "SparK": FrameLike([{**r, "dsc": r["dsc"] * 0.9} for r in good]),
            "AnatoMask": tmp_path / "anatomask.csv"}
    paths = report.compare_runs(runs, tmp_path / "cmp")
    assert set(paths) == {"markdown", "json", "boxplot"} and all(p.is_file() for p in paths.values())

    data = json.loads(paths["json"].read_text())
    expected = report.summarise(good)["patient_wise"]
    assert data["runs"]["AnatoMask"]["patient_wise"]["dsc"]["mean"] == pytest.approx(expected["dsc"]["mean"])
    case_dsc = [np.nanmean([r["dsc"] for r in good if r["case"] == c]) for c in ("case_0", "case_1", "case_2")]
    assert list(data["dsc_per_case"]["AnatoMask"].values()) == pytest.approx(case_dsc)
    assert data["runs"]["scratch"]["patient_wise"]["dsc"]["mean"] == pytest.approx(0.5 * np.mean(case_dsc))

    lines = paths["markdown"].read_text().splitlines()
    row = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    best = report.format_pm(expected["dsc"])
    assert f"**{best}**" in row["AnatoMask"] and "**" not in row["scratch"]
    assert "| Class | scratch | SparK | AnatoMask |" in lines
    html = paths["boxplot"].read_text()
    assert "plotly" in html and all(name in html for name in runs)


def test_compare_runs_rejects_tables_without_scores(tmp_path):
    with pytest.raises(ValueError, match=r"lacks the columns \['nsd'\]"):
        report.compare_runs({"a": [{"case": "x", "class": "liver", "dsc": 0.5}]}, tmp_path)


def test_mha_label_maps_score_as_their_nifti_copies(cohort, tmp_path):
    """``predict --images`` writes ITK files for ITK inputs: evaluate reads them (through SimpleITK) with the same
    voxels, spacing and scores as NIfTI copies of the same maps."""
    sitk = pytest.importorskip("SimpleITK")
    pred_dir, gt_dir, cases = cohort
    mha = {"pred": tmp_path / "pred_mha", "gt": tmp_path / "gt_mha"}
    for folder in mha.values():
        folder.mkdir()
    for case, (pred, gt) in cases.items():
        for key, labels in (("pred", pred), ("gt", gt)):
            image = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)))  # ITK wants [k, j, i]
            image.SetSpacing(SPACING)
            sitk.WriteImage(image, str(mha[key] / f"{case}.mha"))
    data, zooms, _ = evaluate.read_label_map(mha["gt"] / "case_0.mha")
    np.testing.assert_array_equal(data, cases["case_0"][1])
    assert zooms == pytest.approx(SPACING)
    nifti, itk = tmp_path / "eval_nii", tmp_path / "eval_mha"
    assert run_cli(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--tolerances", "2.5",
                    "--out", str(nifti)]) == 0
    assert run_cli(["evaluate", "--pred", str(mha["pred"]), "--gt", str(mha["gt"]), "--tolerances", "2.5",
                    "--out", str(itk)]) == 0
    rows_nii, rows_mha = read_csv(nifti / "per_case.csv"), read_csv(itk / "per_case.csv")
    assert len(rows_mha) == len(rows_nii) == 9
    for a, b in zip(rows_nii, rows_mha, strict=True):
        assert (a["case"], a["label"]) == (b["case"], b["label"])
        for metric in ("dsc", "nsd"):
            assert float(a[metric]) == pytest.approx(float(b[metric]), nan_ok=True)
