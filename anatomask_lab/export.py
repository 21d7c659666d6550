"""Export a pretrained encoder: for ``build_stunet`` (our keys) or in STU-Net / nnU-Net key naming.

* ``naming="anatomask"`` writes ``{"encoder": <encoder state dict>, "size", "in_channels", "source"}``; the
  finetuning code (``--init FILE``) and :func:`anatomask_lab.models.load_encoder_weights` read it by key.
* ``naming="stunet"`` writes ``{"network_weights": <full STU-Net state dict>}`` with STU-Net's own key names
  (``conv_blocks_context``, ``upsample_layers``, ``conv_blocks_localization``, ``seg_outputs``), the pretrained
  encoder stages in place and everything else freshly He-initialised, so that STU-Net's nnU-Net finetuning
  loader (which requires every non-head key) accepts it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from anatomask_lab.models import build_stunet, load_encoder_weights
from anatomask_lab.runs import checkpoint_path, encoder_from_state, load_checkpoint, save_checkpoint

__all__ = ["STUNET_KEY_PREFIXES", "export_encoder", "to_stunet_keys"]

# our prefix -> STU-Net's (nnU-Net v1 and v2 trainers of STU-Net use the same module names)
STUNET_KEY_PREFIXES = {
    "encoder.stages.": "conv_blocks_context.",
    "decoder.upsamples.": "upsample_layers.",
    "decoder.stages.": "conv_blocks_localization.",
    "decoder.heads.": "seg_outputs.",
}


def to_stunet_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Rename a full STUNet state dict to STU-Net's key names."""
    out = {}
    for key, value in state.items():
        for ours, theirs in STUNET_KEY_PREFIXES.items():
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value
                break
        else:
            raise ValueError(f"key {key!r} has no STU-Net counterpart")
    return out


def _pretrain_state(ckpt: str | Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    path = checkpoint_path(ckpt)
    state = load_checkpoint(path)
    if "student" not in state or "config" not in state:
        raise ValueError(f"{path}: not a pretraining checkpoint (no 'student'/'config' entries)")
    return encoder_from_state(state, path), state["config"], path


def _check_out(ckpt: str | Path, out: str | Path) -> None:
    """Refuse an output that would replace the checkpoint (or run folder) being read, or that is a folder."""
    target = Path(out).resolve()
    if target in (Path(ckpt).resolve(), checkpoint_path(ckpt).resolve()):
        raise ValueError(f"--out {out} is the checkpoint it reads (--ckpt {ckpt}); write the export to another file")
    if target.is_dir():
        raise ValueError(f"--out {out}: an existing folder; give the file to write (.pt, or .pth for STU-Net)")


def export_encoder(ckpt: str | Path, out: str | Path, naming: str = "anatomask", num_classes: int = 105,
                   seed: int = 0) -> dict[str, Any]:
    """Write the student's encoder of a pretraining checkpoint (or run folder) to ``out``.

    Returns:
        A report: ``loaded`` / ``missing`` / ``unexpected`` keys when the encoder is loaded into
        ``build_stunet(size, in_channels)``, and the file written.
    """
    if naming not in ("anatomask", "stunet"):
        raise ValueError(f"naming must be 'anatomask' or 'stunet', got {naming!r}")
    _check_out(ckpt, out)
    encoder, cfg, path = _pretrain_state(ckpt)
    size, in_channels = cfg["model"]["size"], cfg["model"]["in_channels"]
    import torch

    torch.manual_seed(seed)
    net = build_stunet(size, in_channels=in_channels, num_classes=num_classes)
    report = dataclasses.asdict(load_encoder_weights(net, encoder))
    if naming == "anatomask":
        payload = {"encoder": encoder, "size": size, "in_channels": in_channels, "source": str(path)}
    else:
        payload = {"network_weights": to_stunet_keys(net.state_dict())}
    save_checkpoint(out, payload)
    return {"file": str(out), "size": size, "naming": naming, **{k: list(v) for k, v in report.items()}}


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a pretrained encoder (our keys or STU-Net/nnU-Net keys)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="pretraining run folder or checkpoint file")
    p.add_argument("--out", required=True, help="file to write (.pt, or .pth for STU-Net)")
    p.add_argument("--naming", choices=["anatomask", "stunet"], default="anatomask")
    p.add_argument("--num-classes", type=int, default=105, help="segmentation classes of the STU-Net export")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    report = export_encoder(args.ckpt, args.out, args.naming, args.num_classes)
    print(f"wrote {report['file']}: STU-Net-{report['size']} encoder, {len(report['loaded'])} tensors loaded, "
          f"{len(report['missing'])} left at initialisation (6th stage), {len(report['unexpected'])} unexpected")
    if report["unexpected"]:
        print("unexpected keys: " + ", ".join(report["unexpected"][:10]))
    return 0
