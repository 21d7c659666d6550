"""FLARE22: 50 labelled abdominal CTs (13 organs) and 2000 unlabelled ones.

Release layout (folder names vary between downloads, so files are found anywhere under ``--src``):
``FLARE22_Tr_0001_0000.nii.gz`` images with ``FLARE22_Tr_0001.nii.gz`` label maps, and unlabelled
``Case_00001_0000.nii.gz`` images. Labelled cases are split 70/10/20 (seeded); unlabelled ones join ``train``
for pretraining (``--no-unlabelled`` leaves them out).
"""

from __future__ import annotations

import re
from pathlib import Path

from anatomask_lab.data.io import DataError
from anatomask_lab.data.labels import make_label_table
from anatomask_lab.data.prepare import common_options, parse_classes, report
from anatomask_lab.data.preprocess import CaseSource, preprocess_dataset

HELP = "FLARE22 (labelled FLARE22_Tr_* and unlabelled Case_*)"

#: FLARE22 label values 1..13 with the names of the release's own ``dataset.json``; the one FLARE22 class table
#: (:data:`anatomask_lab.metrics.FLARE22_CLASSES` is built from it).
CLASSES: tuple[str, ...] = (
    "liver", "right kidney", "spleen", "pancreas", "aorta", "inferior vena cava", "right adrenal gland",
    "left adrenal gland", "gallbladder", "esophagus", "stomach", "duodenum", "left kidney",
)

_IMAGE = re.compile(r"^(FLARE22_Tr_\d{4})_0000\.nii\.gz$")
_LABEL = re.compile(r"^(FLARE22_Tr_\d{4})\.nii\.gz$")
_UNLABELLED = re.compile(r"^(Case_\d{5})_0000\.nii\.gz$")


def _collect(files, pattern: re.Pattern) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for f in files:
        m = pattern.match(f.name)
        if m:
            if m.group(1) in found:
                raise DataError(f"{f}: duplicate of {found[m.group(1)]}")
            found[m.group(1)] = f
    return found


def find_cases(src, unlabelled: bool = True) -> list[CaseSource]:
    """Scan a FLARE22 release.

    Raises:
        DataError: missing folder, no FLARE22 files, an image without its label or a label without its image.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    files = sorted(src.rglob("*.nii.gz"))
    images, labels = _collect(files, _IMAGE), _collect(files, _LABEL)
    extra = _collect(files, _UNLABELLED) if unlabelled else {}
    if not images and not extra:
        raise DataError(f"{src}: no FLARE22 files (FLARE22_Tr_XXXX_0000.nii.gz or Case_XXXXX_0000.nii.gz); "
                        f"found {len(files)} other .nii.gz files")
    for cid, f in images.items():
        if cid not in labels:
            raise DataError(f"{f}: no label file {cid}.nii.gz found under {src}")
    for cid, f in labels.items():
        if cid not in images:
            raise DataError(f"{f}: label without its image {cid}_0000.nii.gz")
    cases = [CaseSource(cid, (images[cid],), ("CT",), label=labels[cid]) for cid in sorted(images)]
    cases += [CaseSource(cid, (extra[cid],), ("CT",)) for cid in sorted(extra)]
    return cases


def prepare(src, out, *, classes=None, unlabelled: bool = True, spacing=(1.5, 1.5, 1.5), workers=None,
            clip: bool = True, label_mode: str = "nearest", seed: int = 0, progress: bool = True) -> Path:
    """Find FLARE22 cases under ``src`` and write the preprocessed dataset to ``out``."""
    cases = find_cases(src, unlabelled)
    table = make_label_table(CLASSES, parse_classes(classes) if isinstance(classes, str) else classes)
    return preprocess_dataset(cases, out, name="flare22", channels=["CT"], table=table, spacing=spacing, clip=clip,
                              label_mode=label_mode, workers=workers, progress=progress, seed=seed)


def add_arguments(parser) -> None:
    parser.add_argument("--classes", default=None, help="comma-separated class entries (default: all 13)")
    parser.add_argument("--no-unlabelled", action="store_true", help="leave out the unlabelled Case_* images")


def run(args) -> int:
    out = prepare(args.src, args.out, classes=args.classes, unlabelled=not args.no_unlabelled,
                  **common_options(args))
    print(report(out))
    return 0
