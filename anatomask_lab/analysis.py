"""Small analyses the notebooks show: loss maps averaged over masks, ROC AUC of a ranking, a traced
self-distillation loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from anatomask_lab.config import MaskingConfig, PretrainConfig
from anatomask_lab.ema import momentum_at
from anatomask_lab.masking import anatomical_ratio, mask_counts, patch_mean, random_mask
from anatomask_lab.models import mim_loss
from anatomask_lab.pretrain import make_optimizer, train_step

__all__ = ["SelfDistillationTrace", "average_patch_loss", "organ_share", "roc_auc", "trace_self_distillation"]


@torch.no_grad()
def average_patch_loss(model: nn.Module, x_bcdhw: torch.Tensor, gamma: float = 0.6, n_masks: int = 2,
                       seed: int = 0, normalize: bool = True) -> torch.Tensor:
    """Per-patch reconstruction loss ``[B, *grid]`` averaged over ``n_masks`` random masks (paper Fig. 1b, 3).

    Each mask scores the patches it hides; a patch's value is the mean over the masks that hid it (NaN if none).
    ``normalize=False`` scores against raw intensities (the authors' ranking) instead of per-patch normalised ones.
    """
    model.eval()
    g = torch.Generator(device=x_bcdhw.device).manual_seed(seed)
    grid = model.grid(x_bcdhw.shape[2:])
    total = torch.zeros((x_bcdhw.shape[0], *grid), device=x_bcdhw.device)
    count = torch.zeros_like(total)
    for _ in range(n_masks):
        mask = random_mask(x_bcdhw.shape[0], grid, gamma, generator=g, device=x_bcdhw.device)
        _, patch_loss = mim_loss(model(x_bcdhw, mask), x_bcdhw, mask, normalize_ranking=normalize)
        total += patch_loss.float() * mask
        count += mask
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the binary ``positive`` (Mann-Whitney U, ties count 1/2).

    NaN scores are dropped. Returns NaN when one class is empty.
    """
    scores, positive = np.asarray(scores, float).ravel(), np.asarray(positive, bool).ravel()
    keep = ~np.isnan(scores)
    scores, positive = scores[keep], positive[keep]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def organ_share(mask_bg: torch.Tensor, label_bdhw: torch.Tensor) -> float:
    """Share of masked patches that contain at least one labelled voxel (the patch size follows from the grid)."""
    patch = tuple(s // g for s, g in zip(label_bdhw.shape[1:], mask_bg.shape[1:], strict=True))
    organ_bg = patch_mean((label_bdhw > 0).float()[:, None], patch) > 0
    return float((mask_bg & organ_bg).sum()) / max(int(mask_bg.sum()), 1)


@dataclass
class SelfDistillationTrace:
    """Per-iteration records of :func:`trace_self_distillation`."""

    step: list[int] = field(default_factory=list)
    r_t: list[float] = field(default_factory=list)
    n_top: list[int] = field(default_factory=list)
    momentum: list[float] = field(default_factory=list)
    student_loss: list[float] = field(default_factory=list)
    teacher_loss: list[float] = field(default_factory=list)
    organ_share_student: list[float] = field(default_factory=list)
    organ_share_teacher: list[float] = field(default_factory=list)

    def as_rows(self) -> list[dict]:
        keys = list(self.__dataclass_fields__)
        return [dict(zip(keys, vals, strict=True)) for vals in zip(*(getattr(self, k) for k in keys), strict=True)]


def trace_self_distillation(student: nn.Module, teacher: nn.Module, batches, *, steps: int, gamma: float = 0.6,
                            r0: float = 0.0, rT: float = 0.5, lr: float = 1e-3, ema: bool = True,
                            m0: float = 0.99, m1: float = 0.999, seed: int = 0) -> SelfDistillationTrace:
    """Run ``steps`` AnatoMask iterations with the real :func:`anatomask_lab.pretrain.train_step` and record what
    the notebook explains.

    ``batches`` yields dicts with "image" ``[B, C, *patch]`` and "label" ``[B, *patch]``. With ``ema=False`` the
    teacher stays frozen (the no-self-distillation ablation). r_t advances per iteration from r0 to rT; the
    optimiser, clipping and EMA update are those of pretraining (AdamW, ``grad_clip``), at a constant ``lr``.
    """
    cfg = PretrainConfig(masking=MaskingConfig(gamma=gamma, r0=r0, rT=rT), lr=lr)
    opt = make_optimizer(student, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(seed)
    trace = SelfDistillationTrace()
    it = iter(batches)
    for step in range(steps):
        batch = next(it)
        x, y = batch["image"], batch["label"]
        r_t = anatomical_ratio(step, max(steps - 1, 1), r0, rT)
        m = momentum_at(step / steps, m0, m1)
        student.train()
        res = train_step(student, student, teacher, opt, scaler, x, cfg=cfg, r_t=r_t, m=m if ema else None,
                         generator=g)
        n = int(np.prod(res.student_mask.shape[1:]))
        trace.step.append(step)
        trace.r_t.append(r_t)
        trace.n_top.append(mask_counts(n, gamma, r_t)[1])
        trace.momentum.append(m if ema else 1.0)
        trace.student_loss.append(float(res.loss.detach()))
        trace.teacher_loss.append(float(res.teacher_loss))
        trace.organ_share_student.append(organ_share(res.student_mask, y))
        trace.organ_share_teacher.append(organ_share(res.teacher_mask, y))
    return trace
