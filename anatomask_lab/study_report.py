"""The written report of a seeded study: ``study.json``, ``study.md``, SVG box plots and an offline plotly HTML.

Input: the study's per-case rows, the dict of :func:`anatomask_lab.stats.summarise_study`, a ``meta`` dict (command,
machine, date, versions, wall time, seeds, settings: whatever it holds is shown) and optional per-seed extras
(``{name: {seed: value}}``, e.g. a teacher's ranking ROC AUC). Every file is written atomically. Scores are shown in
percent with one decimal, differences in percentage points (pp). The "How to read this" section is generated from
the numbers and states, for each difference, only whether its interval excludes 0 and what that does not show.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from math import comb
from pathlib import Path
from typing import Any

from anatomask_lab.atomic import atomic_write, atomic_write_json
from anatomask_lab.stats import per_case_means, summarise_extras
from anatomask_lab.svg_plots import PALETTE, box_plot_panels_svg

__all__ = ["setting_label", "study_markdown", "write_study_report"]

METRIC_NAMES = {"dsc": "DSC", "nsd": "NSD"}


def setting_label(setting: str) -> str:
    """Readable name of a label setting: ``"all"`` -> all labelled training cases, ``"2"`` -> 2 labelled ..."""
    if setting == "all":
        return "all labelled training cases"
    if setting.isdigit():
        return f"{setting} labelled training case{'' if setting == '1' else 's'}"
    return setting


def _metric(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric.upper())


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: NaN / infinity -> None, mapping keys -> str, numpy scalars -> Python, the rest -> str."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return str(obj)


def _cell(value: Any) -> str:
    if isinstance(value, Mapping):
        value = json.dumps(_jsonable(value), separators=(", ", ": "))
    elif isinstance(value, list | tuple):
        value = ", ".join(str(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], body: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _pct(estimate: Mapping[str, Any], signed: bool = False) -> str:
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * estimate['mean'])} [{f.format(100 * estimate['low'])}, {f.format(100 * estimate['high'])}]"


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


# ----------------------------------------------------------------------------------------------------------------
# markdown sections
# ----------------------------------------------------------------------------------------------------------------
def _header(summary: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    title = meta.get("title", "Study: finetuning variants under label settings")
    parts = [f"# {title}"]
    shown = {k: v for k, v in meta.items() if k != "title"}
    if shown:
        parts.append(_table(["", ""], [[f"**{_cell(k)}**", f"`{_cell(v)}`" if k == "command" else _cell(v)]
                                        for k, v in shown.items()]))
    level = round(100 * summary["level"])
    parts.append(f"Scores are per-case means over classes, in percent; means with a {level}% two-level bootstrap "
                 f"interval (seeds and cases resampled, {summary['n_boot']} replicates, seed {summary['seed']}).")
    dropped = {m: n for m, n in summary["nan_dropped"].items() if n}
    if dropped:
        parts.append("NaN scores left out: " + ", ".join(f"{_metric(m)} {n}" for m, n in dropped.items()) + ".")
    return parts


def _setting_section(setting: str, block: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    metrics, reference, level = summary["metrics"], summary["reference"], round(100 * summary["level"])
    n_seeds = len(block["seeds"])
    body = [[v, *(_pct(block["estimates"][v][m]) for m in metrics), f"{n_seeds} × {block['n_cases'][v]}"]
            for v in block["variants"]]
    parts = [f"## Setting: {setting_label(setting)}", f"Seeds: {', '.join(map(str, block['seeds']))}.",
             _table(["Variant", *(f"{_metric(m)} mean [{level}% CI] (%)" for m in metrics), "n (seeds × cases)"],
                    body)]
    diffs = [[f"{reference} − {b}", _metric(m), _pct(d, signed=True), f"{d['wins']} / {d['losses']} / {d['ties']}",
              _p(d["p_value"]), str(d["n_pairs"])]
             for m in metrics for b, d in block["differences"][m].items()]
    if diffs:
        parts += [f"Paired differences (matched on seed and case; a win is {reference} scoring higher):",
                  _table(["Difference", "Metric", f"mean [{level}% CI] (pp)", "wins / losses / ties", "Wilcoxon p",
                          "pairs"], diffs)]
    else:
        parts.append(f"No paired difference: {reference} or every baseline is absent from this setting.")
    return parts


def _extras_section(extras: Mapping[str, Mapping[str, Any]], level: float) -> list[str]:
    body = []
    for name, e in extras.items():
        sd = "n/a" if e["sd"] is None else f"{e['sd']:.3f}"
        values = ", ".join(f"{s}: {'n/a' if v is None else f'{v:.3f}'}" for s, v in e["values"].items())
        body.append([name, f"{e['mean']:.3f} ± {sd}", f"[{e['low']:.3f}, {e['high']:.3f}]", str(e["n_seeds"]), values])
    n = min(e["n_seeds"] for e in extras.values())
    return ["## Per-seed quantities",
            _table(["Quantity", "mean ± SD", f"{round(100 * level)}% CI over seeds", "seeds", "per seed"], body),
            f"The interval is a percentile bootstrap of the mean over seeds; with {n} seed{'s' if n > 1 else ''} "
            f"there {'are' if n > 1 else 'is'} only {comb(2 * n - 1, n)} distinct resampled "
            f"mean{'s' if n > 1 else ''}, so it is rough."]


def _verdict(setting: str, metric: str, reference: str, baseline: str, d: Mapping[str, Any]) -> str:
    where = f"{_metric(metric)}, {setting_label(setting)}: {reference} − {baseline} = {_pct(d, signed=True)} pp"
    if d["low"] > 0:
        return (f"- {where}. The interval excludes 0: on these cases and seeds {reference} scored higher than "
                f"{baseline}.")
    if d["high"] < 0:
        return (f"- {where}. The interval excludes 0: on these cases and seeds {reference} scored lower than "
                f"{baseline}.")
    return f"- {where}. The interval includes 0: these runs do not separate the two."


def _context(meta: Mapping[str, Any]) -> list[str]:
    data = str(meta.get("data") or meta.get("dataset") or "")
    machine = " ".join(str(meta.get(k, "")) for k in ("machine", "device")).lower()
    scale = str(meta.get("scale", "")).lower()
    cpu_only = "cpu" in scale or (not scale and "cpu" in machine and not any(
        word in machine for word in ("gpu", "cuda", "nvidia")))
    lines = []
    if "phantom" in data.lower():
        lines.append("The test cases are synthetic phantoms: a difference here shows how the methods behave on this "
                     "toy anatomy, not on patients' CT or MRI.")
    elif data:
        lines.append(f"The test cases come from {data}; the results speak for cases like these only.")
    else:
        lines.append("The header does not name the data; read the results as specific to the cases used.")
    if cpu_only:
        lines.append("The runs are CPU-scale (short pretraining and finetuning at coarse resolution), far below "
                     "the paper's; the order of the methods at full scale may differ.")
    else:
        lines.append("Training length and resolution are those in the header; other scales may rank the methods "
                     "differently.")
    return lines


def _how_to_read(summary: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    reference, level = summary["reference"], summary["level"]
    verdicts, lows, highs = [], 0, 0
    for setting in summary["settings"]:
        block = summary["per_setting"][setting]
        for metric in summary["metrics"]:
            for baseline, d in block["differences"][metric].items():
                verdicts.append(_verdict(setting, metric, reference, baseline, d))
                highs, lows = highs + (d["low"] > 0), lows + (d["high"] < 0)
    seeds = sorted({len(b["seeds"]) for b in summary["per_setting"].values()})
    cases = sorted({n for b in summary["per_setting"].values() for n in b["n_cases"].values()})
    text = [f"Each interval resamples both the seeds ({'/'.join(map(str, seeds))} per setting) and the test cases "
            f"({'/'.join(map(str, cases))}), so it covers finetuning noise across seeds and the luck of which cases "
            f"were drawn, for this data and this training recipe only."]
    if seeds == [1]:
        text.append("With one seed, seed-to-seed variation is not measured at all.")
    if verdicts:
        n = len(verdicts)
        text.append(f"Of the {n} differences, {highs + lows} have an interval that excludes 0 ({highs} with "
                    f"{reference} higher, {lows} lower). If no variant differed, about {n * (1 - level):.1f} of these "
                    f"{n} intervals at {round(100 * level)}% would still exclude 0 by chance; no correction for "
                    f"multiple comparisons is applied. An interval that excludes 0 shows a difference for these seeds "
                    f"and cases; one that includes 0 shows that these runs cannot tell the variants apart, not that "
                    f"they are equal.")
        text.append("The Wilcoxon p-values treat every seed × case pair as independent, but each case is scored "
                    "once per seed, so they overstate the evidence; read the intervals first.")
    text += _context(meta)
    return ["## How to read this", *(["\n".join(verdicts)] if verdicts else []), " ".join(text)]


def study_markdown(summary: Mapping[str, Any], meta: Mapping[str, Any],
                   extras: Mapping[str, Mapping[str, Any]] | None = None,
                   images: Mapping[str, str] | None = None) -> str:
    """The markdown report of a study.

    Args:
        summary: Output of :func:`anatomask_lab.stats.summarise_study`.
        meta: Shown as the header table (``title`` becomes the heading; ``data`` / ``scale`` / ``machine`` feed the
            caveats of "How to read this").
        extras: Output of :func:`anatomask_lab.stats.summarise_extras`, or None.
        images: Metric -> file name of its box plot, beside the markdown.

    Returns:
        The markdown text.
    """
    parts = _header(summary, meta)
    for setting in summary["settings"]:
        parts += _setting_section(setting, summary["per_setting"][setting], summary)
    if images:
        parts.append("## Box plots")
        for metric, name in images.items():
            parts.append(f"![Per-case {_metric(metric)} (mean over seeds) by setting and variant]({name})")
        parts.append("Each dot or box counts a test case once (its mean over seeds). Interactive version: "
                     "[study_boxplot.html](study_boxplot.html).")
    if extras:
        parts += _extras_section(extras, summary["level"])
    parts += _how_to_read(summary, meta)
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# figures and files
# ----------------------------------------------------------------------------------------------------------------
def _panels(rows: list[Mapping[str, Any]], summary: Mapping[str, Any], metric: str) -> dict[str, dict[str, list]]:
    """``{setting label: {variant: [percent per case]}}`` in the summary's order."""
    means = per_case_means(rows, metric)
    return {setting_label(s): {v: [100 * x for x in means.get(s, {}).get(v, {}).values()]
                               for v in summary["per_setting"][s]["variants"]} for s in summary["settings"]}


