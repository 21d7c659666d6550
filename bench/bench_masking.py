"""Time ``anatomask_mask`` against a per-sample Python/numpy loop doing the same selection.

The loop mirrors how the authors' code builds the mask: per sample, copy the losses to the host, argsort them with
numpy, take the top ones, draw the rest with numpy's global RNG, and copy the mask back. Both run side by side in
one process; the figure that matters is the ratio.

    python bench/bench_masking.py [--device cpu|cuda] [--repeats 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from anatomask_lab.masking import anatomask_mask, mask_counts
from anatomask_lab.runs import device_name


def loop_mask(patch_loss: torch.Tensor, gamma: float, r_t: float) -> torch.Tensor:
    """Reference-style selection: one sample at a time, on the host."""
    b, grid = patch_loss.shape[0], patch_loss.shape[1:]
    n = int(np.prod(grid))
    n_masked, n_top = mask_counts(n, gamma, r_t)
    out = []
    for i in range(b):
        loss = patch_loss[i].detach().cpu().numpy().reshape(-1)
        order = np.argsort(-loss)
        top = order[:n_top]
        rest = np.setdiff1d(np.arange(n), top)
        fill = np.random.choice(rest, n_masked - n_top, replace=False)
        m = np.zeros(n, dtype=bool)
        m[top] = True
        m[fill] = True
        out.append(torch.from_numpy(m.reshape(grid)))
    return torch.stack(out).to(patch_loss.device)


def _time(fn, repeats: int, device: torch.device) -> float:
    for _ in range(5):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = device_name(device)
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| batch | grid | vectorised (ms) | per-sample loop (ms) | speed-up |")
    print("|---|---|---|---|---|")
    g = torch.Generator(device=device).manual_seed(0)
    for batch, grid in [(8, (7, 7, 8)), (2, (14, 14, 16)), (64, (7, 7, 8))]:
        loss = torch.rand(batch, *grid, device=device, generator=g)
        t_vec = _time(lambda loss=loss: anatomask_mask(loss, 0.6, 0.5, generator=g), args.repeats, device)
        t_loop = _time(lambda loss=loss: loop_mask(loss, 0.6, 0.5), args.repeats, device)
        grid_s = "x".join(map(str, grid))
        print(f"| {batch} | {grid_s} | {t_vec * 1e3:.3f} | {t_loop * 1e3:.3f} | {t_loop / t_vec:.1f}x |")


if __name__ == "__main__":
    main()
