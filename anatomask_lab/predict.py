"""Predict a split of a preprocessed dataset with a finetuned STU-Net and write NIfTI label maps in the original
geometry (shape, orientation and affine of each case's source image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from anatomask_lab.finetune import load_segmenter
from anatomask_lab.inference import sliding_window_predict
from anatomask_lab.pretrain import resolve_device

__all__ = ["predict_split", "write_reference_labels"]


def predict_split(model_run: str | Path, data_dir: str | Path, out_dir: str | Path, *, split: str = "test",
                  cases: list[str] | None = None, overlap: float = 0.5, mirror: bool = False, device: str = "auto",
                  which: str = "best", quiet: bool = False) -> list[Path]:
    """Sliding-window prediction of every case of ``split`` (or ``cases``); returns the files written.

    Each prediction is argmax of the Gaussian-weighted softmax on the preprocessed grid, mapped back to the original
    grid by nearest neighbour and written as ``<out_dir>/<case>.nii.gz`` with the original affine.
    """
    from anatomask_lab.data.preprocess import write_prediction
    from anatomask_lab.data.sampler import load_case, read_dataset_json

    dev = resolve_device(device)
    model, cfg = load_segmenter(model_run, which=which, device=dev)
    meta = read_dataset_json(data_dir)
    if len(meta["channels"]) != model.in_channels:
        raise ValueError(f"model {model_run} takes {model.in_channels} channels, dataset {data_dir} has "
                         f"{len(meta['channels'])}")
    if len(meta["labels"]) != model.num_classes:
        raise ValueError(f"model {model_run} predicts {model.num_classes} classes, dataset {data_dir} has "
                         f"{len(meta['labels'])}")
    ids = cases if cases is not None else list(meta["splits"][split])
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

    Sources with one label file per case (FLARE22, AMOS22, AutoPET) are copied as they are: their preparers keep
    the data set's own label ids (a class subset that renumbers them is not supported here). TotalSegmentator-layout
    sources (one mask per structure in ``segmentations/``) are merged like the preparer
    merges them (``class_sources`` patterns, later classes drawn over earlier ones). Prediction and reference then
    share shape, orientation and affine, as ``anatomask-lab evaluate`` requires.
    """
    import fnmatch
    import json

    import nibabel as nib

    from anatomask_lab.data.io import save_nifti

    info = json.loads((Path(data_dir) / "dataset.json").read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for case in tqdm(info["splits"][split], desc=f"reference {split}", disable=quiet, unit="case"):
        meta = json.loads((Path(data_dir) / "cases" / case / "meta.json").read_text())
        image_path = Path(meta["source"]["images"][0])
        ref = nib.load(image_path)
        if meta["source"].get("label"):
            label = np.asarray(nib.load(meta["source"]["label"]).dataobj).astype(np.int16)
        else:
            seg_dir = image_path.parent / "segmentations"
            files = sorted(seg_dir.glob("*.nii*"))
            names = {f.name.split(".nii")[0]: f for f in files}
            label = np.zeros(ref.shape[:3], np.int16)
            for name, k in info["labels"].items():
                for pattern in info["class_sources"].get(name, []):
                    for struct in fnmatch.filter(names, pattern):
                        label[np.asarray(nib.load(names[struct]).dataobj) > 0] = k
        if label.shape != ref.shape[:3]:
            raise ValueError(f"{case}: reference label shape {label.shape} differs from {image_path} {ref.shape}")
        written.append(save_nifti(out / f"{case}.nii.gz", label, ref.affine,
                                  dtype=np.uint8 if label.max(initial=0) < 256 else np.int16))
    return written


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


def _cli(args) -> int:
    with torch.inference_mode():
        files = predict_split(args.model, args.data, args.out, split=args.split, overlap=args.overlap,
                              mirror=args.mirror, device=args.device, which=args.which, quiet=args.quiet)
    print(f"wrote {len(files)} predictions to {args.out}")
    if args.reference:
        refs = write_reference_labels(args.data, args.reference, split=args.split, quiet=args.quiet)
        print(f"wrote {len(refs)} reference label maps to {args.reference}")
    return 0
