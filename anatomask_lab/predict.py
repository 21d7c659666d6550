"""Predict a split of a preprocessed dataset with a finetuned STU-Net and write NIfTI label maps in the original
geometry (shape, orientation and affine of each case's source image)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from anatomask_lab.finetune import load_segmenter
from anatomask_lab.inference import sliding_window_predict
from anatomask_lab.runtime import resolve_device

__all__ = ["predict_split", "write_reference_labels"]


def predict_split(model_run: str | Path, data_dir: str | Path, out_dir: str | Path, *, split: str = "test",
                  cases: list[str] | None = None, overlap: float = 0.5, mirror: bool = False, device: str = "auto",
                  which: str = "best", quiet: bool = False) -> list[Path]:
    """Sliding-window prediction of every case of ``split`` (or ``cases``); returns the files written.

    Each prediction is argmax of the Gaussian-weighted softmax on the preprocessed grid, mapped back to the original
    grid by nearest neighbour and written as ``<out_dir>/<case>.nii.gz`` with the original affine.

    Raises:
        DataError: ``dataset.json`` is missing or malformed, an unknown split, or a case not in the dataset.
        ValueError: the model's channels or classes differ from the dataset's, or there is nothing to predict.
    """
    from anatomask_lab.data.dataset import DatasetInfo
    from anatomask_lab.data.resample import write_prediction
    from anatomask_lab.data.sampler import load_case

    dev = resolve_device(device)
    model, cfg = load_segmenter(model_run, which=which, device=dev)
    info = DatasetInfo.read(data_dir)
    if info.in_channels != model.in_channels:
        raise ValueError(f"model {model_run} takes {model.in_channels} channels, dataset {data_dir} has "
                         f"{info.in_channels}")
    if info.num_classes != model.num_classes:
        raise ValueError(f"model {model_run} predicts {model.num_classes} classes, dataset {data_dir} has "
                         f"{info.num_classes}")
    ids = [info.case(c).id for c in cases] if cases is not None else list(info.split(split))
    if not ids:
        raise ValueError(f"split {split!r} of {data_dir} has no cases")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for case in tqdm(ids, desc=f"predict {split}", disable=quiet, unit="case"):
        image, _, case_meta = load_case(data_dir, case)
        prob = sliding_window_predict(model, np.asarray(image), tuple(cfg["patch_size"]), model.num_classes,
                                      overlap=overlap, mirror=mirror, device=dev,
                                      batch_size=int(cfg.get("batch_size", 2)))
        pred = prob.argmax(0).numpy().astype(np.int16)
        written.append(write_prediction(pred, case_meta, out / f"{case}.nii.gz"))
    return written


def write_reference_labels(data_dir: str | Path, out_dir: str | Path, *, split: str = "test",
                           quiet: bool = True) -> list[Path]:
    """Ground-truth label maps of a split in the original geometry, with the prepared dataset's class ids.

    Each case's source labels (a label-map file or per-structure masks) are read and merged by the preparer's own
    code (:func:`anatomask_lab.data.reference.reference_label`): the same class subset and renumbering, the same
    overlap rule, at the original resolution. Prediction and reference then share shape, orientation and affine,
    as ``anatomask-lab evaluate`` requires.

    Raises:
        DataError: ``dataset.json`` is missing or malformed, an unknown split, an unlabelled case, or unusable
            source files.
    """
    from anatomask_lab.data.reference import write_reference_labels as write

    return write(data_dir, out_dir, split=split, quiet=quiet)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("predict", help="sliding-window prediction of a dataset split, written as NIfTI",
                              description=__doc__)
    p.add_argument("--model", required=True, help="finetuning run folder or checkpoint")
    p.add_argument("--data", required=True, help="preprocessed dataset folder")
    p.add_argument("--out", required=True, help="folder for <case>.nii.gz predictions")
    p.add_argument("--split", default="test")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--mirror", action="store_true", help="mirror test-time augmentation (8 flips)")
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.add_argument("--device", default="auto")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="also write the split's ground-truth label maps in the same geometry (for `evaluate --gt`)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cli)


def _same_place(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file or folder (after resolving links, or as the same existing inode)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _cli(args) -> int:
    if args.reference and _same_place(args.reference, args.out):
        raise ValueError(f"--reference {args.reference} is the --out folder {args.out}: the ground truth would "
                         "replace the predictions; choose another folder")
    with torch.inference_mode():
        files = predict_split(args.model, args.data, args.out, split=args.split, overlap=args.overlap,
                              mirror=args.mirror, device=args.device, which=args.which, quiet=args.quiet)
    print(f"wrote {len(files)} predictions to {args.out}")
    if args.reference:
        refs = write_reference_labels(args.data, args.reference, split=args.split, quiet=args.quiet)
        print(f"wrote {len(refs)} reference label maps to {args.reference}")
    return 0
