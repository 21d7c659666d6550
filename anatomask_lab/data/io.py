"""Image reading (NIfTI; MetaImage and NRRD through SimpleITK), NIfTI writing, input checks, atomic file writes.

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
    "IMAGE_ENDINGS",
    "NIFTI_ENDINGS",
    "SITK_ENDINGS",
    "DataError",
    "atomic_dir",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_npy",
    "atomic_write_npz",
    "check_same_grid",
    "image_ending",
    "image_grid",
    "itk_to_ras_affine",
    "load_image",
    "load_nifti",
    "nifti_spacing",
    "save_like",
    "save_nifti",
    "to_file_order",
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


#: File endings read by nibabel (NIfTI) and, when SimpleITK is installed, by SimpleITK (MetaImage, NRRD).
NIFTI_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii")
SITK_ENDINGS: tuple[str, ...] = (".mha", ".mhd", ".nrrd", ".nhdr")
IMAGE_ENDINGS: tuple[str, ...] = NIFTI_ENDINGS + SITK_ENDINGS
SITK_EXTRA = "pip install 'anatomask-lab[sitk]' (SimpleITK)"


def image_ending(path: str | os.PathLike) -> str | None:
    """The image file ending of ``path`` (one of :data:`IMAGE_ENDINGS`, compared case-insensitively), or None."""
    name = Path(path).name.lower()
    return next((e for e in IMAGE_ENDINGS if name.endswith(e) and len(name) > len(e)), None)


def itk_to_ras_affine(origin, spacing, direction) -> np.ndarray:
    """Voxel-to-world (RAS mm) affine of an ITK image.

    ITK maps index ``(i, j, k)`` to the LPS point ``origin + D @ (spacing * (i, j, k))`` (``D``: direction cosines,
    row-major); RAS flips the first two world axes.

    Args:
        origin: 3 numbers (LPS mm).
        spacing: 3 numbers (mm).
        direction: 9 numbers, row-major 3x3.

    Returns:
        float64 [4, 4] for an array indexed ``[i, j, k]`` (ITK's index order, the reverse of
        ``SimpleITK.GetArrayFromImage``'s ``[k, j, i]``).
    """
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, np.float64).reshape(3, 3) * np.asarray(spacing, np.float64)[None, :]
    lps[:3, 3] = np.asarray(origin, np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _read_nibabel(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """``(image as stored, voxel array [X, Y, Z])`` of a NIfTI file."""
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
    return img, data


def _read_sitk(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """``(NIfTI header image with the RAS affine, voxel array [i, j, k])`` of a file SimpleITK reads."""
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise DataError(f"{path}: reading {image_ending(path)} files needs SimpleITK; {SITK_EXTRA}") from exc
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayViewFromImage(img)
    except Exception as exc:  # RuntimeError for junk, truncated or missing data files
        raise DataError(f"{path}: not a readable image file ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''})") from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: expected a scalar image, found {img.GetNumberOfComponentsPerPixel()} components "
                        "per voxel")
    size = img.GetSize()
    if len(size) == 4 and size[3] == 1:
        img = img[:, :, :, 0]
        arr = sitk.GetArrayViewFromImage(img)
    elif len(size) != 3:
        raise DataError(f"{path}: expected a 3D image, found {len(size)}D with shape {tuple(size)}")
    data = np.array(arr).transpose(2, 1, 0)  # [k, j, i] -> ITK index order [i, j, k]
    affine = itk_to_ras_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    return nib.Nifti1Image(data, affine, dtype=data.dtype), data


def load_image(
    path: str | os.PathLike,
    *,
    canonical: bool = True,
    dtype=np.float32,
    check_finite: bool = True,
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """Read a 3D image: NIfTI (``.nii``, ``.nii.gz``) with nibabel; MetaImage (``.mha``, ``.mhd``) and NRRD
    (``.nrrd``, ``.nhdr``) with SimpleITK, when installed (the ``sitk`` extra).

    An ITK file is read in ITK's index order ``[i, j, k]`` with the affine of :func:`itk_to_ras_affine` (LPS
    direction cosines times spacing, plus the origin, with the first two world axes flipped to RAS), so that the
    same volume stored as NIfTI or as MetaImage reads back as the same array and affine.

    Args:
        path: the image file (any other ending is tried as NIfTI).
        canonical: reorient to the closest canonical (RAS+) orientation, so that world x (patient right),
            y (anterior) and z (superior) increase with array axes 0, 1 and 2.
        dtype: dtype of the returned array (``None`` keeps the stored type).
        check_finite: raise on NaN or infinite voxels.

    Returns:
        ``(array [X, Y, Z], affine [4, 4], header image)``; the image is the file as stored (before reorienting),
        so its ``affine`` and ``shape`` give the original geometry (for an ITK file a NIfTI image holding its
        array in index order and its RAS affine).

    Raises:
        DataError: missing, unreadable, truncated, not 3D (a trailing singleton 4th axis is dropped), not scalar,
            a singular affine, not finite, or an ITK format without SimpleITK installed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    img, data = _read_sitk(path) if image_ending(path) in SITK_ENDINGS else _read_nibabel(path)
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


