"""Summaries and comparison reports of per-case DSC / NSD results, in the paper's format.

A *per-case table* is a list of rows ``{"case", "label", "class", "dsc", "nsd", "tolerance_mm"}`` (one row per case
and class, scores as fractions in ``[0, 1]``, NaN for classes excluded by the empty-case convention), as written by
``anatomask-lab evaluate`` to ``per_case.csv``.

*Patient-wise mean +- SD* (the paper's Tables 4-6): for each case, the mean over its classes (NaN ignored), then the
mean and sample standard deviation (``ddof=1``) of those case means; cases whose classes are all NaN do not count.
*Per-class* mean +- SD: over the cases where the class is not NaN. Tables show percent with one decimal.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FIELDS",
    "case_means",
    "compare_runs",
    "dsc_boxplot",
    "format_pm",
    "mean_sd",
    "read_per_case",
    "summarise",
    "summary_markdown",
    "write_per_case",
    "write_summary",
]

FIELDS: tuple[str, ...] = ("case", "label", "class", "dsc", "nsd", "tolerance_mm")
METRICS: tuple[str, ...] = ("dsc", "nsd")
_HEADERS = {"dsc": "DSC (%)", "nsd": "NSD (%)"}


# ----------------------------------------------------------------------------------------------------------------
# per-case tables
# ----------------------------------------------------------------------------------------------------------------
def _to_float(value: Any) -> float:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return math.nan
    return float(value)


def read_per_case(source: str | Path | Iterable[Mapping[str, Any]] | Any) -> list[dict[str, Any]]:
    """Per-case rows from a CSV path, a data-frame-like object (``to_dict("records")``) or an iterable of mappings.

    Args:
        source: Where the rows come from; needs at least the columns ``case``, ``class``, ``dsc``, ``nsd``.

    Returns:
        Rows with ``dsc`` and ``nsd`` as floats (empty or ``nan`` -> NaN) and ``case`` / ``class`` as strings.
    """
    if isinstance(source, str | Path):
        with open(source, newline="") as handle:
            records = list(csv.DictReader(handle))
        where = str(source)
    else:
        records = list(source.to_dict("records") if hasattr(source, "to_dict") else source)
        where = type(source).__name__
    rows = []
    for index, record in enumerate(records):
        missing = [k for k in ("case", "class", *METRICS) if k not in record]
        if missing:
            raise ValueError(f"{where}: row {index} lacks the columns {missing} (has {sorted(record)})")
        row = dict(record)
        row["case"], row["class"] = str(record["case"]), str(record["class"])
        for key in METRICS:
            row[key] = _to_float(record[key])
        rows.append(row)
    return rows


def write_per_case(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write per-case rows (columns :data:`FIELDS`) to a CSV file; NaN is written as ``nan``."""
    path = Path(path)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------
def mean_sd(values: Iterable[float]) -> dict[str, float]:
    """``{"mean", "sd", "n"}`` of the non-NaN values (sample SD, ``ddof=1``; NaN when fewer than 2 values)."""
    array = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
    mean = float(array.mean()) if array.size else math.nan
    sd = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return {"mean": mean, "sd": sd, "n": int(array.size)}


def case_means(rows: Iterable[Mapping[str, Any]], metric: str) -> dict[str, float]:
    """case -> mean of ``metric`` over the case's classes, ignoring NaN (NaN when all are NaN); first-seen order."""
    per_case: dict[str, list[float]] = {}
    for row in rows:
        per_case.setdefault(row["case"], []).append(row[metric])
    return {case: mean_sd(values)["mean"] for case, values in per_case.items()}


