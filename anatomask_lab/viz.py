"""Plotly figures used by the notebooks and the report: slices with mask and loss overlays, training curves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

__all__ = [
    "crop_to_multiple",
    "loss_curves",
    "markdown_table",
    "notebook_setup",
    "mask_overlay_traces",
    "mean_intensity_patch_loss",
    "organ_patches",
    "label_map",
    "slice_of",
    "slice_figure",
]


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


def slice_of(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D slice of a stored ``[X, Y, Z]`` volume along ``axis``, oriented for display.

    Axial (axis 2): rows = y (anterior at the top of the array as stored), columns = x. Coronal and sagittal
    slices put z (superior) at the top.
    """
    img = np.take(volume, index, axis=axis).T
    return img if axis == 2 else img[::-1]


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
