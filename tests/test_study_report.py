"""The study report (anatomask_lab.study_report) and the SVG box plots (anatomask_lab.svg_plots)."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from anatomask_lab.atomic import TMP_GLOB
from anatomask_lab.stats import summarise_study
from anatomask_lab.study_report import setting_label, study_markdown, write_study_report
from anatomask_lab.svg_plots import box_plot_panels_svg, box_plot_svg, box_stats, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"
META = {"command": "anatomask-lab study --seeds 3", "machine": "CPU, 2 cores", "date": "2025-01-01",
        "data": "phantom (8 test cases)", "seeds": [0, 1, 2], "versions": {"torch": "2.5"}}


def make_rows(shift: float = 0.03, n_seeds: int = 3, n_cases: int = 8) -> list[dict]:
    """3 variants x 2 settings x seeds x cases; AnatoMask beats SparK by ``shift`` plus noise."""
    rng = np.random.default_rng(0)
    base = {"scratch": 0.55, "SparK": 0.65, "AnatoMask": 0.65 + shift}
    rows = []
    for setting, offset in (("all", 0.1), ("2", -0.1)):
        for variant, b in base.items():
            for seed in range(n_seeds):
                for c in range(n_cases):
                    dsc = float(np.clip(b + offset + 0.05 * math.sin(c) + rng.normal(0, 0.02), 0, 1))
                    rows.append({"setting": setting, "variant": variant, "seed": seed, "case": f"case_{c:02d}",
                                 "dsc": dsc, "nsd": float(np.clip(dsc + 0.1 + rng.normal(0, 0.02), 0, 1))})
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    rows = make_rows()
    rows[3]["nsd"] = math.nan
    summary = summarise_study(rows, n_boot=300)
    extras = {"ranking_auc_normalised": {0: 0.81, 1: 0.84, 2: 0.79}, "ranking_auc_raw": {0: 0.7, 1: 0.72, 2: 0.69}}
    out = tmp_path_factory.mktemp("study")
    paths = write_study_report(rows, summary, out, META, extras)
    return rows, summary, out, paths


def _pct(e, signed=False):
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * e['mean'])} [{f.format(100 * e['low'])}, {f.format(100 * e['high'])}]"


# ----------------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------------
def test_report_files_exist_atomically(report):
    _, _, out, paths = report
    assert set(paths) == {"json", "markdown", "svg", "svg_nsd", "html"}
    assert {p.name for p in paths.values()} == {"study.json", "study.md", "study_boxplot.svg",
                                                "study_boxplot_nsd.svg", "study_boxplot.html"}
    assert all(p.is_file() and p.parent == out for p in paths.values())
    assert not list(out.glob(TMP_GLOB))


def test_markdown_has_the_tables_and_the_summary_numbers(report):
    _, summary, _, paths = report
    text = paths["markdown"].read_text()
    assert "`anatomask-lab study --seeds 3`" in text and "phantom (8 test cases)" in text
    assert "| Variant | DSC mean [95% CI] (%) | NSD mean [95% CI] (%) | n (seeds × cases) |" in text
    for setting in ("all", "2"):
        block = summary["per_setting"][setting]
        assert f"## Setting: {setting_label(setting)}" in text
        for variant in ("scratch", "SparK", "AnatoMask"):
            e = block["estimates"][variant]
            assert f"| {variant} | {_pct(e['dsc'])} | {_pct(e['nsd'])} | 3 × 8 |" in text
        for baseline in ("SparK", "scratch"):
            d = block["differences"]["dsc"][baseline]
            assert f"| AnatoMask − {baseline} | DSC | {_pct(d, signed=True)} | {d['wins']} / {d['losses']} / " \
                   f"{d['ties']} |" in text
    assert "![Per-case DSC (mean over seeds) by setting and variant](study_boxplot.svg)" in text
    assert "NaN scores left out: NSD 1." in text
    assert "| ranking_auc_normalised | 0.813 ± 0.025 |" in text and "0: 0.810, 1: 0.840, 2: 0.790" in text
    assert "## How to read this" in text and "synthetic phantoms" in text and "CPU-scale" in text
    assert "3 per setting" in text and "test cases (8)" in text


def test_json_holds_meta_summary_extras_and_rows_without_nan(report):
    rows, summary, _, paths = report
    document = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert document["meta"]["command"] == META["command"] and document["meta"]["seeds"] == [0, 1, 2]
    assert document["summary"]["per_setting"]["all"]["estimates"] == summary["per_setting"]["all"]["estimates"]
    assert document["extras"]["ranking_auc_raw"]["n_seeds"] == 3
    assert len(document["rows"]) == len(rows) and document["rows"][3]["nsd"] is None


def test_svg_parses_with_one_box_per_group(report):
    _, summary, _, paths = report
    root = ET.fromstring(paths["svg"].read_text())
    assert root.tag == f"{SVG}svg"
    boxes = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "box"]
    assert len(boxes) == sum(len(summary["per_setting"][s]["variants"]) for s in summary["settings"]) == 6


def test_html_is_offline(report):
    html = report[3]["html"].read_text()
    assert "plotly" in html.lower() and len(html) > 1_000_000  # plotly.js inlined
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", html, re.IGNORECASE)


def test_how_to_read_follows_the_numbers_either_way(tmp_path):
    clear = summarise_study(make_rows(shift=0.08), n_boot=300)
    text = study_markdown(clear, {"data": "AMOS22 validation", "machine": "H200"})
    assert "scored higher than SparK" in text and "The interval includes 0" not in text
    assert "AMOS22 validation" in text and "phantom" not in text and "CPU-scale" not in text

    none = summarise_study(make_rows(shift=0.0), n_boot=300)
    d = none["per_setting"]["all"]["differences"]["dsc"]["SparK"]
    assert d["low"] < 0 < d["high"]
    text = study_markdown(none, {})
    assert "AnatoMask − SparK = " + _pct(d, signed=True) + " pp. The interval includes 0" in text
    assert "not that they are equal" in text and "does not name the data" in text

    worse = summarise_study(make_rows(shift=-0.08), n_boot=300)
    assert "scored lower than SparK" in study_markdown(worse, {})
    assert "CPU-scale" not in study_markdown(worse, {"machine": "2x EPYC CPU, NVIDIA H200"})
    assert "CPU-scale" in study_markdown(worse, {"machine": "H200 node", "scale": "CPU demo scale"})


def test_report_with_one_seed_and_no_extras(tmp_path):
    rows = make_rows(n_seeds=1)
    paths = write_study_report(rows, summarise_study(rows, n_boot=100), tmp_path, {"title": "One seed"})
    text = paths["markdown"].read_text()
    assert text.startswith("# One seed") and "Per-seed quantities" not in text
    assert "seed-to-seed variation is not measured" in text


# ----------------------------------------------------------------------------------------------------------------
# SVG box plots
# ----------------------------------------------------------------------------------------------------------------
def test_box_stats_match_numpy_and_find_outliers():
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 50.0, float("nan")]
    stats = box_stats(values)
    finite = np.array(values[:-1])
    assert stats["q1"] == pytest.approx(np.percentile(finite, 25))
    assert stats["median"] == pytest.approx(np.median(finite))
    assert stats["q3"] == pytest.approx(np.percentile(finite, 75))
    assert (stats["low"], stats["high"], stats["outliers"], stats["n"]) == (1.0, 6.0, [50.0], 7)
    assert box_stats([float("nan")]) is None


def test_nice_ticks():
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 100) == [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
    assert nice_ticks(0.5, 0.9)[0] >= 0.5
    with pytest.raises(ValueError, match="high > low"):
        nice_ticks(1, 1)


def test_box_plot_svg_escapes_text_and_draws_one_box_per_group():
    svg = box_plot_svg({"A<&>": [0.2, 0.4, 0.5, 0.9], "B": [0.6, 0.7, 0.75], "empty": []}, 'T "&" <t>', "DSC")
    root = ET.fromstring(svg)
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "A<&>" in texts and 'T "&" <t>' in texts and "no data" in texts and "n=4" in texts
    assert len([r for r in root.iter(f"{SVG}rect") if r.get("class") == "box"]) == 2
    ticks = [t for t in texts if re.fullmatch(r"[0-9.]+", t or "")]
    assert ticks == ["0", "0.2", "0.4", "0.6", "0.8", "1"]


def test_box_plot_panels_keep_colours_and_reject_empty_input():
    svg = box_plot_panels_svg({"all": {"x": [1, 2, 3], "y": [2, 3]}, "2": {"y": [1, 2], "z": [3]}}, "t", "y",
                              (0, 4))
    boxes = [r for r in ET.fromstring(svg).iter(f"{SVG}rect") if r.get("class") == "box"]
    assert len(boxes) == 4 and boxes[1].get("fill") == boxes[2].get("fill") != boxes[0].get("fill")
    with pytest.raises(ValueError, match="at least one panel"):
        box_plot_panels_svg({"all": {}}, "t", "y")
