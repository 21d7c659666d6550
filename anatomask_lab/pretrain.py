"""Pretraining: the AnatoMask step (EMA teacher -> hardest patches -> student), the SparK baseline, the loop.

One code path serves every method and ablation of the paper:

* ``anatomask``: the teacher (EMA of the student, eval mode, no gradients) reconstructs the batch under its own
  random mask; its per-patch losses on the patches it had to reconstruct rank the patches; the student's mask takes
  the ``floor(r_t * n_masked)`` hardest and fills the rest at random; the student learns; the teacher follows.
* ``spark``: random masking only; no teacher exists, so the baseline pays for no extra forward pass.
* ablations: a frozen random teacher, ``order="low"``, hard-to-easy dynamics, other gammas, the simple decoder.

Distributed runs use torchrun + DistributedDataParallel (NCCL on GPUs, Gloo on CPUs); only rank 0 writes, and the
logged losses are means over ranks. SIGTERM / SIGUSR1 stop a run after a step, resumably (``anatomask_lab.stopping``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from anatomask_lab.cluster import check_same_weights, dist_info, gather_across_ranks, mean_over_ranks
from anatomask_lab.config import PretrainConfig, config_to_dict, pretrain_config
from anatomask_lab.ema import make_teacher, momentum_at, update_momentum
from anatomask_lab.masking import anatomask_mask, anatomical_ratio, mask_counts, random_mask
from anatomask_lab.models import MIMModel, build_mim, mim_loss
from anatomask_lab.progress import progress
from anatomask_lab.runs import (
    check_finite_weights,
    checkpoint_path,
    code_version,
    prepare_run_folder,
    resumed_config,
    run_lock,
    save_checkpoint,
    stopped_note,
    write_json_atomic,
)
from anatomask_lab.runtime import autocast, autocast_dtype, optimizer_step, resolve_device
from anatomask_lab.schedules import warmup_cosine_lr
from anatomask_lab.stopping import (
    STOP_EXIT_CODE,
    RunStopped,
    SkipSampler,
    StopRequest,
    epoch_sums,
    ignore_stop_signals,
    stop_group,
    stop_run,
    stop_signals,
)
from anatomask_lab.tracking import RunLog, check_backend

__all__ = ["StepResult", "build_models", "make_optimizer", "mim_step", "run", "teacher_patch_loss", "train_step"]


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
    b, grid = x_bcdhw.shape[0], _unwrap(teacher).grid(x_bcdhw.shape[2:])
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

    With ``teacher=None`` this is SparK (random masking); otherwise AnatoMask with that teacher. ``student`` may
    be wrapped in DistributedDataParallel; the mask grid comes from the model (its total encoder stride).
    """
    b, grid = x_bcdhw.shape[0], _unwrap(student).grid(x_bcdhw.shape[2:])
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
    with autocast(x_bcdhw.device, amp_dtype):
        res = mim_step(model, teacher, x_bcdhw, gamma=cfg.masking.gamma, r_t=r_t, generator=generator,
                       order=cfg.masking.order, normalize_ranking=cfg.masking.normalize_ranking)
    optimizer_step(res.loss, optimizer, scaler, student.parameters(), cfg.grad_clip)
    if m is not None and teacher is not None:
        update_momentum(student, teacher, m)
    return res


