"""Figures of a CT case: slices with and without a label overlay, written as PNG without any imaging library.

:func:`phantom_figure` draws the montage (axial, coronal and sagittal slices in radiological display) and
:func:`write_png` writes it with numpy and zlib only.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage

from anatomask_lab.data.io import atomic_write

__all__ = ["phantom_figure", "write_png"]


def _palette(n: int) -> np.ndarray:
    """``n`` distinct saturated colours (golden-ratio hue steps), float32 [n, 3] in 0..255."""
    h = (np.arange(n) * 0.618034) % 1.0
    k = (np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6.0) % 6.0
    return (255.0 * (1.0 - 0.75 * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))).astype(np.float32)


def write_png(path, rgb: np.ndarray) -> Path:
    """Write an 8-bit image as PNG (Sub filter, zlib level 9), atomically.

    Args:
        path: output file (its folder is created).
        rgb: uint8-convertible RGB [H, W, 3] or grey [H, W] (or [H, W, 1]).

    Returns:
        The path written.
    """
    img = np.asarray(rgb, dtype=np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    h, w, c = img.shape
    color = {1: 0, 3: 2}[c]
    rows = img.reshape(h, w * c).astype(np.int16)
    sub = np.concatenate([rows[:, :c], np.diff(rows, axis=1)[:, c - 1:] if c == 1 else rows[:, c:] - rows[:, :-c]],
                         axis=1)
    raw = np.concatenate([np.ones((h, 1), np.uint8), (sub & 0xFF).astype(np.uint8)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    return atomic_write(path, lambda p: p.write_bytes(png))


def _resample_rows(img: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Stretch rows so that pixels are square (nearest neighbour); ``img`` [H, W(, ...)] -> [H', W(, ...)]."""
    n = max(1, int(round(img.shape[0] * row_mm / col_mm)))
    idx = np.minimum((np.arange(n) * col_mm / row_mm).astype(int), img.shape[0] - 1)
    return img[idx]


def _tiles(gray_hw: np.ndarray, lab_hw: np.ndarray, pal: np.ndarray, row_mm: float, col_mm: float):
    """A slice as RGB float [H', W, 3] twice: plain, and with labels filled at 45 % opacity and outlined.

    Args:
        gray_hw: display grey levels in 0..1, [H, W].
        lab_hw: label index per pixel (0 none, ``i`` is ``pal[i - 1]``), int [H, W].
        pal: colours, float32 [n, 3] in 0..255.
        row_mm: pixel height in mm; ``col_mm`` the width (rows are stretched to square pixels).
    """
    gray_hw = _resample_rows(gray_hw, row_mm, col_mm)
    lab_hw = _resample_rows(lab_hw, row_mm, col_mm)
    rgb = np.repeat(gray_hw[..., None] * 255.0, 3, axis=2)
    over = rgb.copy()
    m = lab_hw > 0
    over[m] = 0.55 * over[m] + 0.45 * pal[lab_hw[m] - 1]
    edge = m & (ndimage.grey_dilation(lab_hw, size=3) != ndimage.grey_erosion(lab_hw, size=3))
    over[edge] = pal[lab_hw[edge] - 1]
    return rgb, over


def _hstack(tiles: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Tiles [h_i, w_i, 3] side by side, top-aligned, each followed by ``gap`` black columns."""
    h = max(t.shape[0] for t in tiles)
    return np.concatenate([np.pad(t, ((0, h - t.shape[0]), (0, gap), (0, 0))) for t in tiles], axis=1)


def phantom_figure(ct: np.ndarray, labels: dict[str, np.ndarray], affine: np.ndarray, *, window=(-160, 240),
                   axial_structures=("spleen", "kidney_right", "vertebrae_L4", "urinary_bladder"),
                   zoom: int = 1) -> np.ndarray:
    """Montage of a case: axial slices through the given structures' centres, one coronal and one sagittal slice.

    Left: axial CT in an abdominal window (W 400 / L 40) above the same slices with labels (filled at 45 % opacity,
    outlined); right: coronal and sagittal CT, each followed by its labelled copy. Slices are shown as radiologists
    do: patient's right on the image left, anterior up (axial) or left (sagittal), head up.

    Args:
        ct: HU [X, Y, Z] in any orientation described by ``affine``.
        labels: name -> bool mask, same grid.
        affine: voxel-to-RAS matrix.
        window: display range in HU.
        axial_structures: one axial slice through the centre of each (the middle slice when absent).
        zoom: integer pixel replication.

    Returns:
        uint8 RGB image [H, W, 3].
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)

    def canon(a):
        return nib.orientations.apply_orientation(a, ornt)

    vol = canon(np.asarray(ct, dtype=np.float32))
    names = [n for n in labels if labels[n].any()]
    lab = np.zeros(vol.shape, np.int16)
    for i, n in enumerate(names):
        lab[canon(labels[n])] = i + 1
    sp = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))[np.argsort(ornt[:, 0])]
    pal = _palette(max(len(names), 1))
    lo, hi = window
    gray = np.clip((vol - lo) / (hi - lo), 0, 1)

    def centre(name, axis, default):
        m = labels.get(name)
        return int(round(np.nonzero(canon(m))[axis].mean())) if m is not None and m.any() else default

    axial = []
    for s in axial_structures:
        k = centre(s, 2, vol.shape[2] // 2)
        # rows: anterior at top (y descending); columns: patient's right at left (x descending)
        axial.append(_tiles(gray[::-1, ::-1, k].T, lab[::-1, ::-1, k].T, pal, sp[1], sp[0]))
    j = centre("aorta", 1, vol.shape[1] // 2)
    i = centre("kidney_right", 0, vol.shape[0] // 2)
    cor = _tiles(gray[::-1, j, ::-1].T, lab[::-1, j, ::-1].T, pal, sp[2], sp[0])
    sag = _tiles(gray[i, ::-1, ::-1].T, lab[i, ::-1, ::-1].T, pal, sp[2], sp[1])  # anterior on the left
    ct_row = _hstack([a[0] for a in axial])
    left = np.concatenate([ct_row, np.zeros((4, ct_row.shape[1], 3)), _hstack([a[1] for a in axial])], axis=0)
    out = _hstack([left, cor[0], cor[1], sag[0], sag[1]], gap=6)[:, :-6].astype(np.uint8)
    return np.repeat(np.repeat(out, zoom, axis=0), zoom, axis=1)
