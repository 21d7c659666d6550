"""Finetuning: a full STU-Net initialised from a pretrained encoder (or from scratch), Dice+CE with deep supervision,
validation Dice for early stopping, atomic checkpoints with resume, and prediction of a dataset split."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from anatomask_lab.augment import random_rotate_scale
from anatomask_lab.inference import sliding_window_predict
from anatomask_lab.losses import deep_supervision_loss
from anatomask_lab.models import build_stunet, load_encoder_weights
from anatomask_lab.pretrain import autocast_dtype, resolve_device
from anatomask_lab.runs import MetricsLog, code_version, load_checkpoint, save_checkpoint, write_json_atomic
from anatomask_lab.schedules import cosine_lr

__all__ = ["FinetuneConfig", "build_segmenter", "finetune_config", "load_init", "load_segmenter", "run"]


@dataclass(frozen=True)
class FinetuneConfig:
    """One finetuning run (defaults: the reference recipe; ``preset="tiny"`` is the CPU teaching scale).

    Attributes:
        init: "scratch", a pretraining run folder / checkpoint, or an exported encoder (``anatomask-lab export``).
        patch_size: 128^3 as STU-Net's plans (the full network downsamples by 32, so 112 does not fit).
        iters_per_epoch: 250 as nnU-Net.
        val_every: validation Dice on the validation split every N epochs; the best checkpoint is kept.
        fg_oversample: share of patches centred on foreground (nnU-Net: 0.33).
        rotate_scale_p: probability of a random rotation (up to 30 degrees per axis) and scaling (0.7-1.4) per
            sample, as nnU-Net's augmentation (0 = off; the paper's finetuning uses nnU-Net's pipeline).
    """

    data_dir: str = "data/phantom_prepared"
    out_dir: str = "runs/finetune"
    size: str = "B"
    init: str = "scratch"
    patch_size: tuple[int, int, int] = (128, 128, 128)
    batch_size: int = 2
    epochs: int = 1000
    iters_per_epoch: int = 250
    lr: float = 1e-4
    weight_decay: float = 1e-5
    eps: float = 1e-4
    grad_clip: float = 12.0
    deep_supervision: bool = True
    fg_oversample: float = 0.33
    flips: bool = True
    rotate_scale_p: float = 0.0
    val_every: int = 10
    val_cases: int | None = None
    overlap: float = 0.5
    amp: str = "auto"
    device: str = "auto"
    workers: int = 2
    ckpt_every: int = 10
    seed: int = 0
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or any(p <= 0 or p % 32 for p in self.patch_size):
            raise ValueError(f"patch_size must be three positive multiples of 32, got {self.patch_size}")
        for name in ("batch_size", "epochs", "iters_per_epoch", "val_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("fg_oversample", "rotate_scale_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "patch_size": (64, 64, 64), "batch_size": 2, "epochs": 4, "iters_per_epoch": 10,
             "lr": 3e-3, "val_every": 2, "workers": 0, "ckpt_every": 1},
    "S": {"size": "S"}, "B": {"size": "B"}, "L": {"size": "L"}, "H": {"size": "H"},
}


def finetune_config(preset: str = "B", **overrides: Any) -> FinetuneConfig:
    """Preset + flat overrides (``None`` values ignored), as for pretraining."""
    if preset not in FINETUNE_PRESETS:
        raise ValueError(f"preset must be one of {sorted(FINETUNE_PRESETS)}, got {preset!r}")
    known = {f.name for f in fields(FinetuneConfig)}
    values = dict(FINETUNE_PRESETS[preset])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in known:
            raise ValueError(f"unknown finetuning parameter {key!r}")
        values[key] = tuple(value) if key == "patch_size" else value
    return FinetuneConfig(**values)


def _config_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    d["patch_size"] = list(cfg.patch_size)
    return d


def _config_from(d: dict[str, Any]) -> FinetuneConfig:
    d = dict(d)
    d["patch_size"] = tuple(d["patch_size"])
    return replace(FinetuneConfig(), **d)


# ----------------------------------------------------------------------------------------------------------------
# model and initialisation
# ----------------------------------------------------------------------------------------------------------------
def build_segmenter(size: str, in_channels: int, num_classes: int, deep_supervision: bool = True) -> nn.Module:
    return build_stunet(size, in_channels=in_channels, num_classes=num_classes, deep_supervision=deep_supervision)


def _encoder_state(init: str) -> dict[str, torch.Tensor]:
    path = Path(init)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    if "student" in state:  # a pretraining checkpoint: the student's encoder
        return {k[len("encoder."):]: v for k, v in state["student"].items() if k.startswith("encoder.")}
    if "encoder" in state and isinstance(state["encoder"], dict):  # an export
        return state["encoder"]
    raise ValueError(f"{path}: neither a pretraining checkpoint nor an exported encoder")


def load_init(model: nn.Module, init: str) -> dict[str, Any]:
    """Initialise ``model``'s encoder from ``init``; returns the load report (loaded / missing / unexpected)."""
    if init == "scratch":
        return {"init": "scratch", "loaded": [], "missing": [], "unexpected": []}
    report = dataclasses.asdict(load_encoder_weights(model, _encoder_state(init)))
    return {"init": str(init), **{k: list(v) for k, v in report.items()}}


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------
def run(cfg: FinetuneConfig | None = None, *, resume: bool = False, **overrides: Any) -> Path:
    """Finetune as ``cfg`` says; returns the run folder (``config.json``, ``metrics.jsonl``, ``init_report.json``,
    ``checkpoints/last.pt`` and ``checkpoints/best.pt``)."""
    from anatomask_lab.data.sampler import PatchDataset, read_dataset_json

    out = Path(cfg.out_dir if cfg is not None else overrides.get("out_dir", "runs/finetune"))
    state = None
    if resume:
        state = load_checkpoint(out / "checkpoints" / "last.pt")
        cfg = replace(_config_from(state["config"]), out_dir=str(out))
    elif cfg is None:
        cfg = finetune_config(**overrides)
    device = resolve_device(cfg.device)
    meta = read_dataset_json(cfg.data_dir)
    num_classes = len(meta["labels"])
    in_channels = len(meta["channels"])

    torch.manual_seed(cfg.seed)
    model = build_segmenter(cfg.size, in_channels, num_classes, cfg.deep_supervision).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, step, best = 0, 0, -math.inf
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, best = state["epoch"], state["step"], state["best_dice"]
        torch.set_rng_state(state["torch_rng"])
    else:
        report = load_init(model, cfg.init)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", _config_dict(cfg))
        write_json_atomic(out / "version.json", code_version())
        write_json_atomic(out / "init_report.json", report)
        if not cfg.quiet and cfg.init != "scratch":
            print(f"encoder init from {cfg.init}: {len(report['loaded'])} tensors loaded, "
                  f"{len(report['missing'])} missing, {len(report['unexpected'])} unexpected")
    log = MetricsLog(out / "metrics.jsonl")

    dataset = PatchDataset(cfg.data_dir, split="train", patch_size=cfg.patch_size, with_label=True,
                           fg_oversample=cfg.fg_oversample, flips=cfg.flips, seed=cfg.seed,
                           samples_per_epoch=cfg.iters_per_epoch * cfg.batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, drop_last=True,
                                         num_workers=cfg.workers, persistent_workers=False)
    total_steps = cfg.epochs * cfg.iters_per_epoch
    for epoch in tqdm(range(start_epoch, cfg.epochs), desc="finetune", disable=cfg.quiet, initial=start_epoch,
                      total=cfg.epochs, unit="epoch"):
        dataset.set_epoch(epoch)
        model.train()
        t0, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        for batch in tqdm(loader, total=cfg.iters_per_epoch, leave=False, disable=cfg.quiet, desc=f"epoch {epoch}"):
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            if cfg.rotate_scale_p > 0:
                x, y = random_rotate_scale(x, y, p=cfg.rotate_scale_p)
            lr = cosine_lr(step, total_steps, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(x)
            outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
            loss = deep_supervision_loss(outputs, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
            step += 1
        epoch_loss = float(loss_sum) / cfg.iters_per_epoch
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"non-finite finetuning loss in epoch {epoch}; last good checkpoint kept in "
                                     f"{out / 'checkpoints'}")
        record: dict[str, Any] = {"type": "epoch", "epoch": epoch, "step": step, "loss": epoch_loss, "lr": lr,
                                  "seconds": time.perf_counter() - t0}
        is_val = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
        if is_val:
            record["val_dice"] = validation_dice(model, cfg, meta, device, amp_dtype)
        log.write(**record)
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "step": step, "best_dice": best, "torch_rng": torch.get_rng_state(),
                "config": _config_dict(cfg), "num_classes": num_classes, "in_channels": in_channels}
        if is_val and record["val_dice"] > best:
            best = ckpt["best_dice"] = record["val_dice"]
            save_checkpoint(out / "checkpoints" / "best.pt", ckpt)
        if (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs:
            save_checkpoint(out / "checkpoints" / "last.pt", ckpt)
    return out


def _split_cases(meta: dict[str, Any], split: str) -> list[str]:
    return list(meta["splits"][split])


@torch.no_grad()
def validation_dice(model: nn.Module, cfg: FinetuneConfig, meta: dict[str, Any], device, amp_dtype) -> float:
    """Mean foreground Dice over the validation cases (preprocessed space), from sliding-window predictions."""
    from anatomask_lab.data.sampler import load_case

    model.eval()
    cases = _split_cases(meta, "val") or _split_cases(meta, "train")
    cases = cases[: cfg.val_cases] if cfg.val_cases else cases
    num_classes = len(meta["labels"])
    scores = []
    for case in cases:
        image, label, _ = load_case(cfg.data_dir, case)
        prob = sliding_window_predict(model, np.asarray(image), cfg.patch_size, num_classes, overlap=cfg.overlap,
                                      device=device, amp_dtype=amp_dtype, batch_size=cfg.batch_size)
        pred = prob.argmax(0).numpy()
        gt = np.asarray(label)
        for k in range(1, num_classes):
            p, g = pred == k, gt == k
            if g.any():
                scores.append(2.0 * np.logical_and(p, g).sum() / (p.sum() + g.sum()))
    model.train()
    return float(np.mean(scores)) if scores else 0.0


def load_segmenter(run_or_ckpt: str | Path, which: str = "best", device: str = "cpu") -> tuple[nn.Module, dict]:
    """A finetuned STU-Net in eval mode (without deep supervision) and its checkpoint's config."""
    path = Path(run_or_ckpt)
    if path.is_dir():
        path = path / "checkpoints" / f"{which}.pt"
        if not path.is_file():
            path = path.with_name("last.pt")
    state = load_checkpoint(path)
    if "model" not in state:
        raise ValueError(f"{path}: not a finetuning checkpoint (no 'model' entry)")
    cfg = state["config"]
    model = build_segmenter(cfg["size"], state["in_channels"], state["num_classes"], deep_supervision=False)
    try:
        model.load_state_dict(state["model"], strict=False)
        missing = set(model.state_dict()) - set(state["model"])
        if missing:
            raise RuntimeError(f"missing keys {sorted(missing)[:5]}")
    except RuntimeError as exc:
        raise ValueError(f"{path}: checkpoint does not match STU-Net-{cfg['size']} "
                         f"({state['in_channels']} channels, {state['num_classes']} classes): {exc}") from exc
    return model.to(device).eval(), cfg


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="finetune STU-Net for segmentation from a pretrained encoder",
                              description="Finetune a full STU-Net (Dice+CE, deep supervision) initialised from a "
                              "pretraining run/checkpoint, an exported encoder, or from scratch.")
    p.add_argument("--preset", choices=sorted(FINETUNE_PRESETS), default="B")
    p.add_argument("--data", dest="data_dir", help="preprocessed dataset folder with labels")
    p.add_argument("--out", dest="out_dir", required=True)
    p.add_argument("--size", choices=["tiny", "S", "B", "L", "H"])
    p.add_argument("--init", help="'scratch', a pretraining run folder / checkpoint, or an exported encoder")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iters-per-epoch", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--patch-size", type=int, nargs=3)
    p.add_argument("--lr", type=float)
    p.add_argument("--val-every", type=int)
    p.add_argument("--val-cases", type=int)
    p.add_argument("--fg-oversample", type=float)
    p.add_argument("--rotate-scale-p", type=float, help="probability of random rotation + scaling per sample")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device")
    p.add_argument("--workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true", default=None)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    if args.resume:
        out = run(resume=True, out_dir=args.out_dir)
    else:
        params = {k: v for k, v in vars(args).items() if k not in ("func", "command", "preset", "resume")}
        out = run(finetune_config(args.preset, **params))
    print(f"run folder: {out}")
    return 0
