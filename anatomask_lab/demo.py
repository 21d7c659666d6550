"""The main job (``make demo``): the paper's story at laptop scale on the embedded phantom cohort.

phantom cohort -> prepare -> pretrain (AnatoMask, SparK) -> finetune (AnatoMask, SparK, scratch) -> predict ->
evaluate -> report folder (comparison table, per-case paired table, box plot, learning curves, executed notebooks
as HTML, all working offline).

Everything runs on a 2-core CPU with the ``tiny`` presets. Its time is reported in seconds and in units of a tiny
SparK pretraining step measured on the same machine at the start (what ``bench/bench_pretrain.py --methods spark``
measures), so that runs on different machines compare. One seed and one test split show the pipeline working; they
cannot rank methods: ``anatomask-lab study`` repeats the comparison over seeds with confidence intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

__all__ = ["run_demo", "spark_step_seconds"]

VARIANTS = ("scratch", "SparK", "AnatoMask")


def _step(title: str, log: list[dict[str, Any]]):
    class _Timer:
        def __enter__(self):
            print(f"\n== {title}", flush=True)
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            log.append({"step": title, "seconds": round(time.perf_counter() - self.t0, 1)})
            print(f"   ({log[-1]['seconds']} s)", flush=True)

    return _Timer()


def spark_step_seconds(repeats: int = 3, warmup: int = 2) -> float:
    """Median wall time of one tiny SparK pretraining step (64^3, batch 2, CPU, fp32): the demo's time unit."""
    import torch

    from anatomask_lab.config import pretrain_config
    from anatomask_lab.pretrain import build_models, make_optimizer, train_step

    cfg = pretrain_config("tiny", method="spark", device="cpu")
    student, _ = build_models(cfg, torch.device("cpu"))
    opt, scaler = make_optimizer(student, cfg), torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 64, 64, 64, generator=g)
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        train_step(student, student, None, opt, scaler, x, cfg=cfg, r_t=0.0, m=None, generator=g)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_demo(out: str | Path = "demo_out", *, cases: int = 40, pretrain_epochs: int = 6, pretrain_iters: int = 10,
             finetune_epochs: int = 14, finetune_iters: int = 10, notebooks: bool = True, quick: bool = False,
             seed: int = 0) -> Path:
    """Run the whole story; returns the report folder.

    Args:
        out: working folder (data, runs, report); reused on a second call (finished steps are kept).
        cases: phantom cases (70/10/20 split: 40 cases give 8 test cases).
        pretrain_epochs, pretrain_iters: pretraining length (tiny preset, 64^3 patches, batch 2).
        finetune_epochs, finetune_iters: finetuning length per model.
        notebooks: execute the notebooks into the report as HTML.
        quick: a smoke-sized run (used by the tests).
    """
    from anatomask_lab.lab import DEMO_CLASSES, ensure_phantom_dataset

    out = Path(out).resolve()  # absolute: the notebooks run with their own working directory
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    timings: list[dict[str, Any]] = []
    shape, spacing, prep_spacing, patch = (96, 96, 80), (3.0, 3.0, 3.75), (4.5, 4.5, 4.5), (64, 64, 64)
    if quick:
        shape, spacing, prep_spacing, patch = (48, 48, 40), (6.0, 6.0, 7.5), (6.0, 6.0, 6.0), (32, 32, 32)
    with _step("time unit: one tiny SparK pretraining step on this machine", timings):
        unit = spark_step_seconds(repeats=1 if quick else 3, warmup=1 if quick else 2)
    data = out / "data" / "prepared"
    with _step(f"phantom cohort ({cases} cases of {shape} voxels), prepared at {prep_spacing[0]} mm with "
               f"{len(DEMO_CLASSES)} organs", timings):
        ensure_phantom_dataset(data, cases=cases, shape=shape, spacing=spacing, prep_spacing=prep_spacing,
                               seed=seed)
    runs = out / "runs"
    _pretrain_both(data, runs, patch, pretrain_epochs, pretrain_iters, seed, timings)
    per_case = _finetune_all(out, data, runs, prep_spacing[0], finetune_epochs, finetune_iters, seed, quick, timings)
    with _step("report", timings):
        paths = _write_tables_and_curves(report, runs, per_case)
    if notebooks:
        with _step("notebooks -> HTML", timings):
            _notebooks_to_html(report / "notebooks", data, runs, quick)
    setup = _setup_summary(cases, shape, spacing, prep_spacing, patch, pretrain_epochs, pretrain_iters,
                           finetune_epochs, finetune_iters)
    _write_readme(report, paths, timings, prep_spacing[0], setup, unit)
    print(f"\nreport folder: {report.resolve()}")
    return report


