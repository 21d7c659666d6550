"""Pretraining: the AnatoMask step (EMA teacher -> hardest patches -> student), the SparK baseline, the loop.

One code path serves every method and ablation of the paper:

* ``anatomask``: the teacher (EMA of the student, eval mode, no gradients) reconstructs the batch under its own
  random mask; its per-patch losses on the patches it had to reconstruct rank the patches; the student's mask takes
  the ``floor(r_t * n_masked)`` hardest and fills the rest at random; the student learns; the teacher follows.
* ``spark``: random masking only; no teacher exists, so the baseline pays for no extra forward pass.
* ablations: a frozen random teacher, ``order="low"``, hard-to-easy dynamics, other gammas, the simple decoder.

Distributed runs use torchrun + DistributedDataParallel (NCCL on GPUs, Gloo on CPUs); only rank 0 writes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from anatomask_lab.config import PretrainConfig, config_from_dict, config_to_dict, pretrain_config
from anatomask_lab.ema import make_teacher, momentum_at, update_momentum
from anatomask_lab.masking import anatomask_mask, anatomical_ratio, mask_counts, random_mask
from anatomask_lab.models import build_mim, mim_loss
from anatomask_lab.runs import MetricsLog, code_version, load_checkpoint, save_checkpoint, write_json_atomic
from anatomask_lab.schedules import warmup_cosine_lr

__all__ = ["StepResult", "build_models", "mim_step", "run", "resolve_device", "autocast_dtype"]


# ----------------------------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """Tensors of one step (no host sync): student loss, teacher loss, the masks used and the teacher's ranking."""

    loss: torch.Tensor
    student_mask: torch.Tensor
    teacher_loss: torch.Tensor | None = None
    teacher_mask: torch.Tensor | None = None
    teacher_patch_loss: torch.Tensor | None = None