def summarise(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Patient-wise and per-class mean +- SD of DSC and NSD.

    Returns:
        ``{"n_cases": int, "patient_wise": {metric: mean_sd}, "per_class": {class: {metric: mean_sd}}}`` with
        fractions (not percent).
    """
    rows = list(rows)
    per_class: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        entry = per_class.setdefault(row["class"], {m: [] for m in METRICS})
        for metric in METRICS:
            entry[metric].append(row[metric])
    return {
        "n_cases": len({row["case"] for row in rows}),
        "patient_wise": {m: mean_sd(case_means(rows, m).values()) for m in METRICS},
        "per_class": {name: {m: mean_sd(v[m]) for m in METRICS} for name, v in per_class.items()},
    }


def format_pm(stats: Mapping[str, float], bold: bool = False) -> str:
    """``"84.3 ± 9.9"`` (percent, one decimal) from a :func:`mean_sd` result; ``n/a`` without values."""
    if math.isnan(stats["mean"]):
        return "n/a"
    text = f"{100 * stats['mean']:.1f}"
    if not math.isnan(stats["sd"]):
        text += f" ± {100 * stats['sd']:.1f}"
    return f"**{text}**" if bold else text


def _json_text(value: Any) -> str:
    """JSON with NaN written as ``null`` (NaN is not valid JSON)."""

    def clean(item: Any) -> Any:
        if isinstance(item, float) and math.isnan(item):
            return None
        if isinstance(item, Mapping):
            return {str(k): clean(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [clean(v) for v in item]
        return item

    return json.dumps(clean(value), indent=2, allow_nan=False) + "\n"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def summary_markdown(summary: Mapping[str, Any], title: str = "Evaluation") -> str:
    """Markdown with the paper-style patient-wise table and the per-class table of a :func:`summarise` result."""
    pw = summary["patient_wise"]
    parts = [
        f"## {title}",
        f"Patient-wise mean ± SD over {pw['dsc']['n']} cases.",
        _table(["DSC (%)", "NSD (%)"], [[format_pm(pw["dsc"]), format_pm(pw["nsd"])]]),
        "### Per class (mean ± SD over the cases where the class is scored)",
        _table(["Class", "Cases", "DSC (%)", "NSD (%)"], [
            [name, str(stats["dsc"]["n"]), format_pm(stats["dsc"]), format_pm(stats["nsd"])]
            for name, stats in summary["per_class"].items()
        ]),
    ]
    return "\n\n".join(parts) + "\n"


def write_summary(rows: Iterable[Mapping[str, Any]], out_dir: str | Path, settings: Mapping[str, Any] | None = None
                  ) -> dict[str, Path]:
    """Write ``per_case.csv``, ``per_class.csv``, ``summary.md`` and ``summary.json`` into ``out_dir``.

    Returns:
        name -> path of every file written.
    """
    rows = list(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    paths = {"per_case": write_per_case(rows, out / "per_case.csv"), "per_class": out / "per_class.csv"}
    with open(paths["per_class"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "n", "dsc_mean", "dsc_sd", "nsd_mean", "nsd_sd"])
        for name, stats in summary["per_class"].items():
            writer.writerow([name, stats["dsc"]["n"], stats["dsc"]["mean"], stats["dsc"]["sd"],
                             stats["nsd"]["mean"], stats["nsd"]["sd"]])
    paths["markdown"] = out / "summary.md"
    paths["markdown"].write_text(summary_markdown(summary))
    paths["json"] = out / "summary.json"
    paths["json"].write_text(_json_text({**summary, "settings": dict(settings or {})}))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# comparison of runs
# ----------------------------------------------------------------------------------------------------------------
def compare_runs(runs: Mapping[str, Any], out_dir: str | Path, title: str = "Comparison") -> dict[str, Path]:
    """One table over several runs (like the paper's Tables 1-4) and a box plot of per-case DSC.

    Args:
        runs: run name (e.g. ``"scratch"``, ``"SparK"``, ``"AnatoMask"``) -> per-case table, anything
            :func:`read_per_case` accepts. Insertion order is the row order.
        out_dir: Folder for ``comparison.md``, ``comparison.json`` and ``dsc_boxplot.html`` (created if needed).
        title: Heading of the markdown and the plot.

    Returns:
        ``{"markdown": path, "json": path, "boxplot": path}``.
    """
    if not runs:
        raise ValueError("compare_runs needs at least one run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {name: read_per_case(source) for name, source in runs.items()}
    summaries = {name: summarise(rows) for name, rows in tables.items()}
    dsc_per_case = {name: case_means(rows, "dsc") for name, rows in tables.items()}
    best = {m: max((s["patient_wise"][m]["mean"] for s in summaries.values() if not math.isnan(
        s["patient_wise"][m]["mean"])), default=math.nan) for m in METRICS}
    body = [[name, str(s["patient_wise"]["dsc"]["n"])] + [
        format_pm(s["patient_wise"][m], bold=s["patient_wise"][m]["mean"] == best[m]) for m in METRICS
    ] for name, s in summaries.items()]
    classes = list(dict.fromkeys(c for s in summaries.values() for c in s["per_class"]))
    per_class = [[c] + [format_pm(s["per_class"][c]["dsc"]) if c in s["per_class"] else "n/a"
                        for s in summaries.values()] for c in classes]
    parts = [f"## {title}", "Patient-wise mean ± SD; **bold**: best mean.",
             _table(["Run", "Cases", *(_HEADERS[m] for m in METRICS)], body),
             "### Per-class DSC (%)", _table(["Class", *summaries], per_class)]
    case_sets = {frozenset(cases) for cases in dsc_per_case.values()}
    if len(case_sets) > 1:
        parts.insert(2, "Note: the runs were evaluated on different sets of cases.")
    paths = {"markdown": out / "comparison.md", "json": out / "comparison.json", "boxplot": out / "dsc_boxplot.html"}
    paths["markdown"].write_text("\n\n".join(parts) + "\n")
    paths["json"].write_text(_json_text({"runs": summaries, "dsc_per_case": dsc_per_case}))
    dsc_boxplot(dsc_per_case, title).write_html(paths["boxplot"], include_plotlyjs=True, full_html=True)
    return paths


def dsc_boxplot(dsc_per_case: Mapping[str, Mapping[str, float]], title: str):
    import plotly.graph_objects as go

    figure = go.Figure()
    for name, per_case in dsc_per_case.items():
        cases = [c for c, v in per_case.items() if not math.isnan(v)]
        figure.add_trace(go.Box(y=[100 * per_case[c] for c in cases], text=cases, name=name, boxpoints="all",
                                jitter=0.3, pointpos=0, hovertemplate="%{text}: %{y:.1f}%<extra></extra>"))
    figure.update_layout(title=f"{title}: per-case DSC (mean over classes)", yaxis_title="DSC (%)",
                         showlegend=False, template="plotly_white")
    return figure
