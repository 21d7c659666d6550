"""Helpers that keep the notebooks thin: a ready phantom dataset, labelled patch batches, loading a pretrained
MIM model, and launching torchrun from a notebook with live output."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

__all__ = ["DEMO_CLASSES", "ensure_phantom_dataset", "launch_torchrun", "load_pretrained_mim", "patch_batches"]

DEMO_CLASSES = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta", "urinary_bladder")


def ensure_phantom_dataset(data_dir: str | Path, *, cases: int = 8, shape=(96, 96, 80), spacing=(3.0, 3.0, 3.75),
                           prep_spacing=(4.5, 4.5, 4.5), classes: Sequence[str] = DEMO_CLASSES, seed: int = 0,
                           progress: bool = False) -> Path:
    """A prepared phantom dataset at ``data_dir``: reused when its ``dataset.json`` exists, else generated (the
    release layout goes to ``<data_dir>_release``) and prepared with the TotalSegmentator preparer."""
    from anatomask_lab.data.dataset import DatasetInfo
    from anatomask_lab.data.phantom import generate_cohort
    from anatomask_lab.data.prepare import totalsegmentator

    data_dir = Path(data_dir)
    if DatasetInfo.exists(data_dir):
        return data_dir
    release = data_dir.with_name(data_dir.name + "_release")
    generate_cohort(release, cases, seed=seed, shape=shape, spacing=spacing, progress=progress)
    totalsegmentator.prepare(release, data_dir, classes=list(classes), spacing=prep_spacing, progress=progress)
    return data_dir


def patch_batches(data_dir: str | Path, *, patch_size=(64, 64, 64), batch_size: int = 2, split: str = "train",
                  fg_oversample: float = 0.5, flips: bool = True, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless labelled patch batches (``image`` [B, C, *patch], ``label`` [B, *patch]), a new epoch each pass.

    ``flips=False`` keeps the stored (RAS) orientation, for patches that are displayed.
    """
    from anatomask_lab.data.sampler import PatchDataset

    dataset = PatchDataset(data_dir, split=split, patch_size=patch_size, with_label=True, fg_oversample=fg_oversample,
                           flips=flips, seed=seed, samples_per_epoch=batch_size * 8)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True)
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def load_pretrained_mim(run_dir: str | Path, which: str = "student") -> torch.nn.Module:
    """The student (or ``which="teacher"``) MIM model of a pretraining run folder or checkpoint, in eval mode."""
    from anatomask_lab.config import config_from_dict
    from anatomask_lab.models import build_mim
    from anatomask_lab.runs import checkpoint_path, load_checkpoint

    path = checkpoint_path(run_dir)
    state = load_checkpoint(path)
    if state.get(which) is None:
        raise ValueError(f"{path}: no {which!r} weights in this checkpoint")
    m = config_from_dict(state["config"]).model
    model = build_mim(m.size, in_channels=m.in_channels, backend="masked", decoder=m.decoder,
                      norm_pooling=m.norm_pooling, decoder_width=m.decoder_width, strides=m.strides, init=m.init)
    model.load_state_dict(state[which])
    return model.eval()


def launch_torchrun(nproc: int, args: Sequence[str]) -> int:
    """Run ``torchrun --nproc_per_node nproc -m anatomask_lab.cli ARGS`` and stream its output (for notebooks).

    Raises:
        RuntimeError: the launched job failed (its exit code is in the message).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "anatomask_lab.cli", *map(str, args)]
    print(" ".join(cmd), flush=True)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
    if proc.returncode:
        raise RuntimeError(f"torchrun exited with code {proc.returncode}")
    return proc.returncode