def load_nifti(
    path: str | os.PathLike,
    *,
    canonical: bool = True,
    dtype=np.float32,
    check_finite: bool = True,
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """Read a 3D image; the historical name of :func:`load_image` (same arguments, same result, every format).

    Returns:
        ``(array [X, Y, Z], affine [4, 4], header image)`` (see :func:`load_image`).
    """
    return load_image(path, canonical=canonical, dtype=dtype, check_finite=check_finite)


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


# ---------------------------------------------------------------------------------------------------------------
# Writing on the grid of an existing image file (predictions on raw images)

_DETACHED_ENDINGS = (".mhd", ".nhdr")  # a header file plus a data file it names


def _itk_information(path: Path):
    """SimpleITK's reader of ``path`` after reading the header only, and its 3D size, spacing, origin, direction."""
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise DataError(f"{path}: {image_ending(path)} files need SimpleITK; {SITK_EXTRA}") from exc
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(f"{path}: not a readable image header ({str(exc).strip().splitlines()[-1:]})") from exc
    size, n = reader.GetSize(), reader.GetDimension()
    if not (n == 3 or (n == 4 and size[3] == 1)):
        raise DataError(f"{path}: expected a 3D image, found shape {tuple(size)}")
    direction = np.asarray(reader.GetDirection(), np.float64).reshape(n, n)[:3, :3]
    return reader, tuple(size[:3]), reader.GetSpacing()[:3], reader.GetOrigin()[:3], direction


def image_grid(path: str | os.PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape ``[I, J, K]`` and voxel-to-world (RAS mm) affine of an image file, from its header alone.

    The array order is the one :func:`load_image` returns with ``canonical=False``: NIfTI's voxel order, ITK's
    index order ``[i, j, k]``.

    Raises:
        DataError: the file is missing, unreadable or not 3D.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if image_ending(path) in SITK_ENDINGS:
        _, size, spacing, origin, direction = _itk_information(path)
        return size, itk_to_ras_affine(origin, spacing, direction.ravel())
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for junk files
        raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    shape = tuple(int(n) for n in img.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise DataError(f"{path}: expected a 3D image, found shape {shape}")
    return shape[:3], np.asarray(img.affine, np.float64)


def to_file_order(array: np.ndarray, affine: np.ndarray, reference: str | os.PathLike
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Reorder an array on one grid into the voxel order of an image file covering the same voxels.

    Args:
        array: ``[..., X, Y, Z]``; leading axes (e.g. classes) are kept.
        affine: [4, 4] voxel-to-world (RAS mm) matrix of ``array``'s last three axes (e.g. a canonical grid).
        reference: image file whose grid is the same voxels in another axis order or direction.

    Returns:
        ``(array [..., I, J, K] in the file's voxel order, the file's affine)``.

    Raises:
        DataError: the two grids differ by more than axis order and direction (shape, or affine by over 1e-3 mm).
    """
    shape, file_affine = image_grid(reference)
    array, affine = np.asarray(array), np.asarray(affine, np.float64)
    lead = tuple(range(array.ndim - 3))
    spatial_first = np.moveaxis(array, lead, tuple(n + 3 for n in lead))
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.io_orientation(file_affine))
    out_affine = affine @ nib.orientations.inv_ornt_aff(ornt, spatial_first.shape[:3])
    out = np.moveaxis(nib.orientations.apply_orientation(spatial_first, ornt), tuple(n + 3 for n in lead), lead)
    if tuple(out.shape[-3:]) != shape or not np.allclose(out_affine, file_affine, atol=1e-3, rtol=0):
        raise DataError(f"{reference}: its grid (shape {shape}) is not the grid of the array to write (shape "
                        f"{tuple(out.shape[-3:])} in its voxel order; affines\n{np.round(file_affine, 4)}\nvs\n"
                        f"{np.round(out_affine, 4)})")
    return np.ascontiguousarray(out), file_affine


def _write_nifti_like(path: Path, data: np.ndarray, reference: Path, affine: np.ndarray) -> Path:
    """NIfTI with the reference's header (qform, sform and their codes, units, description) when it is NIfTI."""
    if image_ending(reference) not in NIFTI_ENDINGS:
        return save_nifti(path, data, affine)
    ref = nib.load(str(reference))
    img = type(ref)(data, ref.affine, header=ref.header.copy())
    img.header.set_data_dtype(data.dtype)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0  # labels are stored unscaled
    img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
    return atomic_write(path, lambda p: nib.save(img, str(p)))


def _write_itk(path: Path, data: np.ndarray, reference: Path, affine: np.ndarray) -> Path:
    """MetaImage or NRRD through SimpleITK, compressed, with the reference's origin, spacing and direction."""
    import shutil
    import tempfile

    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise DataError(f"{path}: writing {image_ending(path)} files needs SimpleITK; {SITK_EXTRA}") from exc
    if image_ending(reference) in SITK_ENDINGS:
        _, _, spacing, origin, direction = _itk_information(reference)
    else:
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
        origin, direction = lps[:3, 3], lps[:3, :3] / spacing[None, :]
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))  # ITK arrays are [k, j, i]
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in np.asarray(direction).ravel()])
    if image_ending(path) not in _DETACHED_ENDINGS:
        return atomic_write(path, lambda p: sitk.WriteImage(img, str(p), True))
    # a header naming a data file: both are written in a hidden folder, then moved in, the header last
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        sitk.WriteImage(img, str(tmp / path.name), True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == path.name):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_like(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, reference: str | os.PathLike, *,
              dtype=None) -> Path:
    """Write a 3D array in an image file's voxel order and geometry, in the format ``path``'s ending names.

    The array is reordered into the reference file's voxel order (:func:`to_file_order`). A NIfTI output of a
    NIfTI reference copies the reference's header, so its qform, sform, their codes and the voxel order are the
    input's exactly; MetaImage/NRRD outputs (through SimpleITK) carry the reference's origin, spacing and direction.
    Written atomically.

    Args:
        path: output file (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd`` or ``.nhdr``).
        array: ``[X, Y, Z]`` on the grid of ``affine``.
        affine: [4, 4] voxel-to-world (RAS mm) matrix of ``array``.
        reference: the image file whose geometry and header the output takes.
        dtype: on-disk dtype (default: the array's).

    Raises:
        DataError: an unknown ending, another grid than the reference's, or an ITK format without SimpleITK.
    """
    path, reference = Path(path), Path(reference)
    data, file_affine = to_file_order(array, affine, reference)
    data = data if dtype is None else data.astype(dtype, copy=False)
    ending = image_ending(path)
    if ending in NIFTI_ENDINGS:
        return _write_nifti_like(path, data, reference, file_affine)
    if ending in SITK_ENDINGS:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _write_itk(path, data, reference, file_affine)
    raise DataError(f"{path}: cannot write this file type; endings: {', '.join(IMAGE_ENDINGS)}")


def atomic_write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Write ``arrays`` as one compressed ``.npz`` (no pickled objects), atomically."""

    def _write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, **arrays)

    return atomic_write(path, _write)
