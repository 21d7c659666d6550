"""The seeded study: pretraining variants x label settings x seeds, every test case evaluated, paired statistics.

For each seed the study pretrains every pretrained variant once (AnatoMask, SparK and, opt-in, the paper's Table 2
ablations), then finetunes each of them and a model from scratch under every label setting (all labelled training
cases, or ``k`` cases drawn with the seed, the same draw for every variant), predicts the test split in the original
geometry and scores every case (DSC, NSD). It also measures how well the AnatoMask teacher's per-patch loss ranks
organ patches (ROC AUC, normalised vs raw targets). :mod:`anatomask_lab.stats` turns the per-case rows into means
with bootstrap confidence intervals and paired differences with Wilcoxon tests;
:mod:`anatomask_lab.study_report` writes ``study.json``, ``study.md`` and the box plots.

Every finished cell is kept (``<out>/seed<s>/...``): a second call resumes where the first stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anatomask_lab.atomic import atomic_write, atomic_write_json
from anatomask_lab.progress import progress as progress_bar

__all__ = ["VARIANTS", "StudyConfig", "run_study"]

CLI_DESCRIPTION = """\
Pretrain every variant once per seed, finetune each (and a model from scratch) under every label setting,
predict and score every test case, and measure how well the AnatoMask teacher ranks organ patches. The report
(OUT/study.md, study.json, box plots) gives means with 95% bootstrap intervals over seeds and cases, and the paired
differences AnatoMask - SparK and AnatoMask - scratch with Wilcoxon signed-rank tests. Finished cells are kept: a
second call with the same OUT resumes."""

# variant name -> (pretraining method, ablation) or None for finetuning from scratch
VARIANTS: dict[str, tuple[str, str] | None] = {
    "scratch": None,
    "SparK": ("spark", "none"),
    "AnatoMask": ("anatomask", "none"),
    "no_self_distillation": ("anatomask", "no_self_distillation"),
    "low_significance": ("anatomask", "low_significance"),
    "hard_to_easy": ("anatomask", "hard_to_easy"),
    "simple_decoder": ("anatomask", "simple_decoder"),
}


@dataclass(frozen=True)
class StudyConfig:
    """A study's grid and its training budget (tiny STU-Net, CPU scale by default).

    Attributes:
        data_dir: prepared dataset with labels and a test split.
        out_dir: study folder (runs, predictions, ``study.json``, ``study.md``).
        seeds: one pretraining + finetuning replicate per seed.
        variants: names from :data:`VARIANTS`; ``scratch``, ``SparK`` and ``AnatoMask`` make the main comparison.
        settings: label settings: ``"all"`` or a number of labelled training cases.
        patch: cubic patch edge for pretraining and finetuning (a multiple of 32).
        momentum: teacher EMA momentum ramp (demo scale: the reference's 0.999 -> 0.9999 assumes 1000 epochs).
        tolerance_mm: NSD tolerance (one voxel of the prepared grid is a sensible choice).
        amp: precision of every run: "fp32", "bf16" (autocast; about 1.8x faster on CPUs with AVX-512 BF16, where
            oneDNN's bf16 convolution backward has given intermittent NaN gradients: a run then stops with an error
            and saves nothing broken; rerun that cell in fp32), "fp16" or "auto" (bf16 on CUDA, fp32 on a CPU).
    """

    data_dir: str
    out_dir: str
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    variants: tuple[str, ...] = ("scratch", "SparK", "AnatoMask")
    settings: tuple[str, ...] = ("all", "2")
    preset: str = "tiny"
    patch: int = 64
    pretrain_epochs: int = 8
    pretrain_iters: int = 8
    momentum: tuple[float, float] = (0.99, 0.999)
    finetune_epochs: int = 10
    finetune_iters: int = 10
    finetune_optimizer: str = "adamw"
    finetune_lr: float = 5e-3
    rotate_scale_p: float = 0.0
    tolerance_mm: float = 4.5
    ranking_patches: int = 8
    device: str = "cpu"
    amp: str = "fp32"

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
        if "AnatoMask" not in self.variants:
            raise ValueError("variants must include 'AnatoMask' (the study's reference)")
        for s in self.settings:
            if s != "all" and not (s.isdigit() and int(s) >= 1):
                raise ValueError(f"setting {s!r}: 'all' or a number of labelled cases >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if self.patch <= 0 or self.patch % 32:
            raise ValueError(f"patch must be a positive multiple of 32, got {self.patch}")


def _pretrain(cfg: StudyConfig, variant: str, seed: int) -> Path:
    from anatomask_lab import pretrain
    from anatomask_lab.runs import is_finished

    method, ablation = VARIANTS[variant]
    folder = Path(cfg.out_dir) / f"seed{seed}" / f"pretrain_{variant}"
    if not is_finished(folder):
        pretrain.run(pretrain.pretrain_config(
            cfg.preset, ablation, method=method, data_dir=cfg.data_dir, out_dir=str(folder),
            patch_size=(cfg.patch,) * 3, epochs=cfg.pretrain_epochs, iters_per_epoch=cfg.pretrain_iters,
            warmup_epochs=1, momentum0=cfg.momentum[0], momentum1=cfg.momentum[1], device=cfg.device, amp=cfg.amp,
            workers=0, quiet=True, seed=seed), resume="auto")
    return folder


def _finetune_cell(cfg: StudyConfig, variant: str, setting: str, seed: int, reference: Path) -> list[dict]:
    """Finetune, predict the test split and score it; the per-case rows are kept in ``result.json``."""
    from anatomask_lab import finetune
    from anatomask_lab.data.dataset import DatasetInfo
    from anatomask_lab.evaluate import evaluate_folders
    from anatomask_lab.predict import predict_split
    from anatomask_lab.runs import is_finished

    cell = Path(cfg.out_dir) / f"seed{seed}" / f"labels_{setting}" / variant
    result = cell / "result.json"
    if result.is_file():
        return json.loads(result.read_text())["rows"]
    init = "scratch" if VARIANTS[variant] is None else str(Path(cfg.out_dir) / f"seed{seed}" / f"pretrain_{variant}")
    run = cell / "finetune"
    if not is_finished(run):
        finetune.run(finetune.finetune_config(
            cfg.preset, data_dir=cfg.data_dir, out_dir=str(run), init=init, patch_size=(cfg.patch,) * 3,
            epochs=cfg.finetune_epochs, iters_per_epoch=cfg.finetune_iters, optimizer=cfg.finetune_optimizer,
            lr=cfg.finetune_lr, rotate_scale_p=cfg.rotate_scale_p, val_every=cfg.finetune_epochs,
            labelled_cases=None if setting == "all" else int(setting), device=cfg.device, amp=cfg.amp, workers=0,
            quiet=True, seed=seed), resume="auto")
    pred = cell / "pred"
    predict_split(run, cfg.data_dir, pred, device=cfg.device, which="last", quiet=True)
    per_class = evaluate_folders(pred, reference, classes=DatasetInfo.read(cfg.data_dir).class_table(),
                                 tolerances=cfg.tolerance_mm, convention="totalseg", progress=False)
    rows = _case_means(per_class, variant=variant, setting=setting, seed=seed)
    atomic_write_json(result, {"rows": rows, "per_class": per_class})
    return rows


def _case_means(per_class: list[dict], **keys: Any) -> list[dict]:
    """Per-case means over the classes present in the ground truth (NaN scores skipped), as the demo's tables."""
    from anatomask_lab.report import case_means

    dsc, nsd = case_means(per_class, "dsc"), case_means(per_class, "nsd")
    return [{**keys, "case": case, "dsc": dsc[case], "nsd": nsd[case]} for case in sorted(dsc)]


@torch.no_grad()
def ranking_quality(run_dir: str | Path, data_dir: str | Path, *, patch: int, n_patches: int, seed: int
                    ) -> dict[str, float]:
    """ROC AUC of a pretrained teacher's per-patch loss for organ patches, normalised vs raw targets.

    Patches are test-split crops centred on foreground; a patch of the mask grid counts as an organ patch when it
    holds a labelled voxel. AUC 0.5 is chance; above 0.5 the loss ranks organ patches first.
    """
    from anatomask_lab.analysis import average_patch_loss, roc_auc
    from anatomask_lab.data.sampler import PatchDataset
    from anatomask_lab.lab import load_pretrained_mim
    from anatomask_lab.viz import organ_patches

    teacher = load_pretrained_mim(run_dir, "teacher")
    ds = PatchDataset(data_dir, split="test", patch_size=(patch,) * 3, with_label=True, fg_oversample=1.0,
                      flips=False, seed=seed, samples_per_epoch=n_patches)
    items = [ds[i] for i in range(n_patches)]
    x = torch.stack([it["image"] for it in items])
    organ = np.stack([organ_patches(it["label"].numpy(), teacher.patch_size) for it in items])
    out = {}
    for name, normalize in (("normalised", True), ("raw", False)):
        loss = average_patch_loss(teacher, x, n_masks=4, seed=seed, normalize=normalize).numpy()
        out[name] = roc_auc(loss, organ)
    return out


def _tasks(cfg: StudyConfig) -> list[tuple]:
    pretrained = [v for v in cfg.variants if VARIANTS[v] is not None]
    tasks: list[tuple] = []
    for seed in cfg.seeds:
        tasks += [("pretrain", v, None, seed) for v in pretrained]
        tasks.append(("ranking", "AnatoMask", None, seed))
        tasks += [("finetune", v, s, seed) for s in cfg.settings for v in cfg.variants]
    return tasks


def run_study(cfg: StudyConfig, *, command: str = "", data_label: str | None = None, progress: bool = True
              ) -> dict[str, Path]:
    """Run (or resume) the whole grid and write the report; returns the report files.

    ``data_label`` describes the data in the report (default: the dataset's name and its number of test cases).
    """
    from anatomask_lab.data.dataset import DatasetInfo
    from anatomask_lab.predict import write_reference_labels
    from anatomask_lab.runs import code_version, device_name
    from anatomask_lab.stats import summarise_study
    from anatomask_lab.study_report import write_study_report

    t0, out = time.perf_counter(), Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "study_config.json", asdict(cfg))
    reference = out / "reference"
    if not (reference / ".done").is_file():
        write_reference_labels(cfg.data_dir, reference)
        (reference / ".done").write_text("")
    rows: list[dict] = []
    ranking: dict[str, dict[int, float]] = {"ranking_auc_normalised": {}, "ranking_auc_raw": {}}
    bar = progress_bar(_tasks(cfg), desc="study", unit="cell", disable=not progress)
    for kind, variant, setting, seed in bar:
        bar.set_postfix_str(f"seed {seed} {kind} {variant}" + (f" labels={setting}" if setting else ""))
        if kind == "pretrain":
            _pretrain(cfg, variant, seed)
        elif kind == "ranking":
            auc = _cached(out / f"seed{seed}" / "ranking.json", lambda s=seed: ranking_quality(
                out / f"seed{s}" / "pretrain_AnatoMask", cfg.data_dir, patch=cfg.patch,
                n_patches=cfg.ranking_patches, seed=s))
            ranking["ranking_auc_normalised"][seed] = auc["normalised"]
            ranking["ranking_auc_raw"][seed] = auc["raw"]
        else:
            rows += _finetune_cell(cfg, variant, setting, seed, reference)
    summary = summarise_study(rows, reference="AnatoMask",
                              baselines=tuple(v for v in ("SparK", "scratch") if v in cfg.variants))
    info = DatasetInfo.read(cfg.data_dir)
    meta = {"title": "Study: scratch vs SparK vs AnatoMask finetuning, seeded",
            "command": command or "anatomask_lab.study.run_study(...)", "machine": device_name(cfg.device),
            "data": data_label or f"{info.name} ({len(info.split('test'))} test cases)",
            "scale": f"{'CPU' if cfg.device == 'cpu' else cfg.device} scale: tiny STU-Net, "
                     f"{cfg.pretrain_epochs * cfg.pretrain_iters} pretraining and "
                     f"{cfg.finetune_epochs * cfg.finetune_iters} finetuning steps per run, {cfg.amp}",
            "platform": platform.platform(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": code_version(), "wall_time_s": round(_previous_wall_time(out) + time.perf_counter() - t0, 1),
            "seeds": list(cfg.seeds), "settings": list(cfg.settings), "variants": list(cfg.variants),
            "config": asdict(cfg)}
    files = write_study_report(rows, summary, out, meta, extras=ranking)
    text = files["markdown"].read_text() + "\n" + learning_curves_markdown(cfg)
    atomic_write(files["markdown"], lambda p: p.write_text(text))
    return files


def _previous_wall_time(out: Path) -> float:
    """Wall time of earlier calls on this study folder (a resumed study reports the sum over its calls)."""
    try:
        return float(json.loads((out / "study.json").read_text())["meta"]["wall_time_s"])
    except (OSError, KeyError, TypeError, ValueError):
        return 0.0


def learning_curves_markdown(cfg: StudyConfig) -> str:
    """What changes even where scores do not: pretraining losses per epoch and finetuning's last losses and
    validation Dice, means ± SD over seeds (read back from the runs' ``metrics.jsonl``)."""
    from anatomask_lab.runs import read_metrics

    out = Path(cfg.out_dir)
    pretrained = [v for v in cfg.variants if VARIANTS[v] is not None]
    curves = {v: [read_metrics(out / f"seed{s}" / f"pretrain_{v}", "epoch") for s in cfg.seeds] for v in pretrained}
    lines = ["## Learning curves (means ± SD over seeds)", "",
             "Pretraining reconstruction loss per epoch (normalised-target MSE on the masked patches). AnatoMask's "
             "student is scored on the patches its teacher found hardest, so its loss sits above SparK's by design; "
             "the teacher's loss is on its own random mask.", "",
             "| epoch | " + " | ".join(f"{v} student" for v in pretrained)
             + (" | AnatoMask teacher |" if "AnatoMask" in curves else " |"),
             "|---" * (len(pretrained) + 1 + ("AnatoMask" in curves)) + "|"]
    for e in range(cfg.pretrain_epochs):
        cells = [_pm([r[e]["loss"] for r in curves[v] if len(r) > e]) for v in pretrained]
        if "AnatoMask" in curves:
            cells.append(_pm([r[e]["teacher_loss"] for r in curves["AnatoMask"] if len(r) > e]))
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += ["", "Finetuning at the end: training loss (Dice+CE) of the last epoch and validation Dice.", "",
              "| labels | variant | last training loss | validation Dice (%) |", "|---|---|---|---|"]
    for setting in cfg.settings:
        for v in cfg.variants:
            recs = [read_metrics(out / f"seed{s}" / f"labels_{setting}" / v / "finetune", "epoch") for s in cfg.seeds]
            loss = _pm([r[-1]["loss"] for r in recs if r])
            val = _pm([100 * x["val_dice"] for r in recs for x in r[-1:] if "val_dice" in x], 1)
            lines.append(f"| {setting} | {v} | {loss} | {val} |")
    return "\n".join(lines) + "\n"


def _pm(values: list[float], digits: int = 4) -> str:
    if not values:
        return "n/a"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return f"{np.mean(values):.{digits}f} ± {sd:.{digits}f}"


def _cached(path: Path, compute) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_json(path, value)
    return value


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("study", help="variants x label settings x seeds, with confidence intervals",
                              description=CLI_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = StudyConfig(data_dir="", out_dir="")
    p.add_argument("--data", help="prepared dataset (default: a phantom cohort generated under OUT/data)")
    p.add_argument("--out", required=True, help="study folder; a second call resumes it")
    p.add_argument("--phantom-cases", type=int, default=40, help="cases of the generated phantom cohort "
                   "(default: 40, of which 8 are tested)")
    p.add_argument("--seeds", type=int, default=len(d.seeds), help=f"number of seeds (default: {len(d.seeds)})")
    p.add_argument("--variants", nargs="+", default=list(d.variants), choices=sorted(VARIANTS), metavar="VARIANT",
                   help=f"variants to compare, of {', '.join(sorted(VARIANTS))} (default: {' '.join(d.variants)})")
    p.add_argument("--settings", nargs="+", default=list(d.settings),
                   help=f"label settings: 'all' or a number of labelled cases (default: {' '.join(d.settings)})")
    for name, text in (("patch", "pretraining patch edge in voxels"), ("pretrain_epochs", "pretraining epochs"),
                       ("pretrain_iters", "pretraining iterations per epoch"), ("finetune_epochs", "finetuning epochs"),
                       ("finetune_iters", "finetuning iterations per epoch")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                       help=f"{text} (default: {getattr(d, name)})")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr,
                   help=f"finetuning learning rate (default: {d.finetune_lr})")
    p.add_argument("--device", default=d.device, help=f"device: cpu, cuda, cuda:N (default: {d.device})")
    p.add_argument("--amp", default=d.amp, choices=["auto", "bf16", "fp16", "fp32"],
                   help=f"precision (default: {d.amp})")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    import sys

    from anatomask_lab.lab import ensure_phantom_dataset

    label = None if args.data else f"phantom cohort ({args.phantom_cases} generated cases)"
    data = args.data or str(ensure_phantom_dataset(Path(args.out) / "data" / "prepared", cases=args.phantom_cases,
                                                   shape=(96, 96, 80), spacing=(3.0, 3.0, 3.75), progress=True))
    cfg = StudyConfig(data_dir=data, out_dir=args.out, seeds=tuple(range(args.seeds)),
                      variants=tuple(args.variants), settings=tuple(args.settings), patch=args.patch,
                      pretrain_epochs=args.pretrain_epochs, pretrain_iters=args.pretrain_iters,
                      finetune_epochs=args.finetune_epochs, finetune_iters=args.finetune_iters,
                      finetune_lr=args.finetune_lr, device=args.device, amp=args.amp)
    files = run_study(cfg, command="anatomask-lab " + " ".join(sys.argv[1:]), data_label=label)
    print(f"study report: {files.get('markdown', Path(args.out) / 'study.md')}")
    return 0