def _unwrap(model: nn.Module) -> MIMModel:
    """The MIM model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------------------------
# setup helpers
# ----------------------------------------------------------------------------------------------------------------
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
        strides=m.strides,
        init=m.init,
    )
    torch.manual_seed(cfg.seed)
    student = build_mim(m.size, **kwargs).to(device)
    if cfg.method == "spark":
        return student, None
    if cfg.teacher == "frozen":
        torch.manual_seed(cfg.seed + 1)
        return student, make_teacher(build_mim(m.size, **kwargs).to(device))
    return student, make_teacher(student)


def make_optimizer(student: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW(0.9, 0.999) with the configured weight decay (the learning rate is set per step by the schedule)."""
    return torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def _make_loader(cfg: PretrainConfig, world: int, rank: int):
    """The training loader; its sampler (a :class:`SkipSampler`) can skip the batches a stopped run already took."""
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
    base: Any = range(len(dataset))
    if world > 1:
        base = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    sampler = SkipSampler(base)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=cfg.workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,
    )
    return dataset, sampler, loader, iters


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------
def run(cfg: PretrainConfig | None = None, *, resume: bool | str = False, overwrite: bool = False,
        **overrides: Any) -> Path:
    """Pretrain as ``cfg`` says (or ``pretrain_config(**overrides)``); returns the run folder.

    Writes ``config.json``, ``version.json``, ``metrics.jsonl`` and the last checkpoint (every ``ckpt_every``
    epochs and at the end; :func:`anatomask_lab.runs.checkpoint_path`) under ``cfg.out_dir``, holding the folder's
    lock (:func:`anatomask_lab.runs.run_lock`). A folder that already holds a run is refused unless
    ``overwrite=True`` (replace it) or ``resume`` is given: ``True`` continues from its checkpoint with the stored
    configuration, ``"auto"`` does so when there is a checkpoint and starts otherwise
    (:func:`anatomask_lab.runs.prepare_run_folder`). SIGTERM or SIGUSR1 stop the run after the current step with a
    checkpoint that ``resume`` continues exactly (:mod:`anatomask_lab.stopping`).

    Raises:
        RunFolderError: the folder is refused (see above) or locked by another process.
        LaunchError: several SLURM tasks without torchrun (:func:`anatomask_lab.cluster.dist_info`).
        FloatingPointError: a non-finite loss or non-finite weights; no checkpoint is written.
        RunStopped: a stop signal arrived; the checkpoint is written.
    """
    out = Path(cfg.out_dir if cfg is not None else overrides.get("out_dir", "runs/pretrain"))
    rank, world, local_rank = dist_info("pretrain")
    if cfg is not None:
        check_backend(cfg.log)
    with run_lock(out, enabled=rank == 0):
        state = prepare_run_folder(out, resume, overwrite, main=rank == 0)
        if state is not None:
            cfg = resumed_config(state, out, PretrainConfig, cfg, main=rank == 0)
            if state["epoch"] >= cfg.epochs:
                return out
        else:
            cfg = with_data_channels(cfg if cfg is not None else pretrain_config(**overrides))
        check_backend(cfg.log)

        device = resolve_device(cfg.device, local_rank)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            with stop_signals() as stop:
                return _train(cfg, state, out, device, rank, world, stop)
        finally:
            if world > 1 and dist.is_initialized():
                dist.destroy_process_group()


def with_data_channels(cfg: PretrainConfig) -> PretrainConfig:
    """``cfg`` with the dataset's channel count: the default (1) follows the dataset, another value must equal it.

    Raises:
        ValueError: ``model.in_channels`` was set to a count the dataset does not have.
    """
    from anatomask_lab.data.dataset import DatasetInfo

    have = DatasetInfo.read(cfg.data_dir).in_channels
    if have != cfg.model.in_channels and cfg.model.in_channels != 1:
        raise ValueError(f"--in-channels {cfg.model.in_channels}, but {cfg.data_dir} has {have} channels")
    return cfg if have == cfg.model.in_channels else replace(cfg, model=replace(cfg.model, in_channels=have))


@dataclass
class _Run:
    """What the loop carries: models, optimiser state, data, counters, the stop request."""

    cfg: PretrainConfig
    out: Path
    student: nn.Module
    teacher: nn.Module | None
    model: nn.Module  # the student or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    amp_dtype: torch.dtype | None
    rank: int
    world: int
    iters: int
    n_patches: int
    stop: StopRequest
    stop_group: Any = None
    epoch: int = 0
    step: int = 0
    partial: dict[str, Any] | None = None  # the running sums of an epoch a stopped run was in

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ema(self) -> bool:
        return self.cfg.teacher == "ema" and self.teacher is not None


def _setup(cfg: PretrainConfig, state: dict | None, out: Path, device, rank: int, world: int, stop: StopRequest):
    student, teacher = build_models(cfg, device)
    optimizer = make_optimizer(student, cfg)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    dataset, sampler, loader, iters = _make_loader(cfg, world, rank)
    r = _Run(cfg, out, student, teacher, DistributedDataParallel(student) if world > 1 else student, optimizer,
             scaler, generator, amp_dtype, rank, world, iters, math.prod(student.grid(cfg.patch_size)), stop,
             stop_group(world))
    if state is not None:
        student.load_state_dict(state["student"])
        if teacher is not None and state.get("teacher") is not None:
            teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        r.epoch, r.step, r.partial = state["epoch"], state["step"], state.get("partial")
        if rank < len(state["mask_rng"]):
            generator.set_state(state["mask_rng"][rank])
        torch.set_rng_state(state["torch_rng"])
    elif r.is_main:
        checkpoint_path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", config_to_dict(cfg))
        write_json_atomic(out / "version.json", code_version())
    return r, dataset, sampler, loader


