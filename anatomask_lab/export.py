"""Export a pretrained encoder: for ``build_stunet`` (our keys) or for STU-Net / nnU-Net (``docs/weights.md``).

* ``--naming anatomask`` writes ``{"encoder": <encoder state dict>, "size", "in_channels", "source"}``; the
  finetuning code (``--init FILE``) and ``anatomask_lab.models.load_encoder_weights`` read it by key.
* ``--naming stunet`` writes a whole STU-Net state dict with STU-Net's key names (``conv_blocks_context``,
  ``upsample_layers``, ``conv_blocks_localization``, ``seg_outputs``) under both ``network_weights`` and
  ``state_dict`` (the same tensors, stored once), so that STU-Net's nnU-Net v1 and v2 finetuning scripts accept the
  file under any name (.pth or .model). The pretrained encoder stages are in place; the rest (6th encoder stage,
  decoder, heads) is freshly He-initialised, because STU-Net's v2 loader requires every key but the heads. The file
  also records ``axes`` and ``pretrained_keys`` (which keys hold pretrained weights), which nnU-Net ignores and
  ``anatomask-lab finetune --init`` uses.

Axis order (``--axes``, STU-Net naming only): the kit's arrays are (x, y, z) of the canonical RAS grid, while nnU-Net
feeds its network (z, y, x) of the file's voxel grid. ``stunet`` (the default) writes every 3-D kernel with its
spatial axes reversed, ``[O, I, x, y, z] -> [O, I, z, y, x]``, so that nnU-Net / STU-Net users apply it the right way
round to files stored in the canonical (RAS) orientation; ``kit`` writes the kernels as the kit uses them. Flips
cannot be converted: for files stored with flipped axes (e.g. LPS) the kernels see mirrored anatomy. Strides are not
weights: an anisotropic kit stride (sx, sy, sz) is nnU-Net's pooling kernel [sz, sy, sx].
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from anatomask_lab.models import build_stunet, load_encoder_weights
from anatomask_lab.runs import checkpoint_path, encoder_from_state, load_checkpoint, save_checkpoint
from anatomask_lab.stunet_weights import AXES, STUNET_KEY_PREFIXES, convert_axes, to_stunet_keys

__all__ = ["STUNET_KEY_PREFIXES", "export_encoder", "to_stunet_keys"]


def _pretrain_state(ckpt: str | Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    path = checkpoint_path(ckpt)
    state = load_checkpoint(path)
    if "student" not in state or "config" not in state:
        raise ValueError(f"{path}: not a pretraining checkpoint (no 'student'/'config' entries)")
    return encoder_from_state(state, path), state["config"], path


def _check_out(ckpt: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """Refuse an output that would replace the checkpoint (or run folder) being read, that is a folder, or that
    exists (unless ``overwrite``)."""
    target = Path(out).resolve()
    if target in (Path(ckpt).resolve(), checkpoint_path(ckpt).resolve()):
        raise ValueError(f"--out {out} is the checkpoint it reads (--ckpt {ckpt}); write the export to another file")
    if target.is_dir():
        raise ValueError(f"--out {out}: an existing folder; give the file to write (.pt, or .pth for STU-Net)")
    if target.exists() and not overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace it, or write to another file")


def _check_axes(naming: str, axes: str | None) -> str:
    """The axis order to write: STU-Net's file order by default for STU-Net naming, the kit's for ours."""
    if naming not in ("anatomask", "stunet"):
        raise ValueError(f"naming must be 'anatomask' or 'stunet', got {naming!r}")
    if axes is not None and axes not in AXES:
        raise ValueError(f"--axes must be one of {sorted(AXES)}, got {axes!r}")
    if naming == "anatomask":
        if axes not in (None, "kit"):
            raise ValueError("--axes stunet applies to --naming stunet; the kit's own naming keeps the kit's axes")
        return "kit"
    return axes or "stunet"


def _check_finite(weights: dict[str, Any], path: Path) -> None:
    import torch

    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path}: non-finite weights ({bad[0]}); nothing was exported")


def export_encoder(ckpt: str | Path, out: str | Path, naming: str = "anatomask", num_classes: int = 105,
                   seed: int = 0, axes: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the student's encoder of a pretraining checkpoint (or run folder) to ``out``.

    Args:
        ckpt: a pretraining run folder or checkpoint file.
        out: the file to write (atomically); never the checkpoint it reads.
        naming: ``"anatomask"`` (our keys) or ``"stunet"`` (a whole STU-Net in STU-Net's key names).
        num_classes: classes of the STU-Net export's (freshly initialised) heads.
        seed: seeds the fresh initialisation of what is not pretrained.
        axes: STU-Net naming only: ``"stunet"`` (default; kernels in nnU-Net's file order z, y, x) or ``"kit"``
            (x, y, z).
        overwrite: replace an existing ``out`` (otherwise refused).

    Returns:
        A report: ``loaded`` / ``missing`` / ``unexpected`` keys when the encoder is loaded into
        ``build_stunet(size, in_channels)``, the file written and the axis order of its kernels.
    """
    axes = _check_axes(naming, axes)
    _check_out(ckpt, out, overwrite)
    encoder, cfg, path = _pretrain_state(ckpt)
    size, in_channels = cfg["model"]["size"], cfg["model"]["in_channels"]
    import torch

    torch.manual_seed(seed)
    net = build_stunet(size, in_channels=in_channels, num_classes=num_classes)
    report = dataclasses.asdict(load_encoder_weights(net, encoder))
    if naming == "anatomask":
        _check_finite(encoder, path)
        payload = {"encoder": encoder, "size": size, "in_channels": in_channels, "source": str(path)}
    else:
        weights = convert_axes(to_stunet_keys(net.state_dict()), "kit", axes)
        _check_finite(weights, path)
        pretrained = sorted(to_stunet_keys({f"encoder.{k}": None for k in report["loaded"]}))
        payload = {"network_weights": weights, "state_dict": weights, "axes": axes, "pretrained_keys": pretrained,
                   "size": size, "in_channels": in_channels, "source": str(path)}
    save_checkpoint(out, payload)
    return {"file": str(out), "size": size, "naming": naming, "axes": axes,
            **{k: list(v) for k, v in report.items()}}


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a pretrained encoder (our keys or STU-Net/nnU-Net keys)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="pretraining run folder or checkpoint file")
    p.add_argument("--out", required=True, help="file to write (.pt; for STU-Net .pth or .model)")
    p.add_argument("--naming", choices=["anatomask", "stunet"], default="anatomask",
                   help="anatomask: the kit's encoder keys; stunet: a whole STU-Net in STU-Net's key names, as "
                        "STU-Net's nnU-Net finetuning scripts load it (default: anatomask)")
    p.add_argument("--axes", choices=sorted(AXES), default=None,
                   help="axis order of the kernels written with --naming stunet: stunet = nnU-Net's file order "
                        "(z, y, x), the default, right for nnU-Net/STU-Net users whose files are stored in RAS "
                        "orientation; kit = the kit's (x, y, z). Flips are not converted (docs/weights.md)")
    p.add_argument("--num-classes", type=int, default=105, help="segmentation classes of the STU-Net export")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (default: refuse)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    report = export_encoder(args.ckpt, args.out, args.naming, args.num_classes, axes=args.axes,
                            overwrite=args.overwrite)
    order = f"; kernels in {AXES[report['axes']]} order" if args.naming == "stunet" else ""
    print(f"wrote {report['file']}: STU-Net-{report['size']} encoder, {len(report['loaded'])} tensors loaded, "
          f"{len(report['missing'])} left at initialisation (6th stage), {len(report['unexpected'])} unexpected"
          f"{order}")
    if report["unexpected"]:
        print("unexpected keys: " + ", ".join(report["unexpected"][:10]))
    return 0
