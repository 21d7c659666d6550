"""The ``spconv`` backend of :class:`~.sparse.SparseEncoder`: true sparse convolution on the active voxels only.

Features live as rows ``[N_k, C]`` of the active voxels of each resolution (row order = ``nonzero()`` order of the
active map, i.e. batch-major, then z, y, x). The weights are the dense ``nn.Conv3d`` parameters, permuted at
forward time to spconv 2.x's ``[out, kz, ky, kx, in]`` layout (KRSC), so both backends share parameters and keys.

* stride-1 3x3x3 conv = submanifold conv (output sites = input sites);
* strided 3x3x3 conv = sparse conv whose output sites are exactly the active voxels of the downsampled mask
  (spconv's own strided conv creates outputs wherever any input is active, the dilated set; we never keep those);
* 1x1 projection shortcuts = a matmul on the rows (strided: on the rows at ``stride * p``, always active);
* norms = per-sample (or batch-pooled) statistics over the rows, via ``index_add``.

Two algorithms (``SparseEncoder.spconv_algo``):

* ``"native"`` (the only one spconv runs on a CPU): we build the indice pairs ourselves from a dense look-up volume
  (exact output set, no dilation) and call spconv's ``indice_subm_conv`` / ``indice_conv`` with
  ``ConvAlgo.Native`` (gather - GEMM - scatter-add). We do not use spconv's own pair generation on the CPU: in
  spconv 2.3.6 it is wrong there (submanifold pairs come back empty except the kernel centre, regular-conv pairs
  are corrupted near the origin), while its Native conv kernels are correct given correct pairs.
* ``"implicit_gemm"`` (CUDA only, the default there): spconv's fast MaskImplicitGemm path with its own pair
  generation; submanifold pairs are reused within a stage (``indice_key``); the strided conv runs as spconv's
  regular sparse conv and its output rows are then restricted (gathered) to the downsampled mask, which wastes the
  work spent on the dilation shell.

spconv is imported lazily, so the package imports without it. spconv has no bf16 kernels: under CUDA autocast its
convolutions run in fp16.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..masking import active_maps
from .stunet import ResBlock

__all__ = [
    "SPCONV_INSTALL",
    "SparseLevel",
    "build_levels",
    "neighbour_pairs",
    "require_spconv",
    "spconv_encoder_forward",
    "sparse_instance_norm",
]


SPCONV_INSTALL = 'pip install "anatomask-lab[spconv]"'


def _spconv() -> Any:
    """``spconv.pytorch``, or a one-line ImportError that says how to install it (or why it does not import)."""
    try:
        with warnings.catch_warnings():  # spconv 2.3 uses the deprecated torch.cuda.amp.custom_fwd decorators
            warnings.simplefilter("ignore", FutureWarning)
            import spconv.pytorch as spconv
    except ImportError as err:
        if (err.name or "").split(".")[0] == "spconv":
            raise ImportError(
                f"backend 'spconv' needs the spconv package, which is not installed: {SPCONV_INSTALL} (CUDA 12 "
                "wheels for Linux x86_64 and Windows), or use backend 'masked'"
            ) from err
        raise ImportError(f"backend 'spconv': spconv is installed but does not import ({err}); "
                          "use backend 'masked'") from err
    return spconv


def require_spconv() -> None:
    """Raise the one-line install hint now when spconv is missing (a model built for the spconv backend)."""
    _spconv()


@dataclass
class SparseLevel:
    """Active voxels of one resolution, built from the mask for one forward call (never stored on a module).

    Attributes:
        act: bool ``[B, *S]`` active map.
        idx: long ``[N, 4]`` (b, z, y, x) of the active voxels, in row order.
        lut: long ``[B, *S]``: row of each active voxel, -1 elsewhere.
        counts_list: active voxels per sample (host ints; rows are sorted by sample).
        cache: per-forward cache of indice pairs and spconv tensors.
    """

    act: torch.Tensor
    idx: torch.Tensor
    lut: torch.Tensor
    counts_list: list[int]
    cache: dict = field(default_factory=dict)

    @property
    def spatial(self) -> tuple[int, int, int]:
        return tuple(self.act.shape[1:])

    @property
    def batch_size(self) -> int:
        return self.act.shape[0]


def build_levels(mask_bg: torch.Tensor, patch, strides) -> list[SparseLevel]:
    """One :class:`SparseLevel` for the input and for the output of every stage."""
    levels = []
    for act in active_maps(mask_bg, patch, strides):
        idx = act.nonzero()
        lut = torch.full(act.shape, -1, dtype=torch.long, device=act.device)
        lut[act] = torch.arange(idx.shape[0], device=act.device)
        levels.append(SparseLevel(act, idx, lut, act.flatten(1).sum(dim=1).tolist()))
    return levels


def neighbour_pairs(out_level: SparseLevel, in_level: SparseLevel, stride) -> tuple[torch.Tensor, torch.Tensor]:
    """Indice pairs of a 3x3x3 conv (padding 1, ``stride``) from ``in_level`` rows to ``out_level`` rows.

    Kernel offset ``k = 9 kz + 3 ky + kx`` reads input ``stride * p + (kz, ky, kx) - 1`` for output ``p``, which is
    spconv's (and ``F.conv3d``'s) ordering.

    Returns:
        ``pairs`` int32 ``[2, 27, M]`` (row 0: input rows, row 1: output rows, valid entries first, -1 after) and
        ``counts`` int32 ``[27]``, spconv's Native format.
    """
    idx, device = out_level.idx, out_level.idx.device
    n = idx.shape[0]
    size = in_level.spatial
    lut_flat = in_level.lut.flatten()
    rows_in = torch.empty(27, n, dtype=torch.long, device=device)
    for k, offset in enumerate(itertools.product((-1, 0, 1), repeat=3)):
        lin = idx[:, 0].clone()
        inside = torch.ones(n, dtype=torch.bool, device=device)
        for axis in range(3):
            coord = idx[:, 1 + axis] * stride[axis] + offset[axis]
            inside &= (coord >= 0) & (coord < size[axis])
            lin = lin * size[axis] + coord.clamp(0, size[axis] - 1)
        rows_in[k] = torch.where(inside, lut_flat[lin], -1)
    valid = rows_in >= 0
    counts = valid.sum(dim=1)
    m = max(int(counts.max()), 1)
    k_idx, n_idx = valid.nonzero(as_tuple=True)  # row-major: ascending output rows within each offset
    slot = (valid.cumsum(dim=1) - 1)[k_idx, n_idx]
    pairs = torch.full((2, 27, m), -1, dtype=torch.int32, device=device)
    pairs[0, k_idx, slot] = rows_in[k_idx, n_idx].to(torch.int32)
    pairs[1, k_idx, slot] = n_idx.to(torch.int32)
    return pairs, counts.to(torch.int32)


def sparse_instance_norm(f_nc: torch.Tensor, level: SparseLevel, norm: nn.Module, pooling: str) -> torch.Tensor:
    """Affine instance norm of rows ``[N, C]`` with per-sample (or batch-pooled) statistics (at least fp32).

    Rows are sorted by sample, so per-sample statistics are plain reductions over contiguous segments (pairwise
    summation; ``index_add`` would accumulate sequentially and lose about 1e-3 relative precision in fp32).
    """
    dtype = torch.promote_types(f_nc.dtype, torch.float32)
    segments = [f_nc.to(dtype)] if pooling == "batch" else torch.split(f_nc.to(dtype), level.counts_list)
    out = []
    for seg in segments:
        if seg.shape[0] == 0:  # a sample with every patch masked has no rows
            out.append(seg)
            continue
        mean = seg.mean(dim=0, keepdim=True)
        var = (seg - mean).pow(2).mean(dim=0, keepdim=True)
        out.append((seg - mean) * (torch.rsqrt(var + norm.eps) * norm.weight.to(dtype)) + norm.bias.to(dtype))
    return out[0] if len(out) == 1 else torch.cat(out)


def _conv_dtype(f: torch.Tensor) -> torch.dtype:
    if f.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.float16
    return f.dtype


def _resolve_algo(algo: str, device: torch.device) -> str:
    if algo == "auto":
        return "implicit_gemm" if device.type == "cuda" else "native"
    if algo not in ("native", "implicit_gemm"):
        raise ValueError(f"spconv_algo must be 'auto', 'native' or 'implicit_gemm', got {algo!r}")
    if algo == "implicit_gemm" and device.type != "cuda":
        raise ValueError("spconv_algo='implicit_gemm' needs CUDA; spconv runs only ConvAlgo.Native on a CPU")
    return algo


def _sparse_conv3(
    f: torch.Tensor, conv: nn.Conv3d, lv_in: SparseLevel, lv_out: SparseLevel, stride, key: str, algo: str
) -> torch.Tensor:
    """3x3x3 conv of rows ``f`` (sites of ``lv_in``) onto the sites of ``lv_out``."""
    spconv = _spconv()
    dtype = _conv_dtype(f)
    f = f.to(dtype).contiguous()
    w_krsc = conv.weight.to(dtype).permute(0, 2, 3, 4, 1).contiguous()
    subm = lv_in is lv_out
    if algo == "native":
        if key not in lv_out.cache:
            lv_out.cache[key] = neighbour_pairs(lv_out, lv_in, stride)
        pairs, counts = lv_out.cache[key]
        fn = spconv.functional.indice_subm_conv if subm else spconv.functional.indice_conv
        out = fn(f, w_krsc, pairs, counts, lv_out.idx.shape[0], spconv.ConvAlgo.Native)
    else:
        out = _implicit_gemm_conv3(spconv, f, w_krsc, lv_in, lv_out, stride, key, subm)
    return out + conv.bias.to(out.dtype)


def _implicit_gemm_conv3(spconv, f, w_krsc, lv_in, lv_out, stride, key, subm) -> torch.Tensor:
    from spconv.pytorch.conv import SparseConvolutionBase

    tensor = lv_in.cache.get("sp_tensor")
    if tensor is None:
        tensor = spconv.SparseConvTensor(f, lv_in.idx.to(torch.int32), list(lv_in.spatial), lv_in.batch_size)
    else:
        tensor = tensor.replace_feature(f)
    c_out, c_in = w_krsc.shape[0], w_krsc.shape[-1]
    base = SparseConvolutionBase(
        3, c_in, c_out, 3, list(stride), 1, subm=subm, indice_key=key if subm else None, algo=None
    )
    out = base._conv_forward(torch.is_grad_enabled(), tensor, w_krsc, None)
    if subm:
        lv_in.cache["sp_tensor"] = out  # carries the cached submanifold pairs (indice_dict) for the next conv
        return out.features
    # restrict spconv's dilated output set to the downsampled mask, in our row order
    oi = out.indices.long()
    rows = lv_out.lut[oi[:, 0], oi[:, 1], oi[:, 2], oi[:, 3]]
    keep = (rows >= 0).nonzero().squeeze(1)
    if keep.numel() != lv_out.idx.shape[0]:
        raise RuntimeError(f"spconv strided conv produced {keep.numel()} of {lv_out.idx.shape[0]} expected sites")
    order = torch.empty_like(keep)
    order[rows[keep]] = keep
    return out.features[order]


def _shortcut(f: torch.Tensor, conv: nn.Conv3d | None, lv_in: SparseLevel, lv_out: SparseLevel, stride):
    if conv is None:
        return f
    if lv_in is not lv_out:  # strided 1x1: output p reads input stride * p, active since p is
        key = "shortcut_rows"
        if key not in lv_out.cache:
            pos = lv_out.idx[:, 1:] * torch.tensor(stride, device=f.device)
            lv_out.cache[key] = lv_in.lut[lv_out.idx[:, 0], pos[:, 0], pos[:, 1], pos[:, 2]]
        f = f[lv_out.cache[key]]
    return F.linear(f, conv.weight.flatten(1), conv.bias)


def _spconv_block(
    block: ResBlock, f: torch.Tensor, lv_in: SparseLevel, lv_out: SparseLevel, key: str, pooling: str, algo: str
) -> torch.Tensor:
    stride = block.stride
    y = _sparse_conv3(f, block.conv1, lv_in, lv_out, stride, f"{key}.conv1" if lv_in is not lv_out else key, algo)
    y = F.leaky_relu(sparse_instance_norm(y, lv_out, block.norm1, pooling), 1e-2)
    y = _sparse_conv3(y, block.conv2, lv_out, lv_out, (1, 1, 1), key, algo)
    y = sparse_instance_norm(y, lv_out, block.norm2, pooling)
    return F.leaky_relu(y + _shortcut(f, block.conv3, lv_in, lv_out, stride), 1e-2)


def _densify(f_nc: torch.Tensor, level: SparseLevel) -> torch.Tensor:
    dense = f_nc.new_zeros(*level.act.shape, f_nc.shape[1])
    dense[level.act] = f_nc
    return dense.permute(0, 4, 1, 2, 3)


def spconv_encoder_forward(encoder, x_bcdhw: torch.Tensor, mask_bg: torch.Tensor) -> list[torch.Tensor]:
    """Forward of a :class:`~.sparse.SparseEncoder` with spconv; same contract as its masked forward."""
    algo = _resolve_algo(encoder.spconv_algo, x_bcdhw.device)
    levels = build_levels(mask_bg, encoder.patch_size, encoder.strides)
    f = x_bcdhw.permute(0, 2, 3, 4, 1)[levels[0].act]
    use_ckpt = encoder.grad_checkpointing and torch.is_grad_enabled()
    feats = []
    for k, stage in enumerate(encoder.stages):
        lv_in = levels[k]
        for block in stage:
            # a stride-1 first block (stage 0) maps the input sites onto the same sites: submanifold
            lv_out = levels[k + 1]
            src = lv_out if (lv_in.act.shape == lv_out.act.shape and block.stride == (1, 1, 1)) else lv_in
            args = (block, f, src, lv_out, f"subm{k}", encoder.norm_pooling, algo)
            f = checkpoint(_spconv_block, *args, use_reentrant=False) if use_ckpt else _spconv_block(*args)
            lv_in = lv_out
        feats.append(_densify(f, levels[k + 1]))
    return feats
