"""The main job end to end at smoke scale: data -> pretrain x2 -> finetune x3 -> predict -> evaluate -> report."""

from __future__ import annotations

import json
import re

import pytest

from anatomask_lab.demo import run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_demo_quick_writes_report(tmp_path):
    report = run_demo(tmp_path / "demo", cases=6, pretrain_epochs=1, pretrain_iters=1, finetune_epochs=1,
                      finetune_iters=1, notebooks=False, quick=True)
    text = (report / "README.md").read_text()
    for name in ("scratch", "SparK", "AnatoMask"):
        assert f"| {name} |" in text
    comparison = json.loads((report / "comparison.json").read_text())
    assert set(comparison["runs"]) == {"scratch", "SparK", "AnatoMask"}
    assert (report / "dsc_boxplot.html").stat().st_size > 0
    timings = json.loads((report / "timings.json").read_text())
    assert timings["unit_s"] > 0 and timings["steps"][1]["step"].startswith("phantom cohort")
    assert all(t["seconds"] >= 0 for t in timings["steps"])
    assert "tiny SparK steps" in text and "What one seed can and cannot show" in text
    paired = (report / "paired.md").read_text()
    n_test = len(comparison["dsc_per_case"]["scratch"])
    assert paired.count("\n| ") == n_test and "AnatoMask − SparK" in paired  # one row per test case
    for html_file in [report / "curves.html", report / "dsc_boxplot.html"]:
        page = html_file.read_text()
        assert "plotly" in page and not re.search(r"<script[^>]+src=[\"']https?:", page)  # offline
    # a second call reuses the finished runs instead of training again
    mtime = (tmp_path / "demo" / "runs" / "pretrain_anatomask" / "checkpoints" / "last.pt").stat().st_mtime
    run_demo(tmp_path / "demo", cases=6, pretrain_epochs=1, pretrain_iters=1, finetune_epochs=1, finetune_iters=1,
             notebooks=False, quick=True)
    assert (tmp_path / "demo" / "runs" / "pretrain_anatomask" / "checkpoints" / "last.pt").stat().st_mtime == mtime
