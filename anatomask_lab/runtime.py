"""Where and how a step runs: the device, mixed precision, and the one optimiser step of every training loop.

Pretraining (:func:`anatomask_lab.pretrain.train_step`) and finetuning (:func:`anatomask_lab.finetune.train_step`)
both end in :func:`optimizer_step`, so gradient scaling, unscaling, clipping and stepping are written once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

__all__ = ["autocast", "autocast_dtype", "optimizer_step", "resolve_device"]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` (CUDA device ``local_rank`` when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ValueError: an unknown device name, or CUDA requested where it is not available.
    """
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device name (auto, cpu, cuda or cuda:N)") from exc
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


def autocast(device: torch.device | str, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``amp_dtype``, or a no-op context for fp32 (``amp_dtype=None``)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: Iterable[torch.nn.Parameter],
    grad_clip: float | None,
) -> None:
    """Backward (scaled for fp16), unscale, clip the gradient norm to ``grad_clip`` (None: no clipping), step.

    ``params`` are the parameters whose gradients are clipped (the unwrapped model's, also under DDP).
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