def _train(cfg: PretrainConfig, state: dict | None, out: Path, device, rank: int, world: int,
           stop: StopRequest) -> Path:
    r, dataset, sampler, loader = _setup(cfg, state, out, device, rank, world, stop)
    with RunLog(out, cfg.log, enabled=r.is_main, resume_step=None if state is None else r.step,
                config=config_to_dict(cfg)) as log:
        epoch_bar = progress(range(r.epoch, cfg.epochs), desc=f"pretrain {cfg.method}", initial=r.epoch,
                             disable=cfg.quiet or not r.is_main, total=cfg.epochs, unit="epoch")
        for epoch in epoch_bar:
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            record = _run_epoch(r, loader, sampler, epoch, device, log)
            log.write(**record)
            epoch_bar.set_postfix(loss=f"{record['loss']:.4f}", r_t=f"{record['r_t']:.3f}")
            r.epoch = epoch + 1
            signum = r.stop.agreed(r.stop_group) if r.epoch < cfg.epochs else 0  # the last epoch just ends
            if r.epoch % cfg.ckpt_every == 0 or r.epoch == cfg.epochs or signum:
                _save(r)
            if signum:
                stop_run(r.out, signum, r.epoch, r.step, f"at the end of epoch {epoch}", r.is_main, r.stop_group)
    if world > 1 and r.teacher is not None:
        check_same_weights(r.teacher, "teachers")
    return out


def _run_epoch(r: _Run, loader, sampler: SkipSampler, epoch: int, device, log: RunLog) -> dict[str, Any]:
    """One epoch of steps (or the rest of one, after a stop); logs every ``log_every`` steps (the loop's only host
    syncs besides the stop check under DDP) and returns the epoch record."""
    cfg = r.cfg
    total_steps = cfg.epochs * r.iters
    r.student.train()
    done, loss_sum, t_loss_sum, seconds = epoch_sums(r.partial, device)
    r.partial, finite = None, None
    sampler.skip = done * cfg.batch_size
    t_epoch = t_log = time.perf_counter()
    n_log = 0
    it_bar = progress(loader, total=r.iters, initial=done, leave=False, desc=f"epoch {epoch}", unit="it",
                      disable=cfg.quiet or not r.is_main)
    for i, batch in enumerate(it_bar, start=done):
        x = batch["image"].to(device, non_blocking=True)
        t_frac = epoch + (i / r.iters if cfg.masking.per_iteration else 0.0)
        r_t = anatomical_ratio(t_frac, cfg.epochs, cfg.masking.r0, cfg.masking.rT, schedule=cfg.masking.rt_schedule)
        lr = warmup_cosine_lr(r.step, total_steps, cfg.warmup_epochs * r.iters, cfg.lr, cfg.warmup_lr)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        m = momentum_at(r.step / total_steps, cfg.momentum0, cfg.momentum1, cfg.momentum_warmup)
        res = train_step(r.model, r.student, r.teacher, r.optimizer, r.scaler, x, cfg=cfg, r_t=r_t,
                         m=m if r.ema else None, generator=r.generator, amp_dtype=r.amp_dtype)
        r.step += 1
        n_log += x.shape[0]
        loss_d = res.loss.detach().float()
        loss_sum = loss_d if loss_sum is None else loss_sum + loss_d
        finite = torch.isfinite(loss_d) if finite is None else finite & torch.isfinite(loss_d)
        if res.teacher_loss is not None:
            t_d = res.teacher_loss.detach().float()
            t_loss_sum = t_d if t_loss_sum is None else t_loss_sum + t_d
        if r.step % cfg.log_every == 0 or i == r.iters - 1:  # the only host syncs of the loop
            _check_finite(finite, epoch, r.step, r.out)
            loss, t_loss = mean_over_ranks([loss_d, res.teacher_loss], r.world)
            elapsed = time.perf_counter() - t_log
            rec = dict(type="step", epoch=epoch, step=r.step, loss=loss, teacher_loss=t_loss, r_t=r_t,
                       n_top=mask_counts(r.n_patches, cfg.masking.gamma, r_t)[1] if r.teacher is not None else 0,
                       n_masked=mask_counts(r.n_patches, cfg.masking.gamma)[0], lr=lr,
                       momentum=m if r.ema else None, samples_per_s=n_log * r.world / max(elapsed, 1e-9))
            log.write(**rec)
            it_bar.set_postfix(loss=f"{loss:.4f}", r_t=f"{r_t:.3f}", lr=f"{lr:.2e}")
            t_log, n_log = time.perf_counter(), 0
        if i < r.iters - 1 and (signum := r.stop.agreed(r.stop_group)):  # the epoch's last step ends it first
            _check_finite(finite, epoch, r.step, r.out)
            sums = mean_over_ranks([loss_sum, t_loss_sum], r.world)
            _save(r, {"done": i + 1, "loss_sum": sums[0], "teacher_loss_sum": sums[1],
                      "seconds": seconds + time.perf_counter() - t_epoch})
            stop_run(r.out, signum, r.epoch, r.step, f"in epoch {epoch}, {i + 1} of {r.iters} steps done",
                     r.is_main, r.stop_group)
    _check_finite(finite, epoch, r.step, r.out)
    loss, t_loss = mean_over_ranks([loss_sum, t_loss_sum], r.world)
    return dict(type="epoch", epoch=epoch, step=r.step, loss=loss / r.iters,
                teacher_loss=None if t_loss is None else t_loss / r.iters, r_t=r_t, lr=lr,
                seconds=seconds + time.perf_counter() - t_epoch)


