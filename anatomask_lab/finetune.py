"""Finetuning: a full STU-Net initialised from a pretrained encoder (or from scratch), Dice+CE with deep supervision,
validation Dice for early stopping, atomic checkpoints with resume.

The step is :func:`train_step` (forward under autocast, deep-supervision loss, the shared
:func:`anatomask_lab.runtime.optimizer_step`), the twin of :func:`anatomask_lab.pretrain.train_step`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from anatomask_lab.augment import random_rotate_scale
from anatomask_lab.cluster import dist_info
from anatomask_lab.config import FINETUNE_PRESETS, FinetuneConfig, config_to_dict, finetune_config
from anatomask_lab.data.dataset import DatasetInfo
from anatomask_lab.inference import sliding_window_predict
from anatomask_lab.losses import deep_supervision_loss
from anatomask_lab.models import build_stunet, load_encoder_weights
from anatomask_lab.progress import progress
from anatomask_lab.runs import (
    RunFolderError,
    check_finite_weights,
    checkpoint_path,
    code_version,
    encoder_from_state,
    load_checkpoint,
    prepare_run_folder,
    resumed_config,
    run_lock,
    save_checkpoint,
    stopped_note,
    write_json_atomic,
)
from anatomask_lab.runtime import autocast, autocast_dtype, optimizer_step, resolve_device
from anatomask_lab.schedules import cosine_lr, poly_lr
from anatomask_lab.stopping import (
    STOP_EXIT_CODE,
    RunStopped,
    SkipSampler,
    StopRequest,
    epoch_sums,
    ignore_stop_signals,
    stop_run,
    stop_signals,
)
from anatomask_lab.stunet_weights import is_stunet_checkpoint, load_stunet_weights, read_weights_file
from anatomask_lab.tracking import RunLog, check_backend

__all__ = ["FinetuneConfig", "build_segmenter", "finetune_config", "load_init", "load_segmenter", "run", "train_step"]


# ----------------------------------------------------------------------------------------------------------------
# model and initialisation
# ----------------------------------------------------------------------------------------------------------------
def build_segmenter(size: str, in_channels: int, num_classes: int, deep_supervision: bool = True) -> nn.Module:
    return build_stunet(size, in_channels=in_channels, num_classes=num_classes, deep_supervision=deep_supervision)


def load_init(model: nn.Module, init: str, axes: str = "auto") -> dict[str, Any]:
    """Initialise ``model`` from ``init``; returns the load report (``docs/weights.md``).

    Args:
        model: the kit's STUNet.
        init: ``"scratch"``; a pretraining run folder, checkpoint or export (the encoder is loaded; report keys
            relative to the encoder); or STU-Net weights, an nnU-Net-style file with ``state_dict`` /
            ``network_weights`` (everything but the segmentation heads is loaded, as STU-Net's finetuning does;
            report keys of the whole network, see :class:`anatomask_lab.stunet_weights.StunetLoadReport`).
        axes: the axis order of the file's kernels: ``"auto"``, ``"stunet"`` (z, y, x: transposed) or ``"kit"``.

    Raises:
        ValueError: an unreadable or foreign file, or weights of another architecture (one line naming the file).
    """
    if init == "scratch":
        return {"init": "scratch", "loaded": [], "missing": [], "unexpected": []}
    file = checkpoint_path(init)
    state = read_weights_file(file)
    if is_stunet_checkpoint(state):
        report = dataclasses.asdict(load_stunet_weights(model, state, file, axes))
        return {"init": str(init), "naming": "stunet", **{k: v if isinstance(v, str) else list(v)
                                                          for k, v in report.items()}}
    encoder = encoder_from_state(state, file, axes)
    try:
        report = dataclasses.asdict(load_encoder_weights(model, encoder))
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from None
    return {"init": str(init), "naming": "anatomask", **{k: list(v) for k, v in report.items()}}


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """STU-Net's AdamW (``eps`` as configured) or nnU-Net's SGD (Nesterov, momentum 0.99)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)