def _plotly_html(rows: list[Mapping[str, Any]], summary: Mapping[str, Any], path: Path) -> None:
    """Box plots (rows: metrics, columns: settings) as one HTML file with plotly.js inlined once (offline)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    metrics, settings = summary["metrics"], summary["settings"]
    figure = make_subplots(rows=len(metrics), cols=len(settings), shared_yaxes=True, vertical_spacing=0.12,
                           subplot_titles=[f"{_metric(m)}, {setting_label(s)}" for m in metrics for s in settings])
    variants = list(dict.fromkeys(v for s in settings for v in summary["per_setting"][s]["variants"]))
    for i, metric in enumerate(metrics, start=1):
        means = per_case_means(rows, metric)
        for j, setting in enumerate(settings, start=1):
            for variant in summary["per_setting"][setting]["variants"]:
                cases = means.get(setting, {}).get(variant, {})
                colour = PALETTE[variants.index(variant) % len(PALETTE)]
                figure.add_trace(go.Box(y=[100 * v for v in cases.values()], text=list(cases), name=variant,
                                        boxpoints="all", jitter=0.3, pointpos=0, marker_color=colour,
                                        legendgroup=variant, showlegend=(i, j) == (1, 1),
                                        hovertemplate="%{text}: %{y:.1f}%<extra>" + variant + "</extra>"),
                                 row=i, col=j)
        figure.update_yaxes(title_text=f"{_metric(metric)} (%)", range=[0, 100], row=i, col=1)
    figure.update_layout(title="Per-case scores (mean over seeds)", template="plotly_white",
                         height=360 * len(metrics), width=max(520, 320 * len(settings)))
    atomic_write(path, lambda p: figure.write_html(p, include_plotlyjs=True, full_html=True))


def write_study_report(rows: Iterable[Mapping[str, Any]], summary: Mapping[str, Any], out_dir: str | Path,
                       meta: Mapping[str, Any], extras: Mapping[str, Mapping[Any, float]] | None = None
                       ) -> dict[str, Path]:
    """Write ``study.json``, ``study.md``, ``study_boxplot.svg`` (one SVG per metric) and ``study_boxplot.html``.

    Args:
        rows: The study's per-case rows (as given to :func:`anatomask_lab.stats.summarise_study`).
        summary: The summary of those rows.
        out_dir: Folder of the report (created if needed).
        meta: Command, machine, date, versions, wall time, seeds, settings... (any JSON-able-ish values); ``title``
            is the heading, ``data`` (e.g. "phantom ...") and ``scale`` / ``machine`` choose the caveats.
        extras: Optional per-seed scalars ``{name: {seed: value}}``; summarised with the summary's bootstrap settings.

    Returns:
        ``{"json", "markdown", "svg", "html"}`` paths, plus ``"svg_<metric>"`` for every metric after the first.
    """
    rows = list(rows)
    out = Path(out_dir)
    extras_summary = summarise_extras(extras, summary["n_boot"], summary["level"], summary["seed"]) if extras else {}
    paths: dict[str, Path] = {}
    images: dict[str, str] = {}
    for k, metric in enumerate(summary["metrics"]):
        name = "study_boxplot.svg" if k == 0 else f"study_boxplot_{metric}.svg"
        svg = box_plot_panels_svg(_panels(rows, summary, metric), f"Per-case {_metric(metric)} by label setting",
                                  f"{_metric(metric)} (%)", (0.0, 100.0))
        paths["svg" if k == 0 else f"svg_{metric}"] = atomic_write(out / name, lambda p, s=svg: p.write_text(s))
        images[metric] = name
    paths["html"] = out / "study_boxplot.html"
    _plotly_html(rows, summary, paths["html"])
    document = {"meta": meta, "summary": summary, "extras": extras_summary, "rows": rows}
    paths["json"] = atomic_write_json(out / "study.json", _jsonable(document))
    markdown = study_markdown(summary, meta, extras_summary, images)
    paths["markdown"] = atomic_write(out / "study.md", lambda p: p.write_text(markdown))
    return paths
