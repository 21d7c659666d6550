"""Bootstrap intervals, paired differences and the study summary (anatomask_lab.stats)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from anatomask_lab.stats import (
    Estimate,
    bootstrap_ci,
    bootstrap_means,
    clean_rows,
    paired_difference,
    per_case_means,
    setting_order,
    summarise_extras,
    summarise_study,
)

BASE = {"scratch": 0.60, "SparK": 0.65, "AnatoMask": 0.70}
OFFSET = {"all": 0.10, "2": -0.10}


def study_rows(n_seeds: int = 3, n_cases: int = 8, settings=("all", "2"), variants=tuple(BASE)) -> list[dict]:
    """Synthetic rows: dsc = base + setting offset + case effect + seed effect, nsd = dsc + 0.1 (clipped)."""
    rows = []
    for setting in settings:
        for variant in variants:
            for seed in range(n_seeds):
                for c in range(n_cases):
                    dsc = BASE[variant] + OFFSET[setting] + 0.05 * math.sin(c) + 0.01 * (seed - 1)
                    rows.append({"setting": setting, "variant": variant, "seed": seed, "case": f"case_{c:02d}",
                                 "dsc": dsc, "nsd": min(dsc + 0.1, 1.0)})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# bootstrap_ci
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n_seeds", "seed_sd"), [(4, 0.02), (1, 0.0)])
def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate(n_seeds, seed_sd):
    rng = np.random.default_rng(100)
    hits = 0
    for replicate in range(200):  # seed effect + case effect (dominant, as in segmentation) + noise
        values = (0.7 + rng.normal(0, seed_sd, (n_seeds, 1)) + rng.normal(0, 0.1, (1, 24))
                  + rng.normal(0, 0.03, (n_seeds, 24)))
        estimate = bootstrap_ci(values, n_boot=1000, seed=replicate)
        hits += estimate.low <= 0.7 <= estimate.high
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_ci_is_deterministic_for_a_seed_and_fills_the_estimate():
    values = np.random.default_rng(0).uniform(size=(3, 10))
    a, b = bootstrap_ci(values, n_boot=500, seed=7), bootstrap_ci(values, n_boot=500, seed=7)
    assert a == b and isinstance(a, Estimate)
    assert bootstrap_ci(values, n_boot=500, seed=8) != a
    assert a.mean == pytest.approx(values.mean()) and a.low < a.mean < a.high
    assert (a.n_seeds, a.n_cases, a.n_missing) == (3, 10, 0)
    with pytest.raises(AttributeError):
        a.mean = 0.0  # frozen


def test_bootstrap_ci_with_one_seed_is_a_plain_case_bootstrap():
    values = np.random.default_rng(1).uniform(size=12)
    estimate = bootstrap_ci(values[None, :], n_boot=800, level=0.9, seed=3)
    idx = np.random.default_rng(3).integers(0, 12, size=(800, 12))
    plain = values[idx].mean(axis=1)
    assert np.allclose(bootstrap_means(values, 800, 3), plain, atol=1e-12)
    assert estimate.low == pytest.approx(np.quantile(plain, 0.05), abs=1e-12)
    assert estimate.high == pytest.approx(np.quantile(plain, 0.95), abs=1e-12)
    assert bootstrap_ci(values, n_boot=800, level=0.9, seed=3) == estimate  # 1-D = one seed


def test_one_case_draw_is_shared_by_the_seeds():
    """Identical seeds add no information: the interval stays as wide as one seed's (independent draws would shrink
    it by about sqrt(seeds))."""
    cases = np.random.default_rng(2).normal(0.7, 0.1, 20)
    one = bootstrap_ci(cases, n_boot=4000, seed=0)
    four = bootstrap_ci(np.tile(cases, (4, 1)), n_boot=4000, seed=0)
    assert four.high - four.low == pytest.approx(one.high - one.low, rel=0.15)


def test_bootstrap_ci_leaves_nan_cells_out_and_counts_them():
    values = np.array([[0.5, np.nan, 0.7], [0.6, 0.8, np.nan]])
    estimate = bootstrap_ci(values, n_boot=300)
    assert estimate.mean == pytest.approx(np.nanmean(values)) and estimate.n_missing == 2
    assert math.isfinite(estimate.low) and math.isfinite(estimate.high)


@pytest.mark.parametrize(("values", "kwargs", "match"), [
    (np.zeros((0, 3)), {}, "non-empty"),
    (np.full((2, 2), np.nan), {}, "no finite"),
    (np.ones((2, 2, 2)), {}, r"\[seeds, cases\]"),
    (np.ones((2, 2)), {"level": 1.0}, "level"),
    (np.ones((2, 2)), {"n_boot": 0}, "n_boot"),
])
def test_bootstrap_ci_errors(values, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(values, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# paired_difference
# ----------------------------------------------------------------------------------------------------------------
def test_paired_difference_matches_scipy_and_detects_a_consistent_shift():
    rng = np.random.default_rng(4)
    b = rng.uniform(0.4, 0.9, size=(3, 10))
    a = b + 0.03 + rng.normal(0, 0.01, size=b.shape)
    d = paired_difference(a, b, n_boot=500)
    assert d.p_value == pytest.approx(wilcoxon((a - b).ravel(), zero_method="wilcox").pvalue)
    assert d.p_value < 1e-4 and d.low > 0 and d.mean == pytest.approx((a - b).mean())
    assert (d.n_pairs, d.wins + d.losses + d.ties, d.n_seeds, d.n_cases) == (30, 30, 3, 10)

    noise = b + rng.normal(0, 0.02, size=b.shape)
    null = paired_difference(noise, b, n_boot=500)
    assert null.p_value == pytest.approx(wilcoxon((noise - b).ravel(), zero_method="wilcox").pvalue)
    assert null.p_value > 0.05 and null.low < 0 < null.high


def test_paired_difference_ties_nan_pairs_and_all_zero():
    a = np.array([[0.5, 0.6, 0.7, np.nan], [0.5, 0.9, 0.2, 0.4]])
    b = np.array([[0.5, 0.5, 0.8, 0.3], [0.4, 0.8, 0.1, 0.3]])
    d = paired_difference(a, b, n_boot=200)
    assert (d.n_pairs, d.wins, d.losses, d.ties) == (7, 5, 1, 1)
    finite = (a - b)[np.isfinite(a - b)]
    assert d.p_value == pytest.approx(wilcoxon(finite, zero_method="wilcox").pvalue)
    same = paired_difference(b, b, n_boot=200)
    assert (same.p_value, same.ties, same.mean, same.low, same.high) == (1.0, 8, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="shape"):
        paired_difference(a, b[:, :3])


# ----------------------------------------------------------------------------------------------------------------
# summarise_study
# ----------------------------------------------------------------------------------------------------------------
def test_summarise_study_means_pairs_and_order():
    rows = study_rows()
    summary = summarise_study(rows, n_boot=300)
    json.dumps(summary, allow_nan=False)  # JSON-able, no NaN
    assert summary["settings"] == ["all", "2"] and summary["baselines"] == ["SparK", "scratch"]
    for setting in ("all", "2"):
        block = summary["per_setting"][setting]
        assert block["seeds"] == [0, 1, 2] and block["variants"] == list(BASE)
        for variant in BASE:
            expected = np.mean([r["dsc"] for r in rows if r["setting"] == setting and r["variant"] == variant])
            estimate = block["estimates"][variant]["dsc"]
            assert estimate["mean"] == pytest.approx(expected)
            assert (estimate["n_seeds"], estimate["n_cases"]) == (3, 8)
        for baseline in ("SparK", "scratch"):
            d = block["differences"]["dsc"][baseline]
            assert d["mean"] == pytest.approx(BASE["AnatoMask"] - BASE[baseline])
            assert (d["n_pairs"], d["wins"], d["losses"]) == (24, 24, 0)


def test_summarise_study_drops_nan_with_a_count():
    rows = study_rows()
    rows[0]["dsc"], rows[1]["nsd"], rows[2]["dsc"] = math.nan, None, math.nan
    summary = summarise_study(rows, n_boot=100)
    assert summary["nan_dropped"] == {"dsc": 2, "nsd": 1}
    assert summary["per_setting"]["all"]["estimates"]["scratch"]["dsc"]["n_missing"] == 2
    assert summary["per_setting"]["all"]["differences"]["dsc"]["scratch"]["n_pairs"] == 22


def _without(rows, **match):
    return [r for r in rows if not all(r[k] == v for k, v in match.items())]


@pytest.mark.parametrize(("make", "kwargs", "match"), [
    (lambda: [], {}, "no study rows"),
    (study_rows, {"metrics": ("dsc", "hd95")}, "unknown metric 'hd95'"),
    (lambda: _without(study_rows(), setting="2", variant="SparK", seed=2), {},
     r"setting '2': variant 'SparK' lacks seed\(s\) \[2\]"),
    (lambda: _without(study_rows(), setting="all", variant="scratch", seed=1, case="case_03"), {},
     r"'scratch' lacks \(seed, case\) \[\(1, 'case_03'\)\]"),
    (lambda: _without(study_rows(), variant="SparK", case="case_05"), {},
     r"'AnatoMask' and 'SparK' do not pair.*only in 'AnatoMask': \['case_05'\]"),
    (lambda: study_rows() + study_rows()[:1], {}, "duplicate row for setting='all', variant='scratch', seed=0"),
    (study_rows, {"reference": "MAE"}, "reference variant 'MAE' is in no row"),
    (lambda: [{k: v for k, v in r.items() if k != "case"} for r in study_rows()], {}, r"row 0 lacks \['case'\]"),
    (lambda: [dict(r, dsc=math.nan) if r["variant"] == "SparK" else r for r in study_rows()], {},
     "all/SparK/dsc: values has no finite value"),
])
def test_summarise_study_errors_are_named(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        summarise_study(make(), n_boot=50, **kwargs)


def test_summarise_study_without_reference_in_a_setting_and_extra_variants():
    rows = _without(study_rows(), setting="2", variant="AnatoMask")
    rows += [dict(r, variant="AnatoMask-no-anatomy") for r in study_rows(settings=("all",), variants=("SparK",))]
    summary = summarise_study(rows, n_boot=50)
    assert summary["per_setting"]["2"]["differences"] == {"dsc": {}, "nsd": {}}
    assert summary["per_setting"]["all"]["variants"][-1] == "AnatoMask-no-anatomy"


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def test_setting_order_clean_rows_and_per_case_means():
    assert setting_order(["4", "all", "16", "2", "x", "4"]) == ["all", "2", "4", "16", "x"]
    rows, counts = clean_rows([{"setting": 2, "variant": "a", "seed": "1", "case": 3, "dsc": "0.5", "nsd": None}])
    assert rows == [{"setting": "2", "variant": "a", "seed": 1, "case": "3", "dsc": 0.5, "nsd": rows[0]["nsd"]}]
    assert math.isnan(rows[0]["nsd"]) and counts == {"dsc": 0, "nsd": 1}
    means = per_case_means(study_rows(), "dsc")
    assert list(means) == ["all", "2"]
    assert means["all"]["SparK"]["case_01"] == pytest.approx(0.65 + 0.10 + 0.05 * math.sin(1))


def test_summarise_extras():
    out = summarise_extras({"auc": {0: 0.8, 1: 0.9, 2: float("nan")}, "one": {5: 0.5}}, n_boot=200)
    json.dumps(out, allow_nan=False)
    assert out["auc"]["mean"] == pytest.approx(0.85) and out["auc"]["sd"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert (out["auc"]["n_seeds"], out["auc"]["n_missing"], out["auc"]["values"]["2"]) == (2, 1, None)
    assert 0.8 <= out["auc"]["low"] <= out["auc"]["high"] <= 0.9
    assert out["one"]["sd"] is None and out["one"]["low"] == out["one"]["high"] == 0.5
    with pytest.raises(ValueError, match="'none' has no finite value"):
        summarise_extras({"none": {0: None}})