def learning_rate(cfg: FinetuneConfig, step: int, total_steps: int) -> float:
    """Cosine decay for AdamW (STU-Net), polynomial decay for SGD (nnU-Net)."""
    return poly_lr(step, total_steps, cfg.lr) if cfg.optimizer == "sgd" else cosine_lr(step, total_steps, cfg.lr)


# ----------------------------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------------------------
def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x_bcdhw: torch.Tensor, y_bdhw: torch.Tensor, cfg: FinetuneConfig, *,
               amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One optimisation step: forward (autocast), Dice+CE over the deep-supervision outputs, clipped step.

    Args:
        model: STU-Net (with or without deep supervision).
        x_bcdhw: image patches ``[B, C, D, H, W]``.
        y_bdhw: integer labels ``[B, D, H, W]``.
        cfg: gives ``grad_clip``.

    Returns:
        The loss (a detached 0-d tensor on the device; no host sync).
    """
    with autocast(x_bcdhw.device, amp_dtype):
        outputs = model(x_bcdhw)
    outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
    loss = deep_supervision_loss(outputs, y_bdhw)
    optimizer_step(loss, optimizer, scaler, model.parameters(), cfg.grad_clip)
    return loss.detach()


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------
def run(cfg: FinetuneConfig | None = None, *, resume: bool | str = False, overwrite: bool = False,
        **overrides: Any) -> Path:
    """Finetune as ``cfg`` says; returns the run folder (``config.json``, ``metrics.jsonl``, ``init_report.json``,
    and the ``last`` and ``best`` checkpoints, see :func:`anatomask_lab.runs.checkpoint_path`).

    ``resume`` and ``overwrite`` follow the run-folder rules of :func:`anatomask_lab.pretrain.run`
    (:func:`anatomask_lab.runs.prepare_run_folder`); the folder is locked while the run writes it.

    SIGTERM or SIGUSR1 stop the run after the current step with a checkpoint that ``resume`` continues exactly
    (:mod:`anatomask_lab.stopping`); finetuning runs in one process (:func:`anatomask_lab.cluster.dist_info`).

    Raises:
        RunFolderError: the folder is refused or locked, or ``out_dir`` is the ``init`` it reads.
        LaunchError: started as several processes (SLURM tasks or torchrun).
        FloatingPointError: a non-finite loss or non-finite weights; no checkpoint is written.
        RunStopped: a stop signal arrived; the checkpoint is written.
    """
    out = Path(cfg.out_dir if cfg is not None else overrides.get("out_dir", "runs/finetune"))
    dist_info("finetune", distributed=False)
    if cfg is not None:
        check_backend(cfg.log)
        if resume is not True:
            _check_init_not_out(cfg.init, out)
    with run_lock(out):
        state = prepare_run_folder(out, resume, overwrite)
        if state is not None:
            cfg = resumed_config(state, out, FinetuneConfig, cfg)
            if state["epoch"] >= cfg.epochs:
                return out
        elif cfg is None:
            cfg = finetune_config(**overrides)
        check_backend(cfg.log)
        with stop_signals() as stop:
            return _train(cfg, state, out, stop)


def _check_init_not_out(init: str, out: Path) -> None:
    """Refuse an output folder that is (or holds) the initialisation it reads: writing it would destroy it."""
    if init == "scratch":
        return
    source, target = Path(init).resolve(), out.resolve()
    if source == target or target in source.parents:
        raise RunFolderError(f"--out {out} is the --init it reads ({init}); write the finetuning run to another "
                             "folder")


def _train(cfg: FinetuneConfig, state: dict[str, Any] | None, out: Path, stop: StopRequest) -> Path:
    from anatomask_lab.data.sampler import PatchDataset

    device = resolve_device(cfg.device)
    info = DatasetInfo.read(cfg.data_dir)
    num_classes, in_channels = info.num_classes, info.in_channels

    torch.manual_seed(cfg.seed)
    model = build_segmenter(cfg.size, in_channels, num_classes, cfg.deep_supervision).to(device)
    optimizer = make_optimizer(model, cfg)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, step, best, partial = 0, 0, -math.inf, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, best, partial = state["epoch"], state["step"], state["best_dice"], state.get("partial")
        if partial is None:  # mid-epoch: restored once the loader has drawn its seed, as the stopped run had
            torch.set_rng_state(state["torch_rng"])
    else:
        _start_run(out, cfg, model)

    dataset = PatchDataset(cfg.data_dir, cases=training_cases(info, cfg), patch_size=cfg.patch_size,
                           with_label=True, fg_oversample=cfg.fg_oversample, flips=cfg.flips, seed=cfg.seed,
                           samples_per_epoch=cfg.iters_per_epoch * cfg.batch_size)
    sampler = SkipSampler(range(len(dataset)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=cfg.workers, persistent_workers=False,
                                         worker_init_fn=ignore_stop_signals)
    extra = {"config": config_to_dict(cfg), "num_classes": num_classes, "in_channels": in_channels}

    def checkpoint(epoch: int, part: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "best_dice": best, "torch_rng": torch.get_rng_state(),
                "partial": part, **extra}

    with RunLog(out, cfg.log, resume_step=None if state is None else step, config=extra["config"]) as log:
        for epoch in progress(range(start_epoch, cfg.epochs), desc="finetune", disable=cfg.quiet,
                              initial=start_epoch, total=cfg.epochs, unit="epoch"):
            dataset.set_epoch(epoch)
            model.train()
            done, loss_sum, _, seconds = epoch_sums(partial, device)
            sampler.skip = done * cfg.batch_size
            batches = iter(loader)
            if partial is not None:
                torch.set_rng_state(state["torch_rng"])
            partial, t0 = None, time.perf_counter()
            loss_sum = torch.zeros((), device=device) if loss_sum is None else loss_sum
            for i, batch in enumerate(progress(batches, total=cfg.iters_per_epoch, initial=done, leave=False,
                                               disable=cfg.quiet, desc=f"epoch {epoch}"), start=done):
                x = batch["image"].to(device, non_blocking=True)
                y = batch["label"].to(device, non_blocking=True)
                if cfg.rotate_scale_p > 0:
                    x, y = random_rotate_scale(x, y, p=cfg.rotate_scale_p)
                lr = learning_rate(cfg, step, cfg.epochs * cfg.iters_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum += train_step(model, optimizer, scaler, x, y, cfg, amp_dtype=amp_dtype)
                step += 1
                if i < cfg.iters_per_epoch - 1 and (signum := stop.agreed()):  # the last step ends the epoch
                    _check_loss(float(loss_sum), epoch, out)
                    check_finite_weights({"model": model}, out, epoch)
                    save_checkpoint(checkpoint_path(out), checkpoint(epoch, {
                        "done": i + 1, "loss_sum": float(loss_sum), "teacher_loss_sum": None,
                        "seconds": seconds + time.perf_counter() - t0}))
                    stop_run(out, signum, epoch, step, f"in epoch {epoch}, {i + 1} of {cfg.iters_per_epoch} "
                             "steps done")
            epoch_loss = float(loss_sum) / cfg.iters_per_epoch  # one host sync per epoch
            _check_loss(epoch_loss, epoch, out)
            record: dict[str, Any] = {"type": "epoch", "epoch": epoch, "step": step, "loss": epoch_loss, "lr": lr,
                                      "seconds": seconds + time.perf_counter() - t0}
            is_val = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
            if is_val:  # the best checkpoint may follow: its weights must be finite
                check_finite_weights({"model": model}, out, epoch)
                record["val_dice"] = validation_dice(model, cfg, info, device, amp_dtype)
            log.write(**record)
            signum = stop.agreed() if epoch + 1 < cfg.epochs else 0  # the last epoch just ends
            saves_last = (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs or bool(signum)
            if saves_last and not is_val:
                check_finite_weights({"model": model}, out, epoch)
            ckpt = checkpoint(epoch + 1)
            if is_val and record["val_dice"] > best:
                best = ckpt["best_dice"] = record["val_dice"]
                save_checkpoint(checkpoint_path(out, "best"), ckpt)
            if saves_last:
                save_checkpoint(checkpoint_path(out), ckpt)
            if signum:
                stop_run(out, signum, epoch + 1, step, f"at the end of epoch {epoch}")
    return out


def _check_loss(loss: float, epoch: int, out: Path) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite finetuning loss in epoch {epoch}; " + stopped_note(out))


def training_cases(info: DatasetInfo, cfg: FinetuneConfig) -> list[str]:
    """The labelled training cases a run uses: all of them, or ``labelled_cases`` drawn with ``cfg.seed`` (the
    same draw for every variant of one seed, so that low-label comparisons are paired).

    Raises:
        ValueError: more labelled cases requested than the training split has.
    """
    labelled = [c for c in info.split("train") if info.case(c).has_label]
    if cfg.labelled_cases is None:
        return labelled
    if cfg.labelled_cases > len(labelled):
        raise ValueError(f"labelled_cases {cfg.labelled_cases}: the training split of {cfg.data_dir} has only "
                         f"{len(labelled)} labelled cases")
    pick = np.random.default_rng([cfg.seed, 7919]).choice(len(labelled), cfg.labelled_cases, replace=False)
    return [labelled[i] for i in sorted(pick)]


def _start_run(out: Path, cfg: FinetuneConfig, model: nn.Module) -> None:
    """Initialise the encoder and write the new run folder's config, version, load report and the dataset's
    preprocessing recipe (``preprocessing.json``, read by ``predict --images``)."""
    from anatomask_lab.data.recipe import write_run_recipe

    report = load_init(model, cfg.init, cfg.init_axes)
    checkpoint_path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", config_to_dict(cfg))
    write_json_atomic(out / "version.json", code_version())
    write_json_atomic(out / "init_report.json", report)
    write_run_recipe(out, cfg.data_dir)
    if not cfg.quiet and cfg.init != "scratch":
        print(f"encoder init from {cfg.init}: {len(report['loaded'])} tensors loaded, "
              f"{len(report['missing'])} missing, {len(report['unexpected'])} unexpected")




@torch.no_grad()
def validation_dice(model: nn.Module, cfg: FinetuneConfig, info: DatasetInfo, device, amp_dtype) -> float:
    """Mean foreground Dice over the validation cases (preprocessed space), from sliding-window predictions."""
    from anatomask_lab.data.sampler import load_case

    model.eval()
    cases = list(info.split("val") or info.split("train"))
    cases = cases[: cfg.val_cases] if cfg.val_cases else cases
    num_classes = info.num_classes
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
    path = checkpoint_path(run_or_ckpt, which)
    if not path.is_file():
        path = checkpoint_path(run_or_ckpt, "last")
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
    from anatomask_lab.config_args import add_config_arguments, add_run_arguments

    p = subparsers.add_parser("finetune", help="finetune STU-Net for segmentation from a pretrained encoder",
                              description="Finetune a full STU-Net (Dice+CE, deep supervision) initialised from a "
                              "pretraining run/checkpoint, an exported encoder, or from scratch.")
    p.add_argument("--preset", choices=sorted(FINETUNE_PRESETS), default=None, help="model size and recipe "
                   "(default: B)")
    add_run_arguments(p)
    add_config_arguments(p, FinetuneConfig, FINETUNE_PRESETS, lambda preset: finetune_config(preset))
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from anatomask_lab.config_args import overrides_from_args
    from anatomask_lab.runs import run_from_cli

    def build() -> FinetuneConfig:
        return finetune_config(args.preset or "B", **overrides_from_args(args, FinetuneConfig))

    try:
        out = run_from_cli(args, FinetuneConfig, build, run, "finetune")
    except RunStopped as stopped:
        print(f"anatomask-lab finetune: {stopped}", file=sys.stderr)
        return STOP_EXIT_CODE
    if out is not None:
        print(f"run folder: {out}")
    return 0
