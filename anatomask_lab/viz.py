"""Plotly figures used by the notebooks and the report: slices with mask and loss overlays, training curves.

Display convention (radiological), whatever the stored voxel order. Rows run top to bottom, columns left to right:

==========  =========================================  ================  =====================================
plane       slice axis (normal)                        top of the image  left of the image
==========  =========================================  ================  =====================================
axial       superior-inferior (S / I)                  anterior          patient's right (viewed from the feet)
coronal     anterior-posterior (A / P)                 superior          patient's right (viewed from the front)
sagittal    left-right (L / R)                         superior          anterior (the face looks left)
==========  =========================================  ================  =====================================

An array's orientation is its nibabel axis codes: the direction each array axis increases towards, e.g. ``"RAS"``
for prepared cases (``anatomask-lab prepare`` reorients to the closest canonical RAS+) and ``"LPS"`` for the raw
phantom and DICOM-converted volumes (affine ``diag(-sx, -sy, sz)``). Pass the codes or the 4x4 affine itself.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

__all__ = [
    "DEFAULT_ORIENTATION",
    "axis_codes",
    "crop_to_multiple",
    "loss_curves",
    "markdown_table",
    "notebook_setup",
    "mask_overlay_traces",
    "mean_intensity_patch_loss",
    "organ_patches",
    "label_map",
    "orient_slice",
    "plane_axes",
    "slice_of",
    "slice_figure",
]

Orientation = str | Sequence[str] | np.ndarray  # axis codes ("RAS", ("L", "P", "S")) or a 4x4 affine

DEFAULT_ORIENTATION = "LPS"  # the stored order of the raw phantom; what ``slice_of`` assumed before it took codes
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
_PAIR = {code: "".join(sorted(code + _OPPOSITE[code])) for code in _OPPOSITE}  # "L" -> "LR", "A" -> "AP" ...
# plane, named by the pair of its normal -> (direction of increasing row index, of increasing column index)
_DISPLAY = {"IS": ("axial", "P", "L"), "AP": ("coronal", "I", "L"), "LR": ("sagittal", "I", "P")}


def label_map(labels: dict[str, np.ndarray]) -> np.ndarray:
    """Merge per-structure bool masks into one uint8 map (1..K in the dict's order, 0 = background)."""
    out = None
    for k, mask in enumerate(labels.values(), start=1):
        out = np.zeros(mask.shape, np.uint8) if out is None else out
        out[np.asarray(mask, bool)] = k
    if out is None:
        raise ValueError("no structures given")
    return out


def notebook_setup() -> None:
    """Plotly output that renders both in JupyterLab (mimetype) and in exported HTML (plotly.js embedded once)."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook"


def crop_to_multiple(volume: np.ndarray, patch: int = 16) -> np.ndarray:
    """Centre-crop the last three axes to multiples of ``patch`` (the mask grid must tile the volume)."""
    spatial = volume.shape[-3:]
    keep = [s - s % patch for s in spatial]
    if min(keep) == 0:
        raise ValueError(f"volume {spatial} is smaller than one {patch}-voxel patch along some axis")
    start = [(s - k) // 2 for s, k in zip(spatial, keep, strict=True)]
    sl = tuple(slice(a, a + k) for a, k in zip(start, keep, strict=True))
    return volume[(..., *sl)]


def axis_codes(orientation: Orientation = DEFAULT_ORIENTATION) -> tuple[str, str, str]:
    """Axis codes of an orientation given as codes (``"RAS"``, ``("L", "P", "S")``) or as a 4x4 affine.

    Raises:
        ValueError: codes that are not one of L/R, one of A/P and one of S/I, or an affine that is not 4x4.
    """
    if not isinstance(orientation, str) and np.ndim(orientation) == 2:
        affine = np.asarray(orientation, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"an orientation affine must be 4x4, got shape {affine.shape}")
        from nibabel.orientations import aff2axcodes

        orientation = aff2axcodes(affine)
    codes = tuple(str(c).upper() for c in orientation)
    if len(codes) != 3 or any(c not in _PAIR for c in codes) or len({_PAIR[c] for c in codes}) != 3:
        raise ValueError(
            f"orientation must name one of L/R, A/P and S/I per axis (e.g. 'RAS', 'LPS') or be a 4x4 affine, "
            f"got {orientation!r}"
        )
    return codes


def plane_axes(orientation: Orientation = DEFAULT_ORIENTATION) -> dict[str, int]:
    """Array axis normal to each display plane, e.g. ``{"axial": 2, "coronal": 1, "sagittal": 0}`` for RAS."""
    return {_DISPLAY[_PAIR[code]][0]: axis for axis, code in enumerate(axis_codes(orientation))}


def orient_slice(image_2d: np.ndarray, axis: int, orientation: Orientation = DEFAULT_ORIENTATION) -> np.ndarray:
    """Put a slice ``np.take(volume, index, axis)`` of a volume with the given orientation in display order.

    Args:
        image_2d: the slice, its two axes being the volume's other two axes in their stored order.
        axis: the array axis the slice was taken along (it decides the plane: axial, coronal or sagittal).
        orientation: the volume's axis codes or affine (see :func:`axis_codes`).

    Returns:
        A view ``[rows, columns]`` in the module's display convention (transposed and / or flipped).
    """
    codes = axis_codes(orientation)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    if np.ndim(image_2d) != 2:
        raise ValueError(f"expected a 2-D slice, got shape {np.shape(image_2d)}")
    _, row_dir, col_dir = _DISPLAY[_PAIR[codes[axis]]]
    a, b = (codes[i] for i in range(3) if i != axis)  # directions of the slice's two axes, in stored order
    img = np.asarray(image_2d)
    if _PAIR[a] != _PAIR[row_dir]:  # the slice's first axis becomes the columns
        img, a, b = img.T, b, a
    if a != row_dir:
        img = img[::-1]
    if b != col_dir:
        img = img[:, ::-1]
    return img


def slice_of(volume: np.ndarray, axis: int, index: int, orientation: Orientation = DEFAULT_ORIENTATION) -> np.ndarray:
    """2-D slice of a ``[X, Y, Z]`` volume along an array axis, in the radiological display convention.

    Args:
        volume: the volume (or a label map / voxel mask of the same layout).
        axis: array axis to slice along; which plane that is (axial, coronal, sagittal) depends on ``orientation``
            (:func:`plane_axes`).
        index: slice index along ``axis``.
        orientation: the volume's axis codes (``"RAS"`` for prepared cases, ``"LPS"`` for the raw phantom) or its
            affine. The default ``"LPS"`` keeps the display of callers written before this argument existed.

    Returns:
        ``[rows, columns]``: axial slices with anterior at the top and the patient's right on the left; coronal and
        sagittal slices with superior at the top (and the patient's right, resp. anterior, on the left).
    """
    return orient_slice(np.take(volume, index, axis=axis), axis, orientation)


def mean_intensity_patch_loss(volume_dhw: np.ndarray, patch: int = 16,
                              window: tuple[float, float] | None = None) -> np.ndarray:
    """Per-patch loss ``[*grid]`` of a predictor that only knows each patch's mean intensity (= patch variance).

    A model-free stand-in for a teacher's ranking. With ``window`` the intensities are first clipped to it (e.g. a
    soft-tissue window of -200..300 HU), so that the air-body and bone edges do not outrank the texture inside
    organs.
    """
    from anatomask_lab.masking import patch_mean

    vol = np.asarray(volume_dhw, dtype=np.float32)
    if window is not None:
        vol = np.clip(vol, *window)
    x = torch.as_tensor(np.ascontiguousarray(vol))[None, None]
    mean = patch_mean(x, patch)
    sq = patch_mean(x * x, patch)
    return (sq - mean * mean).clamp_min(0)[0].numpy()


def organ_patches(labels_dhw: np.ndarray, patch: int = 16) -> np.ndarray:
    """Bool ``[*grid]``: patches that contain at least one labelled (organ) voxel."""
    from anatomask_lab.masking import patch_mean

    fg = torch.as_tensor(np.ascontiguousarray(labels_dhw) > 0, dtype=torch.float32)[None, None]
    return (patch_mean(fg, patch)[0] > 0).numpy()


_CLEAR, _RED = "rgba(0,0,0,0)", "rgba(230,40,40,0.45)"
_MASK_COLORS = [[0, _CLEAR], [0.5, _CLEAR], [0.5, _RED], [1, _RED]]


def mask_overlay_traces(image_2d: np.ndarray, mask_2d: np.ndarray, *, zmin: float, zmax: float) -> list:
    """A grey image trace and a red trace that is translucent on masked pixels (value 1), invisible elsewhere (0)."""
    overlay = np.asarray(mask_2d, dtype=np.float32)
    return [
        go.Heatmap(z=image_2d, colorscale="gray", zmin=zmin, zmax=zmax, showscale=False, name="image"),
        go.Heatmap(z=overlay, colorscale=_MASK_COLORS,
                   showscale=False, zmin=0, zmax=1, name="masked", hoverinfo="skip"),
    ]


def slice_figure(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray | None]], *, zmin: float, zmax: float, height: int = 360
) -> go.Figure:
    """Side-by-side slices, each ``(title, image_2d, mask_2d or None)``; masks drawn as a red overlay."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels])
    for col, (_, image, mask) in enumerate(panels, start=1):
        traces = mask_overlay_traces(image, mask if mask is not None else np.zeros_like(image, bool),
                                     zmin=zmin, zmax=zmax)
        for trace in traces:
            fig.add_trace(trace, row=1, col=col)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{col if col > 1 else ''}", row=1, col=col)
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def loss_curves(runs: dict[str, list[dict]], key: str = "loss", x: str = "epoch", title: str = "") -> go.Figure:
    """Line plot of ``key`` against ``x`` for several runs' metric records."""
    fig = go.Figure()
    for name, records in runs.items():
        pts = [(r[x], r[key]) for r in records if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=key, height=360)
    return fig


def figures_html(figures: Sequence[go.Figure], path: str | Path, title: str = "") -> Path:
    """Several figures in one HTML file that works offline (plotly.js embedded once, no CDN), written atomically."""
    from anatomask_lab.atomic import atomic_write

    divs = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "".join(divs) + "</body></html>")
    return atomic_write(path, lambda p: p.write_text(page))


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A Markdown table of dict rows (floats rounded to ``digits``), for ``IPython.display.Markdown``."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])

    def fmt(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
