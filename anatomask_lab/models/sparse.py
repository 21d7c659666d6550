"""Sparse execution of STU-Net's first 5 stages on a patch-masked input, two backends behind one interface.

The mask travels as an argument: ``SparseEncoder.forward(x, mask_bg)`` with ``mask_bg`` the bool patch mask
``[B, *grid]``, True = masked (hidden). At stage ``k`` (cumulative stride ``s_k``) the *active* voxels are those of
visible patches, i.e. ``mask_to_voxels(~mask_bg, patch // s_k)`` (:func:`~anatomask_lab.masking.active_maps`).
Semantics (SparK's, shared by both backends):

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

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..masking import active_maps, check_mask
from .stunet import ResBlock, STUNetEncoder, check_input, total_stride

__all__ = ["BACKENDS", "NORM_POOLINGS", "SparseEncoder", "masked_instance_norm"]

BACKENDS = ("masked", "spconv")
NORM_POOLINGS = ("sample", "batch")


def masked_instance_norm(
    x_bcdhw: torch.Tensor,
    act_b1dhw: torch.Tensor,
    norm: nn.Module,
    pooling: str = "sample",
) -> torch.Tensor:
    """Affine instance norm whose statistics cover active voxels only; output zero at inactive voxels.

    Args:
        x_bcdhw: features, **zero at inactive positions** (as every masked conv output is).
        act_b1dhw: active map ``[B, 1, *S]``, bool or float 0 / 1.
        norm: module with ``weight``, ``bias`` ``[C]`` and ``eps`` (an ``nn.InstanceNorm3d(affine=True)``).
        pooling: ``"sample"`` (statistics per sample and channel) or ``"batch"`` (per channel over the batch).

    Returns:
        tensor shaped like ``x``, at least fp32 (statistics are computed in fp32 under autocast too).
    """
    # reduce over one contiguous trailing axis: forward and backward sums are then cascade sums (a reduction over
    # dims (0, 2, 3, 4) accumulates sequentially and loses ~1e-3 relative precision in fp32 gradients)
    dtype = torch.promote_types(x_bcdhw.dtype, torch.float32)
    b, c = x_bcdhw.shape[:2]
    x = x_bcdhw.to(dtype).reshape(b, c, -1)
    m = act_b1dhw.to(dtype).reshape(b, 1, -1)
    n = m.sum(dim=-1, keepdim=True)
    total = x.sum(dim=-1, keepdim=True)
    if pooling == "batch":
        n, total = n.sum(dim=0, keepdim=True), total.sum(dim=0, keepdim=True)
    n = n.clamp_min(1.0)
    xc = (x - total / n) * m
    sq = xc.pow(2).sum(dim=-1, keepdim=True)
    var = (sq.sum(dim=0, keepdim=True) if pooling == "batch" else sq) / n
    scale = torch.rsqrt(var + norm.eps) * norm.weight.to(dtype).view(1, -1, 1)
    return torch.addcmul(norm.bias.to(dtype).view(1, -1, 1) * m, xc, scale).view(x_bcdhw.shape)


def _masked_block(block: ResBlock, x: torch.Tensor, act: torch.Tensor, act_f: torch.Tensor, pooling: str):
    # act (bool) re-masks conv outputs in their own dtype; act_f (fp32) is shared by all norms of the stage, so that
    # autograd saves one mask per stage instead of a copy per norm
    y = block.conv1(x) * act
    y = F.leaky_relu(masked_instance_norm(y, act_f, block.norm1, pooling), 1e-2)
    y = block.conv2(y) * act
    y = masked_instance_norm(y, act_f, block.norm2, pooling)
    shortcut = block.conv3(x) * act if block.conv3 is not None else x
    return F.leaky_relu(y + shortcut, 1e-2)


class SparseEncoder(STUNetEncoder):
    """The first 5 STU-Net stages executed sparsely on a patch-masked input (SparK's backbone contract).

    The layout arguments are :class:`~.stunet.STUNetEncoder`'s, passed through unchanged, so that the two classes
    are built the same way and share their state-dict keys.

    Args:
        *encoder_args, **encoder_kwargs: :class:`~.stunet.STUNetEncoder`'s ``in_channels, widths, blocks, strides``
            (5 stages for STU-Net's MIM) and ``grad_checkpointing`` (recompute each residual block in the backward
            pass).
        backend: ``"masked"`` or ``"spconv"``; an attribute, switchable after construction.
        norm_pooling: ``"sample"`` or ``"batch"`` (see :func:`masked_instance_norm`).
        spconv_algo: ``"auto"`` (Native on CPU, implicit GEMM on CUDA), ``"native"`` or ``"implicit_gemm"``.
    """

    def __init__(
        self,
        *encoder_args,
        backend: str = "masked",
        norm_pooling: str = "sample",
        spconv_algo: str = "auto",
        **encoder_kwargs,
    ):
        super().__init__(*encoder_args, **encoder_kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if norm_pooling not in NORM_POOLINGS:
            raise ValueError(f"norm_pooling must be one of {NORM_POOLINGS}, got {norm_pooling!r}")
        if backend == "spconv":  # fail at build time, before a run writes anything, when spconv is missing
            from .spconv_backend import require_spconv

            require_spconv()
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
            act_f = act.to(torch.promote_types(x.dtype, torch.float32))
            for block in stage:
                args = (block, x, act, act_f, self.norm_pooling)
                x = checkpoint(_masked_block, *args, use_reentrant=False) if use_ckpt else _masked_block(*args)
            feats.append(x)
        return feats