def _pretrain_both(data: Path, runs: Path, patch, epochs: int, iters: int, seed: int, timings: list) -> None:
    from anatomask_lab import pretrain
    from anatomask_lab.runs import is_finished

    # teacher momentum 0.9 -> 0.99: the reference's 0.999 -> 0.9999 is meant for 1000 epochs; over a few dozen
    # iterations such a teacher would barely leave its initial weights
    common = dict(data_dir=str(data), patch_size=patch, batch_size=2, epochs=epochs, iters_per_epoch=iters,
                  warmup_epochs=1, momentum0=0.9, momentum1=0.99, device="cpu", workers=0, quiet=True, seed=seed)
    for method in ("anatomask", "spark"):
        folder = runs / f"pretrain_{method}"
        with _step(f"pretrain {method} ({epochs} x {iters} iterations)", timings):
            if not is_finished(folder):
                cfg = pretrain.pretrain_config("tiny", method=method, out_dir=str(folder), **common)
                pretrain.run(cfg, resume="auto")


def _finetune_all(out: Path, data: Path, runs: Path, tolerance: float, epochs: int, iters: int, seed: int,
                  quick: bool, timings: list) -> dict[str, list[dict[str, Any]]]:
    from anatomask_lab import finetune
    from anatomask_lab.data.dataset import DatasetInfo
    from anatomask_lab.evaluate import evaluate_folders
    from anatomask_lab.predict import predict_split, write_reference_labels
    from anatomask_lab.report import write_summary
    from anatomask_lab.runs import is_finished

    # STU-Net's finetuning optimiser (AdamW, cosine decay) at a learning rate for a short schedule, flips and
    # nnU-Net's rotation/scaling augmentation, foreground oversampling as nnU-Net
    ft_common = dict(data_dir=str(data), patch_size=(64, 64, 64), epochs=epochs, iters_per_epoch=iters,
                     val_every=max(epochs // 4, 1), optimizer="adamw", lr=5e-3, rotate_scale_p=0.0 if quick else 0.2,
                     fg_oversample=0.33, device="cpu", workers=0, quiet=True, seed=seed)
    gt = out / "eval" / "reference"
    with _step("reference labels of the test split (original geometry)", timings):
        write_reference_labels(data, gt)
    classes = DatasetInfo.read(data).class_table()
    per_case: dict[str, list[dict[str, Any]]] = {}
    for name in VARIANTS:
        folder = runs / f"finetune_{name.lower()}"
        init = "scratch" if name == "scratch" else str(runs / f"pretrain_{name.lower()}")
        with _step(f"finetune from {name} ({epochs} x {iters} iterations), predict, evaluate", timings):
            if not is_finished(folder):
                cfg = finetune.finetune_config("tiny", out_dir=str(folder), init=init, **ft_common)
                finetune.run(cfg, resume="auto")
            pred = out / "eval" / name.lower()
            predict_split(folder, data, pred, device="cpu", quiet=True)
            rows = evaluate_folders(pred, gt, classes=classes, tolerances=tolerance, convention="totalseg",
                                    progress=False)
            write_summary(rows, pred / "evaluation", {"model": name, "tolerance_mm": tolerance})
            per_case[name] = rows
    return per_case


def _write_tables_and_curves(report: Path, runs: Path, per_case: dict[str, list[dict]]) -> dict[str, Path]:
    from anatomask_lab.report import case_means, compare_runs
    from anatomask_lab.runs import read_metrics
    from anatomask_lab.viz import figures_html, loss_curves

    paths = compare_runs(per_case, report, title="Phantom demo: finetuning from scratch, SparK and AnatoMask")
    dsc = {name: case_means(rows, "dsc") for name, rows in per_case.items()}
    paths["paired"] = report / "paired.md"
    paths["paired"].write_text(paired_table(dsc) + "\n")
    pre = {m: read_metrics(runs / f"pretrain_{m}", "epoch") for m in ("anatomask", "spark")}
    ft = {n: read_metrics(runs / f"finetune_{n.lower()}", "epoch") for n in VARIANTS}
    paths["curves"] = report / "curves.html"
    figures_html([loss_curves(pre, title="pretraining: reconstruction loss per epoch"),
                  loss_curves(ft, title="finetuning: Dice+CE loss per epoch"),
                  loss_curves(ft, key="val_dice", title="finetuning: validation Dice (mean over organs)")],
                 paths["curves"], title="anatomask-lab demo: learning curves")
    return paths


def paired_table(dsc: dict[str, dict[str, float]]) -> str:
    """Markdown: per test case the DSC of every variant and AnatoMask's paired differences, with wins/losses."""
    cases = sorted(set.intersection(*(set(v) for v in dsc.values())))
    diffs = {b: [dsc["AnatoMask"][c] - dsc[b][c] for c in cases] for b in ("SparK", "scratch")}
    lines = ["| case | " + " | ".join(f"{v} DSC (%)" for v in VARIANTS) + " | AnatoMask − SparK (pp) | "
             "AnatoMask − scratch (pp) |", "|---" * (len(VARIANTS) + 3) + "|"]
    for i, c in enumerate(cases):
        lines.append(f"| {c} | " + " | ".join(f"{100 * dsc[v][c]:.1f}" for v in VARIANTS) + " | "
                     + " | ".join(f"{100 * diffs[b][i]:+.1f}" for b in ("SparK", "scratch")) + " |")
    for b, d in diffs.items():
        finite = [x for x in d if not math.isnan(x)]
        wins, losses = sum(x > 0 for x in finite), sum(x < 0 for x in finite)
        lines.append(f"\nAnatoMask − {b}: mean {100 * statistics.fmean(finite):+.1f} pp over {len(finite)} cases, "
                     f"AnatoMask higher on {wins}, lower on {losses}." if finite else f"\nAnatoMask − {b}: no cases.")
    return "\n".join(lines)


def _setup_summary(cases, shape, spacing, prep_spacing, patch, pe, pi, fe, fi) -> dict[str, Any]:
    return {"cases": f"{cases} (70/10/20 train/validation/test split)", "phantom shape": list(shape),
            "phantom spacing (mm)": list(spacing), "prepared spacing (mm)": list(prep_spacing),
            "pretraining patch": list(patch),
            "pretraining": f"{pe} epochs x {pi} iterations, batch 2, tiny STU-Net, teacher momentum 0.9 -> 0.99",
            "finetuning": f"{fe} epochs x {fi} iterations, batch 2, 64^3 patches, tiny STU-Net, AdamW lr 5e-3 "
                          f"cosine, flips + rotation/scaling (p 0.2), foreground oversampling 0.33, one seed"}


def _notebooks_to_html(folder: Path, data: Path, runs: Path, quick: bool) -> None:
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    from anatomask_lab.course import notebooks_dir

    folder.mkdir(parents=True, exist_ok=True)
    root = notebooks_dir()  # the wheel's package data, or notebooks/ of a checkout
    params = {
        "01_masking.ipynb": {"shape": 96 if quick else 128},
        "02_loss_ranking.ipynb": {"data_dir": str(data), "run_dir": str(runs / "pretrain_anatomask"),
                                  "patch": 32 if quick else 64},
        "03_ema_self_distillation.ipynb": {"data_dir": str(data), "steps": 4 if quick else 12,
                                           "patch": 32 if quick else 64},
        "06_compare.ipynb": {"runs_dir": str(runs), "data_dir": str(data), "run_missing": False},
    }
    for name, p in params.items():
        src = root / name
        if not src.exists():
            raise FileNotFoundError(f"notebook {src} is missing (a broken install? reinstall anatomask-lab)")
        executed = folder / name
        pm.execute_notebook(str(src), str(executed), parameters=p, progress_bar=False, cwd=str(root))
        html, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
        executed.with_suffix(".html").write_text(html)


def _write_readme(report: Path, paths: dict[str, Path], timings: list[dict[str, Any]], tolerance: float,
                  setup: dict, unit: float) -> None:
    total = sum(t["seconds"] for t in timings)
    comparison = json.loads(Path(paths["json"]).read_text())["runs"]
    scratch = comparison.get("scratch", {}).get("patient_wise", {}).get("dsc", {}).get("mean", math.nan)
    lines = [
        "# anatomask-lab demo report", "",
        "What ran (all on this machine's CPU):", "",
        *[f"- {k}: {v}" for k, v in setup.items()], "",
        f"Wall time of the steps: **{total:.0f} s = {total / unit:.0f} tiny SparK steps** of {1000 * unit:.0f} ms "
        "measured on this machine at the start (the unit of `bench/bench_pretrain.py --methods spark`).", "",
        f"## Finetuning results on the test split (DSC / NSD at {tolerance:g} mm, patient-wise mean ± SD, %)", "",
        Path(paths["markdown"]).read_text(), "",
        f"From scratch the mean test DSC is {100 * scratch:.1f}%." if not math.isnan(scratch) else "",
        "## The same test cases, paired", "",
        Path(paths["paired"]).read_text(), "",
        "What one seed can and cannot show: every number above comes from one pretraining and one finetuning run "
        "per method. A difference between two rows mixes the methods with the luck of that seed (initial weights, "
        "patch order, masks); with one seed the two cannot be told apart, however consistent the per-case signs "
        "look, because all cases share the same trained model. `anatomask-lab study` repeats the comparison over "
        "seeds and label settings and reports confidence intervals and paired tests; the kit's committed result is "
        "in `docs/study.md`.", "",
        "These are a few hundred CPU iterations on a synthetic phantom: they show the pipeline working end to end, "
        "not the paper's gains (1000 pretraining epochs of STU-Net-B on 1204 real CT scans).", "",
        "## Files", "",
        "- `comparison.md` / `comparison.json`: the table above; `paired.md`: the per-case table; "
        "`dsc_boxplot.html`: per-case DSC;",
        "- `curves.html`: pretraining loss, finetuning loss and validation Dice per epoch;",
        "- `notebooks/*.html`: executed notebooks 01, 02, 03 and 06. Every HTML file embeds plotly.js (offline).",
        "", "## Time per step", "", "| step | seconds | tiny SparK steps |", "|---|---|---|",
        *[f"| {t['step']} | {t['seconds']} | {t['seconds'] / unit:.0f} |" for t in timings],
        f"| **total** | **{total:.0f}** | **{total / unit:.0f}** |",
    ]
    (report / "README.md").write_text("\n".join(lines) + "\n")
    (report / "timings.json").write_text(json.dumps({"unit_s": unit, "steps": timings}, indent=2))


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole story on the embedded phantom cohort (CPU, minutes)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="working folder; the report goes to OUT/report "
                   "(default: demo_out)")
    p.add_argument("--cases", type=int, default=40, help="phantom cases; 20%% are tested (default: 40)")
    p.add_argument("--no-notebooks", action="store_true", help="skip executing the notebooks")
    p.add_argument("--clean", action="store_true", help="delete OUT first instead of reusing finished steps")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    if args.clean and Path(args.out).exists():
        shutil.rmtree(args.out)
    run_demo(args.out, cases=args.cases, notebooks=not args.no_notebooks)
    return 0
