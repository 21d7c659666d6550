"""A folder of unlabelled images (any depth): every image file becomes one unlabelled case for pretraining.

Image files are those :func:`anatomask_lab.data.io.image_ending` knows (``.nii.gz``, ``.nii``; ``.mha``, ``.mhd``,
``.nrrd``, ``.nhdr`` with SimpleITK); other files (``.raw`` data of a ``.mhd``, notes, tables) and hidden files or
folders are skipped. A case id is the file's path below ``--src`` without its ending, folders joined by ``__`` and
characters other than letters, digits, ``_``, ``-`` and ``.`` replaced by ``_``; an id met twice gets ``-2``,
``-3``, ... in path order. Every case is in ``train`` with one channel, ``--modality`` (default CT).
"""

from __future__ import annotations

import re
from pathlib import Path

from anatomask_lab.data.io import SITK_ENDINGS, SITK_EXTRA, DataError, image_ending
from anatomask_lab.data.prepare import common_options, report
from anatomask_lab.data.preprocess import CaseSource, preprocess_dataset

HELP = "a folder of unlabelled images, searched recursively (.nii.gz, .nii; .mha, .nrrd with SimpleITK)"

MODALITIES: tuple[str, ...] = ("CT", "MR", "PET")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def image_files(src: Path) -> list[Path]:
    """Image files under ``src`` (recursively, hidden files and folders skipped), sorted by relative path."""
    found = [p for p in src.rglob("*") if image_ending(p) and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(src).parts)]
    return sorted(found, key=lambda p: p.relative_to(src).as_posix())


def case_ids(src: Path, files: list[Path]) -> list[str]:
    """One plain, unique case id per file (see the module docstring), in the order of ``files``."""
    ids, taken = [], set()
    for f in files:
        rel = f.relative_to(src).as_posix()
        stem = rel[: -len(image_ending(f))]
        base = _UNSAFE.sub("_", stem.replace("/", "__")).lstrip(".") or "case"
        case, k = base, 1
        while case in taken:
            k += 1
            case = f"{base}-{k}"
        taken.add(case)
        ids.append(case)
    return ids


def _check_sitk(files: list[Path]) -> None:
    """Fail before any work when a file needs SimpleITK and it is not installed."""
    needs = next((f for f in files if image_ending(f) in SITK_ENDINGS), None)
    if needs is None:
        return
    try:
        import SimpleITK  # noqa: F401
    except ImportError as exc:
        raise DataError(f"{needs}: reading {image_ending(needs)} files needs SimpleITK; {SITK_EXTRA}") from exc


def find_cases(src, modality: str = "CT") -> list[CaseSource]:
    """Every image file under ``src`` as an unlabelled ``train`` case of ``modality``.

    Raises:
        DataError: ``src`` is not a folder, holds no image file, an unknown modality, or an ITK-format file without
            SimpleITK installed.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    if modality not in MODALITIES:
        raise DataError(f"--modality {modality!r}: choose one of {', '.join(MODALITIES)}")
    files = image_files(src)
    if not files:
        n_other = sum(1 for p in src.rglob("*") if p.is_file())
        raise DataError(f"{src}: no image files (.nii.gz, .nii, .mha, .mhd, .nrrd, .nhdr) found, recursively; "
                        f"{n_other} other files")
    _check_sitk(files)
    return [CaseSource(case, (f,), (modality,), split="train", info=(("relative_path", f.relative_to(src).as_posix()),))
            for case, f in zip(case_ids(src, files), files, strict=True)]


def prepare(src, out, *, modality: str = "CT", spacing=(1.5, 1.5, 1.5), workers=None, clip: bool = True,
            label_mode: str = "nearest", seed: int = 0, progress: bool = True) -> Path:
    """Every image under ``src`` as an unlabelled case, preprocessed into ``out``."""
    cases = find_cases(src, modality)
    return preprocess_dataset(cases, out, name=Path(src).resolve().name or "folder", channels=[modality],
                              table=None, spacing=spacing, clip=clip, label_mode=label_mode, workers=workers,
                              progress=progress, seed=seed, split_source="image folder: every case in train "
                              "(unlabelled, for pretraining)", extra={"source_format": "image folder"})


def add_arguments(parser) -> None:
    parser.add_argument("--modality", type=str.upper, choices=MODALITIES, default="CT",
                        help="modality of every image: CT (default; CT normalisation), MR or PET (z-score over "
                             "non-zero voxels)")


def run(args) -> int:
    out = prepare(args.src, args.out, modality=args.modality, **common_options(args))
    print(report(out))
    return 0
