"""Pretraining step time: AnatoMask vs SparK side by side, the share of mask generation, peak memory.

AnatoMask pays one extra teacher forward (no gradients) per step; the goal on a GPU is
AnatoMask step / SparK step <= 1.35 with mask generation < 1% of the step. Steps alternate between the two methods
so that both see the same machine state.

    python bench/bench_pretrain.py                       # tiny, 64^3, batch 2 on the CPU
    python bench/bench_pretrain.py --size B --patch 112 112 128 --batch 2 --amp bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from anatomask_lab.config import pretrain_config
from anatomask_lab.masking import anatomask_mask
from anatomask_lab.pretrain import build_models, teacher_patch_loss, train_step
from anatomask_lab.runs import device_name
from anatomask_lab.runtime import autocast_dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--patch", type=int, nargs=3, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--backend", default="masked", choices=["masked", "spconv"])
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=["spark", "anatomask"], choices=["spark", "anatomask"],
                   help="which methods to time (L / H: anatomask alone keeps memory to one student + teacher)")
    args = p.parse_args()
    device = torch.device(args.device)
    patch = tuple(args.patch or ((64, 64, 64) if device.type == "cpu" else (112, 112, 128)))
    preset = args.size if args.size in ("tiny", "S", "B", "L", "H") else "B"
    name = device_name(device)
    print(f"device: {device} ({name}); STU-Net-{args.size}, patch {patch}, batch {args.batch}, backend "
          f"{args.backend}, amp {args.amp}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    x = torch.randn(args.batch, 1, *patch, device=device)
    amp_dtype = autocast_dtype(args.amp, device)
    runs = {}
    for method in args.methods:
        cfg = pretrain_config(preset, method=method, patch_size=patch, backend=args.backend, amp=args.amp,
                              device=str(device))
        student, teacher = build_models(cfg, device)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        gen = torch.Generator(device=device).manual_seed(0)
        runs[method] = (cfg, student, teacher, opt, scaler, gen)

    times: dict[str, list[float]] = {"spark": [], "anatomask": [], "mask": []}
    peak: dict[str, float] = {}
    for i in range(args.warmup + args.steps):
        for method, (cfg, student, teacher, opt, scaler, gen) in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            m = 0.999 if teacher is not None else None
            t = _timed(lambda cfg=cfg, s=student, te=teacher, o=opt, sc=scaler, g=gen, m=m: train_step(
                s, s, te, o, sc, x, cfg=cfg, r_t=0.25, m=m, generator=g, amp_dtype=amp_dtype), device)
            if i >= args.warmup:
                times[method].append(t)
                if device.type == "cuda":
                    peak[method] = max(peak.get(method, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    if "anatomask" not in runs:
        print(f"spark step: {statistics.median(times['spark']) * 1e3:.1f} ms")
        return
    # mask generation alone, on a real teacher ranking
    cfg, student, teacher, _, _, gen = runs["anatomask"]
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss_bg, _, _ = teacher_patch_loss(teacher, x, cfg.masking.gamma, generator=gen)
    for i in range(args.warmup + args.steps * 5):
        t = _timed(lambda: anatomask_mask(loss_bg, cfg.masking.gamma, 0.25, generator=gen), device)
        if i >= args.warmup:
            times["mask"].append(t)

    med = {k: statistics.median(v) for k, v in times.items() if v}
    print("\n| method | step (ms, median) | peak GPU memory (GiB) |")
    print("|---|---|---|")
    for method in args.methods:
        mem = f"{peak[method]:.2f}" if method in peak else "n/a (CPU)"
        print(f"| {method} | {med[method] * 1e3:.1f} | {mem} |")
    if "spark" in med:
        print(f"\nAnatoMask / SparK step time: {med['anatomask'] / med['spark']:.3f} (goal on a GPU: <= 1.35)")
    print(f"mask generation: {med['mask'] * 1e3:.3f} ms = {100 * med['mask'] / med['anatomask']:.3f}% of the "
          f"AnatoMask step (goal < 1%)")
    if device.type == "cpu":
        print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