def teacher_patch_loss(
    teacher: nn.Module,
    x_bcdhw: torch.Tensor,
    gamma: float,
    *,
    generator: torch.Generator,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's per-patch loss under its own fresh random mask.

    Returns:
        ``(patch_loss_bg, teacher_mask_bg, teacher_loss)``: losses ``[B, *grid]`` with ``-inf`` on the patches the
        teacher saw (not scored), its mask, and its scalar loss over the masked patches.
    """
    b, grid = x_bcdhw.shape[0], _grid(x_bcdhw)
    with torch.no_grad():
        t_mask_bg = random_mask(b, grid, gamma, generator=generator, device=x_bcdhw.device)
        recon = teacher(x_bcdhw, t_mask_bg)
        t_loss, t_patch_bg = mim_loss(recon, x_bcdhw, t_mask_bg, normalize_ranking=normalize)
        t_patch_bg = t_patch_bg.float().masked_fill(~t_mask_bg, -math.inf)
    return t_patch_bg, t_mask_bg, t_loss


def mim_step(
    student: nn.Module,
    teacher: nn.Module | None,
    x_bcdhw: torch.Tensor,
    *,
    gamma: float,
    r_t: float,
    generator: torch.Generator,
    order: str = "high",
    normalize_ranking: bool = True,
) -> StepResult:
    """Forward of one MIM step (the caller runs backward and the optimiser).

    With ``teacher=None`` this is SparK (random masking); otherwise AnatoMask with that teacher.
    """
    b, grid = x_bcdhw.shape[0], _grid(x_bcdhw)
    if teacher is None:
        s_mask_bg = random_mask(b, grid, gamma, generator=generator, device=x_bcdhw.device)
        t_patch_bg = t_mask_bg = t_loss = None
    else:
        t_patch_bg, t_mask_bg, t_loss = teacher_patch_loss(
            teacher, x_bcdhw, gamma, generator=generator, normalize=normalize_ranking
        )
        s_mask_bg = anatomask_mask(t_patch_bg, gamma, r_t, generator=generator, order=order)
    recon = student(x_bcdhw, s_mask_bg)
    loss, _ = mim_loss(recon, x_bcdhw, s_mask_bg)
    return StepResult(loss, s_mask_bg, t_loss, t_mask_bg, t_patch_bg)


def train_step(
    model: nn.Module,
    student: nn.Module,
    teacher: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x_bcdhw: torch.Tensor,
    *,
    cfg: PretrainConfig,
    r_t: float,
    m: float | None,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None = None,
) -> StepResult:
    """One optimisation step: masks, forward, backward, clipped optimiser step, then the teacher's EMA update.

    ``model`` is the student or its DDP wrapper; ``m=None`` leaves the teacher as it is (SparK, frozen teacher).
    """
    device_type = x_bcdhw.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        res = mim_step(model, teacher, x_bcdhw, gamma=cfg.masking.gamma, r_t=r_t, generator=generator,
                       order=cfg.masking.order, normalize_ranking=cfg.masking.normalize_ranking)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(res.loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if m is not None and teacher is not None:
        update_momentum(student, teacher, m)
    return res


def _grid(x_bcdhw: torch.Tensor) -> tuple[int, ...]:
    spatial = tuple(x_bcdhw.shape[2:])
    if any(s % 16 for s in spatial):
        raise ValueError(f"input spatial size {spatial} is not a multiple of the total encoder stride 16")
    return tuple(s // 16 for s in spatial)


# ----------------------------------------------------------------------------------------------------------------
# setup helpers
# ----------------------------------------------------------------------------------------------------------------
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype: bf16 on CUDA where supported (a deviation from the fp32 reference), else None."""
    if amp == "fp32" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def build_models(cfg: PretrainConfig, device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """Student and teacher (None for SparK). The frozen-teacher ablation draws its own random weights."""
    m = cfg.model
    kwargs = dict(
        in_channels=m.in_channels,
        backend=m.backend,
        decoder=m.decoder,
        norm_pooling=m.norm_pooling,
        decoder_width=m.decoder_width,
        grad_checkpointing=m.grad_checkpointing,
    )
    torch.manual_seed(cfg.seed)
    student = build_mim(m.size, **kwargs).to(device)
    if cfg.method == "spark":
        return student, None
    if cfg.teacher == "frozen":
        torch.manual_seed(cfg.seed + 1)
        return student, make_teacher(build_mim(m.size, **kwargs).to(device))
    return student, make_teacher(student)


def _make_loader(cfg: PretrainConfig, world: int, rank: int):
    from anatomask_lab.data.sampler import PatchDataset

    probe = PatchDataset(cfg.data_dir, split="train", patch_size=cfg.patch_size, seed=cfg.seed)
    n_cases = len(probe.case_ids)
    iters = cfg.iters_per_epoch or max(1, n_cases // (cfg.batch_size * world))
    dataset = PatchDataset(
        cfg.data_dir,
        split="train",
        patch_size=cfg.patch_size,
        seed=cfg.seed,
        samples_per_epoch=iters * cfg.batch_size * world,
    )
    sampler = None
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=cfg.workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
    return dataset, sampler, loader, iters


def _dist_info() -> tuple[int, int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------
def run(cfg: PretrainConfig | None = None, *, resume: bool = False, **overrides: Any) -> Path:
    """Pretrain as ``cfg`` says (or ``pretrain_config(**overrides)``); returns the run folder.

    Writes ``config.json``, ``version.json``, ``metrics.jsonl`` and ``checkpoints/last.pt`` (every
    ``ckpt_every`` epochs and at the end) under ``cfg.out_dir``. With ``resume=True`` it continues from
    ``checkpoints/last.pt`` using the configuration stored in the run folder.
    """
    out = Path(cfg.out_dir if cfg is not None else overrides.get("out_dir", "runs/pretrain"))
    ckpt_path = out / "checkpoints" / "last.pt"
    state = None
    if resume:
        state = load_checkpoint(ckpt_path)
        cfg = replace(config_from_dict(state["config"]), out_dir=str(out))
        if state["epoch"] >= cfg.epochs:
            return out
    elif cfg is None:
        cfg = pretrain_config(**overrides)

    rank, world, local_rank = _dist_info()
    device = resolve_device(cfg.device, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    is_main = rank == 0
    try:
        return _train(cfg, state, out, device, rank, world, is_main)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, state, out: Path, device, rank: int, world: int, is_main: bool) -> Path:
    student, teacher = build_models(cfg, device)
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay
    )
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    dataset, sampler, loader, iters = _make_loader(cfg, world, rank)
    total_steps = cfg.epochs * iters
    start_epoch, step = 0, 0

    if state is not None:
        student.load_state_dict(state["student"])
        if teacher is not None and state.get("teacher") is not None:
            teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step = state["epoch"], state["step"]
        if rank < len(state["mask_rng"]):
            generator.set_state(state["mask_rng"][rank])
        torch.set_rng_state(state["torch_rng"])
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        write_json_atomic(out / "config.json", config_to_dict(cfg))
        write_json_atomic(out / "version.json", code_version())
    log = MetricsLog(out / "metrics.jsonl", enabled=is_main)
    model = DistributedDataParallel(student) if world > 1 else student
    n = math.prod(s // 16 for s in cfg.patch_size)
    ema = cfg.teacher == "ema" and teacher is not None

    epoch_bar = tqdm(
        range(start_epoch, cfg.epochs),
        desc=f"pretrain {cfg.method}",
        disable=cfg.quiet or not is_main,
        initial=start_epoch,
        total=cfg.epochs,
        unit="epoch",
    )
    for epoch in epoch_bar:
        dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        student.train()
        t_epoch, loss_sum, t_loss_sum, finite = time.perf_counter(), None, None, None
        it_bar = tqdm(
            loader,
            total=iters,
            leave=False,
            desc=f"epoch {epoch}",
            disable=cfg.quiet or not is_main,
            unit="it",
        )
        t_log, n_log = time.perf_counter(), 0
        for i, batch in enumerate(it_bar):
            x = batch["image"].to(device, non_blocking=True)
            progress = step / total_steps
            t_frac = epoch + (i / iters if cfg.masking.per_iteration else 0.0)
            r_t = anatomical_ratio(t_frac, cfg.epochs, cfg.masking.r0, cfg.masking.rT)
            lr = warmup_cosine_lr(step, total_steps, cfg.warmup_epochs * iters, cfg.lr, cfg.warmup_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            m = momentum_at(progress, cfg.momentum0, cfg.momentum1, cfg.momentum_warmup)
            res = train_step(model, student, teacher, optimizer, scaler, x, cfg=cfg, r_t=r_t, m=m if ema else None,
                             generator=generator, amp_dtype=amp_dtype)
            step += 1
            n_log += x.shape[0]
            loss_d = res.loss.detach().float()
            loss_sum = loss_d if loss_sum is None else loss_sum + loss_d
            finite = torch.isfinite(loss_d) if finite is None else finite & torch.isfinite(loss_d)
            if res.teacher_loss is not None:
                t_d = res.teacher_loss.detach().float()
                t_loss_sum = t_d if t_loss_sum is None else t_loss_sum + t_d
            if step % cfg.log_every == 0 or i == iters - 1:  # the only host syncs of the loop
                _check_finite(finite, epoch, step, out)
                elapsed = time.perf_counter() - t_log
                rec = dict(
                    type="step",
                    epoch=epoch,
                    step=step,
                    loss=float(loss_d),
                    teacher_loss=None if res.teacher_loss is None else float(res.teacher_loss),
                    r_t=r_t,
                    n_top=mask_counts(n, cfg.masking.gamma, r_t)[1] if teacher is not None else 0,
                    n_masked=mask_counts(n, cfg.masking.gamma)[0],
                    lr=lr,
                    momentum=m if ema else None,
                    samples_per_s=n_log * world / max(elapsed, 1e-9),
                )
                log.write(**rec)
                it_bar.set_postfix(loss=f"{rec['loss']:.4f}", r_t=f"{r_t:.3f}", lr=f"{lr:.2e}")
                t_log, n_log = time.perf_counter(), 0
        _check_finite(finite, epoch, step, out)
        epoch_loss = float(loss_sum) / iters
        epoch_rec = dict(
            type="epoch",
            epoch=epoch,
            step=step,
            loss=epoch_loss,
            teacher_loss=None if t_loss_sum is None else float(t_loss_sum) / iters,
            r_t=r_t,
            lr=lr,
            seconds=time.perf_counter() - t_epoch,
        )
        log.write(**epoch_rec)
        epoch_bar.set_postfix(loss=f"{epoch_loss:.4f}", r_t=f"{r_t:.3f}")
        if (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs:
            mask_rng = _gather_rng(generator, world)  # every rank takes part
            if is_main:
                save_checkpoint(
                    out / "checkpoints" / "last.pt",
                    _state(cfg, student, teacher, optimizer, scaler, epoch + 1, step, mask_rng),
                )
    if world > 1 and teacher is not None:
        _assert_teacher_consistent(teacher)
    return out


def _check_finite(finite: torch.Tensor | None, epoch: int, step: int, out: Path) -> None:
    if finite is not None and not bool(finite):
        raise FloatingPointError(
            f"non-finite loss in epoch {epoch} (by step {step}); the run stops here. The last good checkpoint "
            f"({out / 'checkpoints' / 'last.pt'}) is untouched: lower the learning rate or check the data, then "
            f"resume."
        )


def _gather_rng(generator: torch.Generator, world: int) -> list[torch.Tensor]:
    """Every rank's mask-generator state (all ranks must call this)."""
    own = generator.get_state().cpu()
    if world == 1:
        return [own]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, own)
    return gathered


def _state(cfg, student, teacher, optimizer, scaler, epoch, step, mask_rng) -> dict[str, Any]:
    return {
        "student": student.state_dict(),
        "teacher": None if teacher is None else teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "mask_rng": mask_rng,
        "torch_rng": torch.get_rng_state(),
        "config": config_to_dict(cfg),
    }


def _assert_teacher_consistent(teacher: nn.Module) -> None:
    checksum = torch.stack([p.detach().double().sum() for p in teacher.parameters()]).sum().reshape(1).cpu()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, checksum)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"teachers diverged across ranks: {[float(g) for g in gathered]}")


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def add_cli(subparsers) -> None:
    from anatomask_lab.config import ABLATIONS, PRESETS

    p = subparsers.add_parser(
        "pretrain", help="pretrain a sparse STU-Net encoder with AnatoMask or SparK",
        description="Pretrain with AnatoMask (EMA teacher, reconstruction-guided masks) or SparK (random masks). "
        "Multi-GPU: torchrun --nproc_per_node N -m anatomask_lab.cli pretrain ...",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="B")
    p.add_argument("--method", choices=["anatomask", "spark"])
    p.add_argument("--ablation", choices=sorted(ABLATIONS), default="none")
    p.add_argument("--data", dest="data_dir", help="preprocessed dataset folder")
    p.add_argument("--out", dest="out_dir", required=True, help="run folder")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iters-per-epoch", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--patch-size", type=int, nargs=3)
    p.add_argument("--gamma", type=float)
    p.add_argument("--r0", type=float)
    p.add_argument("--rT", type=float)
    p.add_argument("--order", choices=["high", "low"])
    p.add_argument("--per-iteration", action="store_true", default=None, help="advance r_t every iteration")
    p.add_argument("--raw-ranking", dest="normalize_ranking", action="store_false", default=None,
                   help="rank patches by the loss against raw intensities (the authors' code)")
    p.add_argument("--teacher", choices=["ema", "frozen"])
    p.add_argument("--backend", choices=["masked", "spconv"])
    p.add_argument("--decoder", choices=["hierarchical", "simple"])
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device")
    p.add_argument("--workers", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true", default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    if args.resume:
        out = run(resume=True, out_dir=args.out_dir)
    else:
        params = {k: v for k, v in vars(args).items() if k not in ("func", "command", "preset", "ablation", "resume")}
        if params.get("patch_size") is not None:
            params["patch_size"] = tuple(params["patch_size"])
        cfg = pretrain_config(args.preset, args.ablation, **params)
        out = run(cfg)
    if _dist_info()[0] == 0:
        print(f"run folder: {out}")
    return 0
