"""Sparse execution of STU-Net's first 5 stages on a patch-masked input, two backends behind one interface.

The mask travels as an argument: ``SparseEncoder.forward(x, mask_bg)`` with ``mask_bg`` the bool patch mask
``[B, *grid]``, True = masked (hidden). At stage ``k`` (cumulative stride ``s_k``) the *active* voxels are those of
visible patches, i.e. ``mask_to_voxels(~mask_bg, patch // s_k)``. Semantics (SparK's, shared by both backends):

* the input is zeroed on masked patches;
* after every convolution the features at inactive positions are zero (a strided convolution's output is active
  exactly where the downsampled mask is visible, never on the dilated set);
* instance norms compute mean / variance over active voxels only, per sample (``norm_pooling="sample"``) or pooled
  over the batch (``"batch"``, the authors' code); LeakyReLU keeps zeros at zero.

Backends:

* ``"masked"``: dense ``conv3d`` followed by re-masking. Runs anywhere, works under bf16 / fp16 autocast (norm
  statistics in fp32).
* ``"spconv"``: true sparse convolution with spconv on the active voxels only (see :mod:`.spconv_backend`).

Both use the parameters of the very same :class:`~.stunet.ResBlock` modules, so the state dict (keys
``stages.{i}.{j}.conv1.weight`` ...) equals the dense :class:`~.stunet.STUNetEncoder`'s, and the backend can be
switched on a built model (``encoder.backend = "spconv"``). Outputs are dense maps ``[B, C, *S_k]`` with zeros at
inactive positions, in both backends.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..masking import mask_to_voxels
from .stunet import ResBlock, Stride3, STUNetEncoder, check_input, total_stride

__all__ = ["BACKENDS", "NORM_POOLINGS", "SparseEncoder", "active_maps", "check_mask", "masked_instance_norm"]

BACKENDS = ("masked", "spconv")
NORM_POOLINGS = ("sample", "batch")


def check_mask(mask_bg: torch.Tensor, x_bcdhw: torch.Tensor, patch: Sequence[int]) -> tuple[int, ...]:
    """Check that ``mask_bg`` is a bool ``[B, *grid]`` matching ``x``; returns the grid.

    Raises:
        ValueError: naming the shapes, for a non-bool mask or a grid / batch that does not match the input.
    """
    grid = tuple(s // p for s, p in zip(x_bcdhw.shape[2:], patch, strict=True))
    if not isinstance(mask_bg, torch.Tensor) or mask_bg.dtype != torch.bool:
        got = mask_bg.dtype if isinstance(mask_bg, torch.Tensor) else type(mask_bg).__name__
        raise ValueError(f"mask must be a bool tensor [B, *grid], got {got}")
    if tuple(mask_bg.shape) != (x_bcdhw.shape[0], *grid):
        raise ValueError(
            f"mask of shape {tuple(mask_bg.shape)} does not match input {tuple(x_bcdhw.shape)}: expected "
            f"{(x_bcdhw.shape[0], *grid)} (grid = spatial // patch {tuple(patch)})"
        )
    return grid


def active_maps(mask_bg: torch.Tensor, patch: Sequence[int], strides: Sequence[Stride3]) -> list[torch.Tensor]:
    """Active (visible) voxels at the input and after every stage: ``len(strides) + 1`` bool maps ``[B, *S_k]``."""
    visible_bg = ~mask_bg
    maps, cum = [], (1, 1, 1)
    for stride in [(1, 1, 1), *strides]:
        cum = tuple(c * s for c, s in zip(cum, stride, strict=True))
        maps.append(mask_to_voxels(visible_bg, tuple(p // c for p, c in zip(patch, cum, strict=True))))
    return maps


def masked_instance_norm(
    x_bcdhw: torch.Tensor,
    act_b1dhw: torch.Tensor,
    norm: nn.Module,
    pooling: str = "sample",
) -> torch.Tensor:
    """Affine instance norm whose statistics cover active voxels only; output zero at inactive voxels.

    Args:
        x_bcdhw: features, **zero at inactive positions** (as every masked conv output is).
        act_b1dhw: bool active map broadcastable to ``x`` (``[B, 1, *S]``).
        norm: module with ``weight``, ``bias`` ``[C]`` and ``eps`` (an ``nn.InstanceNorm3d(affine=True)``).
        pooling: ``"sample"`` (statistics per sample and channel) or ``"batch"`` (per channel over the batch).

    Returns:
        tensor shaped like ``x``, at least fp32 (statistics are computed in fp32 under autocast too).
    """
    dims = (2, 3, 4) if pooling == "sample" else (0, 2, 3, 4)
    dtype = torch.promote_types(x_bcdhw.dtype, torch.float32)
    m = act_b1dhw.to(dtype)
    x = x_bcdhw.to(dtype)
    n = m.sum(dim=dims, keepdim=True).clamp_min(1.0)
    mean = x.sum(dim=dims, keepdim=True) / n
    xc = (x - mean) * m
    var = xc.pow(2).sum(dim=dims, keepdim=True) / n
    scale = torch.rsqrt(var + norm.eps) * norm.weight.to(dtype).view(1, -1, 1, 1, 1)
    return torch.addcmul(norm.bias.to(dtype).view(1, -1, 1, 1, 1) * m, xc, scale)


def _masked_block(block: ResBlock, x: torch.Tensor, act_out: torch.Tensor, pooling: str) -> torch.Tensor:
    y = block.conv1(x) * act_out
    y = F.leaky_relu(masked_instance_norm(y, act_out, block.norm1, pooling), 1e-2)
    y = block.conv2(y) * act_out
    y = masked_instance_norm(y, act_out, block.norm2, pooling)
    shortcut = block.conv3(x) * act_out if block.conv3 is not None else x
    return F.leaky_relu(y + shortcut, 1e-2)


class SparseEncoder(STUNetEncoder):
    """The first 5 STU-Net stages executed sparsely on a patch-masked input (SparK's backbone contract).

    Args:
        in_channels: input channels.
        widths, blocks, strides: per-stage widths, block counts and strides (5 stages for STU-Net's MIM).
        backend: ``"masked"`` or ``"spconv"``; an attribute, switchable after construction.
        norm_pooling: ``"sample"`` or ``"batch"`` (see :func:`masked_instance_norm`).
        grad_checkpointing: recompute each residual block in the backward pass.
        spconv_algo: ``"auto"`` (Native on CPU, implicit GEMM on CUDA), ``"native"`` or ``"implicit_gemm"``.
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        blocks: Sequence[int],
        strides: Sequence[Stride3],
        *,
        backend: str = "masked",
        norm_pooling: str = "sample",
        grad_checkpointing: bool = False,
        spconv_algo: str = "auto",
    ):
        super().__init__(in_channels, widths, blocks, strides, grad_checkpointing)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if norm_pooling not in NORM_POOLINGS:
            raise ValueError(f"norm_pooling must be one of {NORM_POOLINGS}, got {norm_pooling!r}")
        self.backend = backend
        self.norm_pooling = norm_pooling
        self.spconv_algo = spconv_algo
        self.patch_size = total_stride(self.strides)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, norm_pooling={self.norm_pooling!r}, patch_size={self.patch_size}"

    def forward(self, x_bcdhw: torch.Tensor, mask_bg: torch.Tensor) -> list[torch.Tensor]:
        """Encode a masked input.

        Args:
            x_bcdhw: input ``[B, C, D, H, W]``, spatial sizes multiples of the patch size (16 by default).
            mask_bg: bool ``[B, *grid]``, True = masked.

        Returns:
            The 5 stage outputs, shallowest first, dense ``[B, C_k, *S_k]`` with zeros at inactive voxels.
        """
        check_input(x_bcdhw, self.in_channels, self.patch_size, "SparseEncoder")
        check_mask(mask_bg, x_bcdhw, self.patch_size)
        if self.backend == "spconv":
            from .spconv_backend import spconv_encoder_forward

            return spconv_encoder_forward(self, x_bcdhw, mask_bg)
        return self._masked_forward(x_bcdhw, mask_bg)

    def _masked_forward(self, x_bcdhw: torch.Tensor, mask_bg: torch.Tensor) -> list[torch.Tensor]:
        acts = [a.unsqueeze(1) for a in active_maps(mask_bg, self.patch_size, self.strides)]
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        x = x_bcdhw * acts[0]
        feats = []
        for stage, act in zip(self.stages, acts[1:], strict=True):
            for block in stage:
                if use_ckpt:
                    x = checkpoint(_masked_block, block, x, act, self.norm_pooling, use_reentrant=False)
                else:
                    x = _masked_block(block, x, act, self.norm_pooling)
            feats.append(x)
        return feats
