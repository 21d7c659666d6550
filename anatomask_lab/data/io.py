"""NIfTI reading and writing, input checks, and atomic file writes.

Every problem with an input file raises :class:`DataError` (a ``ValueError``) whose message starts with the path.
Writes go to a temporary name beside the target and are renamed into place, so an interrupted run never leaves
a half-written file under the final name.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from anatomask_lab.atomic import atomic_dir, atomic_write, atomic_write_json

__all__ = [
    "DataError",
    "atomic_dir",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_npy",
    "check_same_grid",
    "load_nifti",
    "nifti_spacing",
    "save_nifti",
]


class DataError(ValueError):
    """A data file or folder is unusable; the message names the path and the problem."""


def atomic_write_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as ``.npy`` (memory-mappable), atomically."""

    def _write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)

    return atomic_write(path, _write)


def nifti_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along the three array axes: the column norms of the affine's 3x3 part."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def load_nifti(
    path: str | os.PathLike,
    *,
    canonical: bool = True,
    dtype=np.float32,
    check_finite: bool = True,
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """Read a 3D NIfTI image.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        canonical: reorient to the closest canonical (RAS+) orientation, so that world x (patient right),
            y (anterior) and z (superior) increase with array axes 0, 1 and 2.
        dtype: dtype of the returned array (``None`` keeps the stored type).
        check_finite: raise on NaN or infinite voxels.

    Returns:
        ``(array [X, Y, Z], affine [4, 4], header image)``; the image is the file as stored (before reorienting),
        so its ``affine`` and ``shape`` give the original geometry.

    Raises:
        DataError: missing, not NIfTI, truncated, not 3D (a trailing singleton 4th axis is dropped), a singular
            affine, or not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for junk files
        raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(f"{path}: not a NIfTI image (read as {type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) != 3:
        raise DataError(f"{path}: expected a 3D image, found {len(shape)}D with shape {tuple(shape)}")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # EOFError, zlib.error, OSError for truncated files
        raise DataError(f"{path}: truncated or corrupt data ({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(f"{path}: singular affine (voxel-to-world matrix {np.round(affine[:3, :3], 4).tolist()}); "
                        "the header gives no usable voxel geometry")
    if canonical:
        ornt = nib.orientations.io_orientation(affine)
        affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
        data = nib.orientations.apply_orientation(data, ornt)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if check_finite and data.dtype.kind == "f" and not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise DataError(f"{path}: {n_bad} NaN or infinite voxels")
    return np.ascontiguousarray(data), affine, img


def check_same_grid(
    shape_a: tuple[int, ...], affine_a: np.ndarray, path_a: Path, shape_b: tuple[int, ...], affine_b: np.ndarray,
    path_b: Path, *, atol: float = 1e-3,
) -> None:
    """Raise :class:`DataError` unless two images share shape and affine (within ``atol`` mm)."""
    if tuple(shape_a) != tuple(shape_b):
        raise DataError(f"{path_b}: shape {tuple(shape_b)} differs from {path_a} shape {tuple(shape_a)}")
    if not np.allclose(affine_a, affine_b, atol=atol, rtol=0):
        raise DataError(
            f"{path_b}: affine differs from {path_a}\n{np.round(affine_b, 4)}\nvs\n{np.round(affine_a, 4)}"
        )


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    dtype=None,
    compresslevel: int = 1,
) -> Path:
    """Write a NIfTI file atomically; ``.nii.gz`` is gzip-compressed at ``compresslevel`` (1 = fast).

    Args:
        path: target ``.nii`` or ``.nii.gz``.
        array: [X, Y, Z] voxel data.
        affine: [4, 4] voxel-to-world (RAS mm) matrix; written as both qform and sform (code 1, scanner).
        dtype: on-disk dtype (default: the array's).
        compresslevel: gzip level for ``.nii.gz``.
    """
    path = Path(path)
    data = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype, copy=False)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), dtype=data.dtype)
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["scl_slope"] = 1.0
    img.header["scl_inter"] = 0.0
    hdr = img.header
    hdr["vox_offset"] = 352  # single-file NIfTI-1: 348-byte header + 4-byte extension flag, then the voxels
    little = data.astype(data.dtype.newbyteorder("<"), copy=False)
    hdr.set_data_dtype(little.dtype)
    head = hdr.copy().as_byteswapped("<").binaryblock if hdr.endianness != "<" else hdr.binaryblock
    raw = head + b"\x00" * 4 + little.tobytes(order="F")  # one copy instead of nibabel's chunked writer

    def _write(p: Path) -> None:
        if path.name.endswith(".gz"):
            with open(p, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=compresslevel,
                                                   mtime=0) as gz:
                gz.write(raw)
        else:
            p.write_bytes(raw)

    return atomic_write(path, _write)
