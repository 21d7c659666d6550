"""Statistics of a seeded study: bootstrap intervals over seeds and cases, paired differences, a study summary.

A study scores every test case once per finetuning seed, so each variant's scores form a ``[seeds, cases]`` array.
Two sources of variation matter: which seeds were run and which cases were drawn. The interval used throughout is a
*two-level (crossed) bootstrap*: each replicate resamples the seeds with replacement, then the cases with
replacement, and applies that **one** case draw to every resampled seed, so a case keeps its identity across seeds
(a hard case stays hard in every seed) and the replicate's mean is the mean of the ``seeds x cases`` sub-array it
picks. With one seed it is exactly a plain case bootstrap. Compared with the true sampling variance of the mean, the
crossed bootstrap counts the seed-by-case noise about twice (slightly conservative) and, with very few seeds,
underestimates the seed variance by ``(S - 1) / S`` (slightly liberal); with case effects dominating, as in
segmentation, its coverage is close to nominal (see ``tests/test_stats.py``). Intervals are percentile intervals.

Paired differences (reference minus baseline, matched on seed and case) get the same interval, counts of wins /
losses / ties (higher scores are better, so a *win* is the reference scoring higher), and a two-sided Wilcoxon
signed-rank test over all ``seed x case`` pairs with ``zero_method="wilcox"`` (zero differences are dropped before
ranking, scipy's default). That test treats the pairs as independent although the same case appears once per seed,
so its p-value is optimistic; the bootstrap interval is the figure to read.

Only numpy and scipy are used; everything returned by :func:`summarise_study` is JSON-able (no NaN).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import wilcoxon

__all__ = [
    "Estimate",
    "PairedDifference",
    "bootstrap_ci",
    "bootstrap_means",
    "clean_rows",
    "paired_difference",
    "per_case_means",
    "setting_order",
    "summarise_extras",
    "summarise_study",
]

ROW_KEYS: tuple[str, ...] = ("setting", "variant", "seed", "case")
WILCOXON_ZERO_METHOD = "wilcox"


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap percentile interval.

    Attributes:
        mean: Mean of the finite values of the ``[seeds, cases]`` array.
        low: Lower end of the percentile interval.
        high: Upper end of the percentile interval.
        n_seeds: Number of seeds (rows of the array).
        n_cases: Number of cases (columns of the array).
        n_missing: Cells that were NaN and left out.
    """

    mean: float
    low: float
    high: float
    n_seeds: int
    n_cases: int
    n_missing: int = 0


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over matched (seed, case) pairs, its bootstrap interval and a Wilcoxon signed-rank test.

    Attributes:
        mean: Mean difference over the pairs where both sides are finite.
        low: Lower end of the percentile interval of the mean difference.
        high: Upper end of the percentile interval.
        n_seeds: Number of seeds.
        n_cases: Number of cases.
        n_pairs: Pairs with both sides finite (those the test and the counts use).
        wins: Pairs with ``a > b``.
        losses: Pairs with ``a < b``.
        ties: Pairs with ``a == b``.
        p_value: Two-sided Wilcoxon signed-rank p-value (1.0 when every difference is zero).
        statistic: The Wilcoxon statistic as scipy reports it (0.0 when every difference is zero).
    """

    mean: float
    low: float
    high: float
    n_seeds: int
    n_cases: int
    n_pairs: int
    wins: int
    losses: int
    ties: int
    p_value: float
    statistic: float


# ----------------------------------------------------------------------------------------------------------------
# bootstrap and paired differences
# ----------------------------------------------------------------------------------------------------------------
def _as_matrix(values_sc: Any, name: str = "values") -> np.ndarray:
    array = np.asarray(values_sc, dtype=float)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty [seeds, cases] array, got shape {array.shape}")
    if not np.isfinite(array).any():
        raise ValueError(f"{name} has no finite value")
    return array


def _check_args(n_boot: int, level: float = 0.95) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def _draw_counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """How often each of ``n`` items is drawn in each replicate: ``[n_boot, n]`` counts summing to ``n`` per row."""
    draws = rng.integers(0, n, size=(n_boot, n))
    flat = (draws + n * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(float)


def bootstrap_means(values_sc: Any, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Replicate means of the two-level bootstrap (see the module docstring), vectorised over replicates.

    The seeds are drawn first (``rng.integers(0, n_seeds, (n_boot, n_seeds))``, skipped when there is one seed),
    then the cases (``rng.integers(0, n_cases, (n_boot, n_cases))``), from ``numpy.random.default_rng(seed)``.
    NaN cells are missing: a replicate's mean is over the finite cells it draws (NaN if it draws none).

    Args:
        values_sc: ``[seeds, cases]`` array (a 1-D array is one seed).
        n_boot: Number of replicates.
        seed: Seed of the random generator.

    Returns:
        ``[n_boot]`` replicate means.
    """
    values = _as_matrix(values_sc)
    _check_args(n_boot)
    rng = np.random.default_rng(seed)
    n_seeds, n_cases = values.shape
    seeds = _draw_counts(rng, n_seeds, n_boot) if n_seeds > 1 else np.ones((n_boot, 1))
    cases = _draw_counts(rng, n_cases, n_boot)
    valid = np.isfinite(values)
    total = ((seeds @ np.where(valid, values, 0.0)) * cases).sum(axis=1)
    count = ((seeds @ valid.astype(float)) * cases).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def bootstrap_ci(values_sc: Any, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of a ``[seeds, cases]`` array and its two-level bootstrap percentile interval.

    Args:
        values_sc: Scores, one row per seed and one column per case (same case order in every row); NaN cells are
            left out. A 1-D array is one seed, and then this is a plain case bootstrap.
        n_boot: Number of bootstrap replicates.
        level: Coverage of the interval, e.g. 0.95.
        seed: Seed of the random generator; the result is deterministic for a seed.

    Returns:
        The :class:`Estimate`.

    Raises:
        ValueError: for an empty array, one without a finite value, ``n_boot < 1`` or ``level`` outside (0, 1).
    """
    values = _as_matrix(values_sc)
    _check_args(n_boot, level)
    means = bootstrap_means(values, n_boot, seed)
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(means, [alpha, 1.0 - alpha])
    return Estimate(mean=float(np.nanmean(values)), low=float(low), high=float(high), n_seeds=values.shape[0],
                    n_cases=values.shape[1], n_missing=int((~np.isfinite(values)).sum()))


def paired_difference(a_sc: Any, b_sc: Any, n_boot: int = 2000, level: float = 0.95, seed: int = 0
                      ) -> PairedDifference:
    """Differences ``a - b`` per (seed, case), their mean with the two-level bootstrap interval, and a Wilcoxon test.

    The test is ``scipy.stats.wilcoxon`` (two-sided, ``zero_method="wilcox"``: zero differences are dropped, as
    scipy recommends by default) on the finite differences in row-major (seed, then case) order. When every
    difference is zero the test is undefined and ``p_value`` is 1.0.

    Args:
        a_sc: ``[seeds, cases]`` scores of the reference.
        b_sc: ``[seeds, cases]`` scores of the baseline, same seeds and cases in the same order.
        n_boot: Number of bootstrap replicates.
        level: Coverage of the interval.
        seed: Seed of the random generator.

    Returns:
        The :class:`PairedDifference`.

    Raises:
        ValueError: when the shapes differ or no pair has both sides finite.
    """
    a, b = _as_matrix(a_sc, "a"), _as_matrix(b_sc, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    diff = a - b
    finite = diff[np.isfinite(diff)]
    if finite.size == 0:
        raise ValueError("no (seed, case) pair has both scores finite")
    estimate = bootstrap_ci(diff, n_boot=n_boot, level=level, seed=seed)
    if np.any(finite != 0):
        result = wilcoxon(finite, zero_method=WILCOXON_ZERO_METHOD, alternative="two-sided")
        p_value, statistic = float(result.pvalue), float(result.statistic)
    else:
        p_value, statistic = 1.0, 0.0
    return PairedDifference(mean=estimate.mean, low=estimate.low, high=estimate.high, n_seeds=a.shape[0],
                            n_cases=a.shape[1], n_pairs=int(finite.size), wins=int((finite > 0).sum()),
                            losses=int((finite < 0).sum()), ties=int((finite == 0).sum()), p_value=p_value,
                            statistic=statistic)


# ----------------------------------------------------------------------------------------------------------------
# study rows
# ----------------------------------------------------------------------------------------------------------------
def setting_order(settings: Iterable[str]) -> list[str]:
    """Distinct settings in report order: ``"all"`` first, then numbers ascending, then the rest alphabetically."""
    def key(s: str) -> tuple[int, float, str]:
        if s == "all":
            return (0, 0.0, s)
        return (1, float(s), s) if s.isdigit() else (2, 0.0, s)

    return sorted(set(settings), key=key)


def clean_rows(rows: Iterable[Mapping[str, Any]], metrics: Sequence[str] = ("dsc", "nsd")
               ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Check and normalise study rows; count the NaN scores (they stay NaN and are left out downstream).

    Args:
        rows: ``{"setting", "variant", "seed", "case", <metric>...}`` mappings.
        metrics: Score columns every row must have.

    Returns:
        ``(rows, nan_counts)``: rows with ``setting`` / ``variant`` / ``case`` as str, ``seed`` as int and the metrics
        as floats, and the number of NaN values per metric.

    Raises:
        ValueError: for no rows, no metric, a metric no row has, a row lacking a key, or two rows with the same
            (setting, variant, seed, case).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no study rows given")
    if not metrics:
        raise ValueError("no metric given")
    for metric in metrics:
        if not any(metric in row for row in rows):
            raise ValueError(f"unknown metric {metric!r}: the rows have {sorted(set(rows[0]) - set(ROW_KEYS))}")
    out, seen, nan_counts = [], set(), dict.fromkeys(metrics, 0)
    for i, row in enumerate(rows):
        missing = [k for k in (*ROW_KEYS, *metrics) if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks {missing}: {dict(row)}")
        clean = {"setting": str(row["setting"]), "variant": str(row["variant"]), "seed": int(row["seed"]),
                 "case": str(row["case"])}
        key = tuple(clean.values())
        if key in seen:
            raise ValueError(f"duplicate row for setting={key[0]!r}, variant={key[1]!r}, seed={key[2]}, "
                             f"case={key[3]!r}")
        seen.add(key)
        for metric in metrics:
            value = math.nan if row[metric] is None else float(row[metric])
            nan_counts[metric] += math.isnan(value)
            clean[metric] = value
        out.append(clean)
    return out, nan_counts


def _variant_matrices(rows: list[dict[str, Any]], setting: str, metrics: Sequence[str]
                      ) -> tuple[list[int], dict[str, list[str]], dict[str, dict[str, np.ndarray]]]:
    """Seeds, per-variant case lists and ``[seeds, cases]`` arrays of one setting; checks completeness."""
    cells: dict[str, dict[tuple[int, str], dict[str, Any]]] = {}
    for row in rows:
        if row["setting"] == setting:
            cells.setdefault(row["variant"], {})[(row["seed"], row["case"])] = row
    seeds = sorted({seed for by_key in cells.values() for seed, _ in by_key})
    cases: dict[str, list[str]] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for variant, by_key in cells.items():
        lacking = sorted(set(seeds) - {seed for seed, _ in by_key})
        if lacking:
            raise ValueError(f"setting {setting!r}: variant {variant!r} lacks seed(s) {lacking} that other "
                             f"variants of this setting have")
        cases[variant] = sorted({case for _, case in by_key})
        holes = [(s, c) for s in seeds for c in cases[variant] if (s, c) not in by_key]
        if holes:
            raise ValueError(f"setting {setting!r}: variant {variant!r} lacks (seed, case) {holes[:10]}"
                             f"{' ...' if len(holes) > 10 else ''}")
        arrays[variant] = {m: np.array([[by_key[(s, c)][m] for c in cases[variant]] for s in seeds])
                           for m in metrics}
    return seeds, cases, arrays


def _check_matched(setting: str, reference: str, baseline: str, cases: dict[str, list[str]]) -> None:
    only_ref = sorted(set(cases[reference]) - set(cases[baseline]))
    only_base = sorted(set(cases[baseline]) - set(cases[reference]))
    if only_ref or only_base:
        raise ValueError(f"setting {setting!r}: rows of {reference!r} and {baseline!r} do not pair on (seed, case); "
                         f"cases only in {reference!r}: {only_ref}, only in {baseline!r}: {only_base}")


def summarise_study(rows: Iterable[Mapping[str, Any]], reference: str = "AnatoMask",
                    baselines: Sequence[str] = ("SparK", "scratch"), metrics: Sequence[str] = ("dsc", "nsd"),
                    n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Per setting: an :class:`Estimate` per variant and metric, and paired differences reference - each baseline.

    Args:
        rows: Per-case rows ``{"setting", "variant", "seed", "case", "dsc", "nsd"}`` (see the module docstring);
            NaN scores are left out and counted.
        reference: The variant the differences start from.
        baselines: Variants subtracted from the reference, where present in a setting.
        metrics: Score columns to summarise.
        n_boot: Bootstrap replicates per interval.
        seed: Seed of every bootstrap (each interval uses the same seed, so it is reproducible on its own).
        level: Coverage of the intervals.

    Returns:
        A JSON-able dict: ``reference``, ``baselines`` (those present somewhere), ``metrics``, ``n_boot``, ``seed``,
        ``level``, ``nan_dropped`` (per metric), ``settings`` in report order, and ``per_setting[setting]`` with
        ``seeds``, ``variants`` (in first-appearance order), ``n_cases`` per variant, ``estimates[variant][metric]``
        and ``differences[metric][baseline]`` (dataclasses as dicts; empty where the reference is absent).

    Raises:
        ValueError: for empty input, an unknown metric, a reference absent from every setting, a variant missing a
            seed or a (seed, case) in a setting, duplicate rows, or unpaired rows between reference and a baseline.
    """
    _check_args(n_boot, level)
    clean, nan_counts = clean_rows(rows, metrics)
    if not any(row["variant"] == reference for row in clean):
        raise ValueError(f"reference variant {reference!r} is in no row; variants: "
                         f"{sorted({row['variant'] for row in clean})}")
    variant_order = list(dict.fromkeys(row["variant"] for row in clean))
    settings = setting_order(row["setting"] for row in clean)
    per_setting: dict[str, Any] = {}
    for setting in settings:
        seeds, cases, arrays = _variant_matrices(clean, setting, metrics)
        variants = [v for v in variant_order if v in arrays]
        boot = {"n_boot": n_boot, "level": level, "seed": seed}
        estimates = {v: {m: _named(f"{setting}/{v}/{m}", bootstrap_ci, arrays[v][m], **boot) for m in metrics}
                     for v in variants}
        present = [b for b in baselines if b in arrays and b != reference] if reference in arrays else []
        for baseline in present:
            _check_matched(setting, reference, baseline, cases)
        differences = {m: {b: _named(f"{setting}/{reference}-{b}/{m}", paired_difference, arrays[reference][m],
                                     arrays[b][m], **boot) for b in present} for m in metrics}
        per_setting[setting] = {"seeds": seeds, "variants": variants, "n_cases": {v: len(cases[v]) for v in variants},
                                "estimates": estimates, "differences": differences}
    present_anywhere = [b for b in baselines if any(b in s["variants"] for s in per_setting.values())]
    return {"reference": reference, "baselines": present_anywhere, "metrics": list(metrics), "n_boot": int(n_boot),
            "seed": int(seed), "level": float(level), "nan_dropped": nan_counts, "settings": settings,
            "per_setting": per_setting}


def _named(where: str, function, *args, **kwargs) -> dict[str, Any]:
    """Call ``bootstrap_ci`` / ``paired_difference`` and return the result as a dict; errors name ``where``."""
    try:
        return asdict(function(*args, **kwargs))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error


# ----------------------------------------------------------------------------------------------------------------
# helpers for reports
# ----------------------------------------------------------------------------------------------------------------
def per_case_means(rows: Iterable[Mapping[str, Any]], metric: str = "dsc") -> dict[str, dict[str, dict[str, float]]]:
    """``{setting: {variant: {case: mean over seeds}}}`` of a metric, NaN scores left out (all-NaN cases dropped)."""
    sums: dict[tuple[str, str, str], list[float]] = {}
    for row in clean_rows(rows, (metric,))[0]:
        if not math.isnan(row[metric]):
            sums.setdefault((row["setting"], row["variant"], row["case"]), []).append(row[metric])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (setting, variant, case), values in sums.items():
        out.setdefault(setting, {}).setdefault(variant, {})[case] = float(np.mean(values))
    return {s: out[s] for s in setting_order(out)}


def summarise_extras(extras: Mapping[str, Mapping[Any, float]], n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per-seed scalars (e.g. a teacher's ranking ROC AUC): mean, SD, a bootstrap interval over seeds, the values.

    Args:
        extras: ``{name: {seed: value}}``; NaN or None values are left out and counted.
        n_boot: Bootstrap replicates.
        level: Coverage of the interval.
        seed: Seed of the bootstrap.

    Returns:
        ``{name: {"mean", "sd", "low", "high", "n_seeds", "n_missing", "values"}}`` where ``sd`` (``ddof=1``) is
        None with one value and ``values`` maps ``str(seed)`` to the value (None for a missing one).

    Raises:
        ValueError: when a quantity has no finite value.
    """
    out = {}
    for name, by_seed in extras.items():
        values = {str(s): (None if v is None or math.isnan(float(v)) else float(v)) for s, v in by_seed.items()}
        finite = np.array([v for v in values.values() if v is not None], dtype=float)
        if finite.size == 0:
            raise ValueError(f"extra {name!r} has no finite value")
        estimate = bootstrap_ci(finite[:, None], n_boot=n_boot, level=level, seed=seed)
        out[name] = {"mean": estimate.mean, "sd": float(finite.std(ddof=1)) if finite.size > 1 else None,
                     "low": estimate.low, "high": estimate.high, "n_seeds": int(finite.size),
                     "n_missing": len(values) - int(finite.size), "values": values}
    return out