def _check_finite(finite: torch.Tensor | None, epoch: int, step: int, out: Path) -> None:
    if finite is not None and not bool(finite):
        raise FloatingPointError(f"non-finite loss in epoch {epoch} (by step {step}); " + stopped_note(out))


def _save(r: _Run, partial: dict[str, Any] | None = None) -> None:
    """Check the weights, gather every rank's mask-generator state and write the checkpoint (all ranks call)."""
    check_finite_weights({"student": r.student, "teacher": r.teacher}, r.out, r.epoch)
    mask_rng = gather_across_ranks(r.generator.get_state(), r.world)
    if r.is_main:
        save_checkpoint(checkpoint_path(r.out), _state(r, mask_rng, partial))


def _state(r: _Run, mask_rng: list[torch.Tensor], partial: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "student": r.student.state_dict(),
        "teacher": None if r.teacher is None else r.teacher.state_dict(),
        "optimizer": r.optimizer.state_dict(),
        "scaler": r.scaler.state_dict(),
        "epoch": r.epoch,
        "step": r.step,
        "partial": partial,
        "mask_rng": mask_rng,
        "torch_rng": torch.get_rng_state(),
        "config": config_to_dict(r.cfg),
    }


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def add_cli(subparsers) -> None:
    from anatomask_lab.config import ABLATIONS, PRESETS, PretrainConfig
    from anatomask_lab.config_args import add_config_arguments, add_run_arguments

    p = subparsers.add_parser(
        "pretrain", help="pretrain a sparse STU-Net encoder with AnatoMask or SparK",
        description="Pretrain with AnatoMask (EMA teacher, reconstruction-guided masks) or SparK (random masks). "
        "Multi-GPU: torchrun --nproc_per_node N -m anatomask_lab.cli pretrain ... (clusters: docs/cluster.md). "
        f"SIGTERM or SIGUSR1 stop the run after the current step with a checkpoint (exit code {STOP_EXIT_CODE}); "
        "--resume continues it.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model size and recipe (default: B)")
    p.add_argument("--ablation", choices=sorted(ABLATIONS), default=None,
                   help="one of the paper's ablations, applied over the preset (default: none)")
    add_run_arguments(p)
    add_config_arguments(p, PretrainConfig, PRESETS, lambda preset: pretrain_config(preset), default_preset="B")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from anatomask_lab.config_args import overrides_from_args
    from anatomask_lab.runs import run_from_cli

    def build() -> PretrainConfig:
        return pretrain_config(args.preset or "B", args.ablation or "none", **overrides_from_args(args, PretrainConfig))

    main = dist_info("pretrain")[0] == 0
    try:
        out = run_from_cli(args, PretrainConfig, build, run, "pretrain", main)
    except RunStopped as stopped:
        if main:
            print(f"anatomask-lab pretrain: {stopped}", file=sys.stderr)
        return STOP_EXIT_CODE
    if out is not None and main:
        print(f"run folder: {out}")
    return 0
