"""Interactive explorers (ipywidgets + plotly FigureWidget). The only module that imports ipywidgets.

The logic is plain methods, so tests drive a widget headless: set a slider's ``value`` and read the figure data and
the labels back.
"""

from __future__ import annotations

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import torch

from anatomask_lab.masking import anatomask_mask, mask_counts, random_mask
from anatomask_lab.viz import (
    DEFAULT_ORIENTATION,
    axis_codes,
    crop_to_multiple,
    mask_overlay_traces,
    mean_intensity_patch_loss,
    organ_patches,
    orient_slice,
    plane_axes,
    slice_of,
)

__all__ = ["MaskExplorer"]


class MaskExplorer:
    """Random vs AnatoMask masks on a CT volume, with sliders for r_t, gamma, slice and axis and the ordering.

    Args:
        volume_dhw: CT volume (HU or normalised); centre-cropped to multiples of ``patch``.
        labels_dhw: organ label map of the same shape (0 = background), for the organ share; optional.
        patch_loss: per-patch losses ``[*grid]`` that rank the patches (e.g. a teacher's); defaults to the loss of
            a mean-intensity predictor within the display window (:func:`anatomask_lab.viz.mean_intensity_patch_loss`).
        patch: patch size in voxels (16 for STU-Net's 5 pretrained stages).
        seed: the masks are drawn from a generator reseeded with it on every update, so that moving one slider
            changes only what that slider controls.
        window: intensity display window (zmin, zmax).
        orientation: the volume's axis codes (``"RAS"`` for prepared cases, ``"LPS"`` for the raw phantom) or its
            affine; slices are shown in the radiological convention of :mod:`anatomask_lab.viz` whatever it is.
    """

    def __init__(self, volume_dhw, labels_dhw=None, patch_loss=None, *, patch: int = 16, seed: int = 0,
                 window: tuple[float, float] | None = None, orientation=DEFAULT_ORIENTATION) -> None:
        self.orientation = axis_codes(orientation)
        self.volume = crop_to_multiple(np.asarray(volume_dhw, dtype=np.float32), patch)
        self.labels = None if labels_dhw is None else crop_to_multiple(np.asarray(labels_dhw), patch)
        self.patch, self.seed = patch, seed
        self.grid = tuple(s // patch for s in self.volume.shape)
        lo, hi = window or (float(np.percentile(self.volume, 1)), float(np.percentile(self.volume, 99)))
        self.window = (lo, hi)
        if patch_loss is None:
            patch_loss = mean_intensity_patch_loss(self.volume, patch, self.window)
        loss = np.asarray(patch_loss)
        if loss.shape != self.grid:
            raise ValueError(f"patch_loss has shape {loss.shape}, expected the grid {self.grid}")
        self.patch_loss = torch.as_tensor(loss, dtype=torch.float32)[None]
        self.organ = None if self.labels is None else organ_patches(self.labels, patch)

        self.gamma = W.FloatSlider(value=0.6, min=0.05, max=0.95, step=0.05, description="gamma")
        self.r_t = W.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="r_t")
        planes = plane_axes(self.orientation)
        self.axis = W.Dropdown(options=[(f"{name} (axis {planes[name]})", planes[name])
                                        for name in ("axial", "coronal", "sagittal")],
                               value=planes["axial"], description="axis")
        size = self.volume.shape[planes["axial"]]
        self.index = W.IntSlider(value=size // 2, min=0, max=size - 1, description="slice")
        self.order = W.ToggleButtons(options=["high", "low"], value="high", description="order")
        self.info = W.HTML()
        self.fig = go.FigureWidget()
        self.fig.set_subplots(rows=1, cols=2, subplot_titles=("random mask", "AnatoMask"))
        for col in (1, 2):
            for trace in mask_overlay_traces(np.zeros((2, 2)), np.zeros((2, 2), bool), zmin=lo, zmax=hi):
                self.fig.add_trace(trace, row=1, col=col)
            self.fig.update_yaxes(autorange="reversed", row=1, col=col)
        self.fig.update_layout(height=380, margin=dict(l=10, r=10, t=40, b=10))
        for w in (self.gamma, self.r_t, self.index, self.order):
            w.observe(self._on_change, names="value")
        self.axis.observe(self._on_axis, names="value")
        self.widget = W.VBox([W.HBox([self.gamma, self.r_t, self.order]), W.HBox([self.axis, self.index]),
                              self.info, self.fig])
        self.update()

    # -- state ------------------------------------------------------------------------------------------------
    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        """The current random and AnatoMask patch masks, each ``[*grid]`` bool."""
        g = torch.Generator().manual_seed(self.seed)
        rnd = random_mask(1, self.grid, self.gamma.value, generator=g)[0]
        g = torch.Generator().manual_seed(self.seed)
        ana = anatomask_mask(self.patch_loss, self.gamma.value, self.r_t.value, generator=g,
                             order=self.order.value)[0]
        return rnd.numpy(), ana.numpy()

    def counts(self) -> dict[str, float]:
        """Masked-patch count, top-patch count and organ shares of the current masks."""
        n = int(np.prod(self.grid))
        n_masked, n_top = mask_counts(n, self.gamma.value, self.r_t.value)
        rnd, ana = self.masks()
        out = {"n": n, "n_masked": n_masked, "n_top": n_top, "masked_share": float(ana.sum()) / n}
        if self.organ is not None:
            out["organ_share_random"] = float((rnd & self.organ).sum()) / max(int(rnd.sum()), 1)
            out["organ_share_anatomask"] = float((ana & self.organ).sum()) / max(int(ana.sum()), 1)
        return out

    # -- drawing ----------------------------------------------------------------------------------------------
    def _on_axis(self, _change) -> None:
        size = self.volume.shape[self.axis.value]
        self.index.max = size - 1
        self.index.value = min(self.index.value, size - 1)
        self.update()

    def _on_change(self, _change) -> None:
        self.update()

    def update(self) -> None:
        """Recompute the masks and redraw both panels in place (no new traces)."""
        axis, index = self.axis.value, self.index.value
        image = slice_of(self.volume, axis, index, self.orientation)
        rnd, ana = self.masks()
        with self.fig.batch_update():
            for k, mask in enumerate((rnd, ana)):
                vox = self._to_voxels(mask, axis, index)
                self.fig.data[2 * k].z = image
                self.fig.data[2 * k + 1].z = vox.astype(np.float32)
        c = self.counts()
        text = (f"<b>{c['n_masked']}</b> of {c['n']} patches masked ({c['masked_share']:.1%}); "
                f"<b>{c['n_top']}</b> chosen by loss ({self.order.value}), the rest at random")
        if "organ_share_random" in c:
            text += (f"<br>share of masked patches on organs: random {c['organ_share_random']:.1%}, "
                     f"AnatoMask {c['organ_share_anatomask']:.1%}")
        self.info.value = text

    def _to_voxels(self, mask_grid: np.ndarray, axis: int, index: int) -> np.ndarray:
        """The patch mask on one voxel slice, oriented like :func:`slice_of` (only that slice is upsampled)."""
        grid_slice = np.take(mask_grid, index // self.patch, axis=axis)
        vox = np.repeat(np.repeat(grid_slice, self.patch, axis=0), self.patch, axis=1)
        return orient_slice(vox, axis, self.orientation)
