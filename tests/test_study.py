"""The study at smoke scale: the whole grid runs, every test case is scored per seed, the report is written, a
second call resumes without retraining, and low-label draws are shared by the variants of one seed."""

from __future__ import annotations

import json

import pytest

from anatomask_lab.config import finetune_config
from anatomask_lab.data.dataset import DatasetInfo
from anatomask_lab.finetune import training_cases
from anatomask_lab.study import StudyConfig, run_study

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_study_grid_report_and_resume(tiny_dataset, tmp_path):
    cfg = StudyConfig(data_dir=str(tiny_dataset), out_dir=str(tmp_path / "study"), seeds=(0, 1),
                      settings=("all", "2"), patch=64, pretrain_epochs=1, pretrain_iters=1, finetune_epochs=1,
                      finetune_iters=1, ranking_patches=2, tolerance_mm=4.0)
    files = run_study(cfg, command="pytest", progress=False)
    study = json.loads(files["json"].read_text())
    n_test = len(DatasetInfo.read(tiny_dataset).split("test"))
    rows = study["rows"]
    assert len(rows) == 2 * 2 * 3 * n_test  # seeds x settings x variants x test cases
    assert {(r["seed"], r["setting"], r["variant"]) for r in rows} == {
        (s, st, v) for s in (0, 1) for st in ("all", "2") for v in ("scratch", "SparK", "AnatoMask")}
    assert all(0.0 <= r["dsc"] <= 1.0 for r in rows if r["dsc"] is not None)
    diffs = study["summary"]["per_setting"]["all"]["differences"]["dsc"]
    assert set(diffs) == {"SparK", "scratch"} and diffs["SparK"]["n_pairs"] == 2 * n_test
    assert set(study["extras"]) == {"ranking_auc_normalised", "ranking_auc_raw"}
    text = files["markdown"].read_text()
    assert "AnatoMask − SparK" in text and "study_boxplot.svg" in text and files["svg"].is_file()
    assert "## Learning curves" in text and "AnatoMask teacher" in text
    # a second call reuses every finished cell
    ckpt = tmp_path / "study" / "seed0" / "labels_2" / "scratch" / "finetune" / "checkpoints" / "last.pt"
    mtime = ckpt.stat().st_mtime_ns
    again = json.loads(run_study(cfg, command="pytest", progress=False)["json"].read_text())
    assert ckpt.stat().st_mtime_ns == mtime and again["rows"] == rows


def test_low_label_draw_is_per_seed_and_shared(tiny_dataset):
    info = DatasetInfo.read(tiny_dataset)
    draw = {seed: training_cases(info, finetune_config("tiny", data_dir=str(tiny_dataset), labelled_cases=2,
                                                        seed=seed, init=init))
            for seed in (0, 1, 2) for init in ("scratch", "runs/x")}
    assert all(len(d) == 2 and set(d) <= set(info.split("train")) for d in draw.values())
    assert len({tuple(d) for d in draw.values()}) > 1  # seeds draw different cases
    with pytest.raises(ValueError, match="has only"):
        training_cases(info, finetune_config("tiny", data_dir=str(tiny_dataset), labelled_cases=99))


def test_bad_study_configs():
    for bad in ({"variants": ("scratch", "SparK")}, {"variants": ("AnatoMask", "nope")}, {"settings": ("x",)},
                {"seeds": (1, 1)}, {"patch": 48}):
        with pytest.raises(ValueError):
            StudyConfig(data_dir="d", out_dir="o", **bad)
