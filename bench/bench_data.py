"""Patches per second from memory-mapped arrays, with 1 and 2 DataLoader workers, against a GPU step rate.

Without ``--data`` it first writes a small phantom cohort (128^3 voxels, 1.5 x 1.5 x 2.5 mm) and prepares it at
1.5 mm isotropic in a temporary folder (about half a minute on 2 cores, not timed).

    python bench/bench_data.py [--data PREPARED_DIR] [--patch 112 112 128] [--batch 2] [--batches 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from anatomask_lab.data.phantom import generate_cohort
from anatomask_lab.data.prepare import preparer
from anatomask_lab.data.sampler import PatchDataset

# Estimate, to be replaced by bench_pretrain's measured GPU figure: one STU-Net-B AnatoMask step (teacher forward +
# student forward/backward) at batch 2 and 112x112x128 runs at a few steps per second on an H100.
GPU_STEPS_PER_S_ESTIMATE = 3.0


def _prepared(tmp: Path) -> Path:
    generate_cohort(tmp / "raw", 6, seed=0, progress=False)
    return preparer("totalsegmentator").prepare(tmp / "raw", tmp / "prep", classes="phantom", progress=False)


def _rate(ds: PatchDataset, workers: int, batch: int, batches: int) -> float:
    ds.set_epoch(0)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # worker start-up and first map opening are not timed
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["image"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="prepared dataset folder (default: phantom)")
    parser.add_argument("--patch", type=int, nargs=3, default=(112, 112, 128))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=(1, 2))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or _prepared(Path(tmp))
        n = (args.batches + 1) * args.batch
        ds = PatchDataset(data, split="all", patch_size=args.patch, with_label=True, fg_oversample=0.33,
                          samples_per_epoch=n)
        need = GPU_STEPS_PER_S_ESTIMATE * args.batch
        print(f"cpu: {platform.processor() or 'cpu'} ({os.cpu_count()} cores), torch {torch.__version__}")
        print(f"patch {'x'.join(map(str, args.patch))}, batch {args.batch}, {len(ds.case_ids)} cases, "
              f"memory-mapped from {data}")
        print(f"GPU demand (estimate): {GPU_STEPS_PER_S_ESTIMATE} steps/s x batch {args.batch} = {need:.1f} patches/s")
        print("| workers | patches/s | x GPU demand |")
        print("|---|---|---|")
        for w in args.workers:
            rate = _rate(ds, w, args.batch, args.batches)
            print(f"| {w} | {rate:.1f} | {rate / need:.1f} |")


if __name__ == "__main__":
    main()
