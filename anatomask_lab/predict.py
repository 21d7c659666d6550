"""Predict with a finetuned STU-Net and write label maps in the original geometry.

Two sources, one of them per call:

- ``--data DIR [--split test]``: cases of a prepared dataset (:func:`predict_split`), written as
  ``<case>.nii.gz`` on each case's source image grid (shape, orientation, affine).
- ``--images DIR``: raw image files, single files or nnU-Net-style channel sets ``<case>_0000<ending>``, ...
  (:func:`anatomask_lab.predict_images.predict_images`), prepared exactly as the model's training data were from
  the preprocessing recipe stored with the run (``<run>/preprocessing.json``), written as ``<case><ending>`` in
  each input's geometry and format; ``--save-probabilities`` adds ``<case>.npz``.

Both run the Gaussian-weighted sliding window (``--mirror`` for flip test-time augmentation; bf16 autocast on
CUDA with ``--amp auto``) and keep the class-probability sums on the GPU, or on the CPU with ``--accumulate cpu``
for data sets with 100+ classes on a small GPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from anatomask_lab.finetune import load_segmenter
from anatomask_lab.inference import sliding_window_predict
from anatomask_lab.predict_images import same_place
from anatomask_lab.progress import progress
from anatomask_lab.runtime import autocast_dtype, resolve_device

__all__ = ["predict_split", "write_reference_labels"]


def predict_split(model_run: str | Path, data_dir: str | Path, out_dir: str | Path, *, split: str = "test",
                  cases: list[str] | None = None, overlap: float = 0.5, mirror: bool = False, device: str = "auto",
                  which: str = "best", quiet: bool = False, amp: str = "auto", accumulate: str = "device"
                  ) -> list[Path]:
    """Sliding-window prediction of every case of ``split`` (or ``cases``); returns the files written.

    Each prediction is argmax of the Gaussian-weighted softmax on the preprocessed grid, mapped back to the original
    grid by nearest neighbour and written as ``<out_dir>/<case>.nii.gz`` with the original affine. ``amp``
    (``auto``: bf16 on CUDA, fp32 on CPU) and ``accumulate`` (``device`` or ``cpu``) are those of
    :func:`anatomask_lab.predict_images.predict_images`.

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
    amp_dtype = autocast_dtype(amp, dev)
    written = []
    for case in progress(ids, desc=f"predict {split}", disable=quiet, unit="case"):
        image, _, case_meta = load_case(data_dir, case)
        prob = sliding_window_predict(model, np.asarray(image), tuple(cfg["patch_size"]), model.num_classes,
                                      overlap=overlap, mirror=mirror, device=dev, amp_dtype=amp_dtype,
                                      batch_size=int(cfg.get("batch_size", 2)), accumulate=accumulate)
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
    from anatomask_lab.data.dataset import SPLITS
    from anatomask_lab.inference import ACCUMULATE

    p = subparsers.add_parser("predict", help="sliding-window prediction of a dataset split or of raw image files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="finetuning run folder or checkpoint file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR", help="prepared dataset folder: predict the cases of --split")
    source.add_argument("--images", metavar="DIR", help="folder of raw images (<case><ending> or channel sets "
                        "<case>_0000<ending>, ...; .nii.gz, .nii, .mha, .mhd, .nrrd, .nhdr): predict every case")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: <case>.nii.gz for --data, "
                   "<case><ending> (and <case>.npz) for --images; not the --images folder")
    p.add_argument("--split", default=None, metavar="SPLIT",
                   help=f"split of --data to predict: {', '.join((*SPLITS, 'all'))}, or a split the dataset "
                        "defines such as imagesTs (default: test)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default: 0.5)")
    p.add_argument("--mirror", action="store_true", help="mirror test-time augmentation, 8 flips (default: off)")
    p.add_argument("--which", choices=["best", "last"], default="best",
                   help="checkpoint: best validation Dice (falls back to last) or last (default: best)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast precision: auto is bf16 on CUDA and fp32 on the CPU (default: auto)")
    p.add_argument("--accumulate", choices=ACCUMULATE, default="device",
                   help="where the class-probability sums of a volume live: on the network's device, or on the "
                        "cpu (for 100+ classes on a small GPU; same result) (default: device)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="--images only: also write <case>.npz with float32 class probabilities [K, *input shape] on "
                        "the input grid, class_names and affine (default: off)")
    p.add_argument("--overwrite", action="store_true", help="--images only: replace existing outputs (default: off)")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="--images only: keep cases whose outputs exist, predict the rest (default: off)")
    p.add_argument("--modality", default=None, metavar="M[,M...]",
                   help="--images only: modality per channel (CT: CT normalisation; any other: z-score), needed "
                        "when the training cases mixed modalities (default: the run's stored preprocessing)")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="--data only: also write the split's ground-truth label maps in the same geometry (for "
                        "`evaluate --gt`) (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")
    p.set_defaults(func=_cli)


_DATA_ONLY = {"split": "--split", "reference": "--reference"}
_IMAGES_ONLY = {"save_probabilities": "--save-probabilities", "overwrite": "--overwrite", "resume": "--continue",
                "modality": "--modality"}


def _cli(args) -> int:
    wrong = _DATA_ONLY if args.images else _IMAGES_ONLY
    used = [flag for key, flag in wrong.items() if getattr(args, key)]
    if used:
        raise ValueError(f"{used[0]} does not apply to {'--images' if args.images else '--data'}")
    if args.images:
        return _cli_images(args)
    if args.reference and same_place(args.reference, args.out):
        raise ValueError(f"--reference {args.reference} is the --out folder {args.out}: the ground truth would "
                         "replace the predictions; choose another folder")
    split = args.split or "test"
    with torch.inference_mode():
        files = predict_split(args.model, args.data, args.out, split=split, overlap=args.overlap,
                              mirror=args.mirror, device=args.device, which=args.which, quiet=args.quiet,
                              amp=args.amp, accumulate=args.accumulate)
    print(f"wrote {len(files)} predictions to {args.out}")
    if args.reference:
        refs = write_reference_labels(args.data, args.reference, split=split, quiet=args.quiet)
        print(f"wrote {len(refs)} reference label maps to {args.reference}")
    return 0


def _cli_images(args) -> int:
    from anatomask_lab.predict_images import predict_images

    modalities = args.modality.split(",") if args.modality else None
    with torch.inference_mode():
        files = predict_images(args.model, args.images, args.out, overlap=args.overlap, mirror=args.mirror,
                               device=args.device, which=args.which, amp=args.amp, accumulate=args.accumulate,
                               save_probabilities=args.save_probabilities, overwrite=args.overwrite,
                               resume=args.resume, modalities=modalities, quiet=args.quiet)
    print(f"wrote {len(files)} files to {args.out}")
    return 0
