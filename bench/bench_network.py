"""Benchmark the MIM network: forward+backward time and peak memory per sparse backend, with the encoder / decoder
split, against the dense network without masking.

Variants:
  dense          STU-Net's dense encoder on the full input (no masking at all) + the same decoder (all visible)
  masked         sparse encoder, backend "masked" (dense conv + re-masking), random mask at --gamma
  spconv         sparse encoder, backend "spconv" (Native on a CPU, implicit GEMM on CUDA)
  spconv-native  (CUDA only) backend "spconv" with our own indice pairs and spconv's Native algorithm

Columns: milliseconds of a training step (forward + loss + backward), split into its encoder part (forward +
backward) and its decoder part (forward + loss + backward), of a no-grad forward (what the EMA teacher costs), and
memory: on CUDA the peak allocated during a step above the parameters and input; on a CPU (no allocator
statistics) the bytes of tensors saved for backward. Times are the best of --repeats, variants interleaved, so
that load from other processes hits them alike. Ratios are relative to ``dense``; below 1 is faster / smaller.

Examples:
  python bench/bench_network.py                               # tiny, 2 x 64^3, CPU, 1 thread: ~30 s
  python bench/bench_network.py --size B --batch 2 --patch 112,112,128 --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from anatomask_lab.masking import random_mask
from anatomask_lab.models import build_mim, mim_loss
from anatomask_lab.models.stunet import STUNetEncoder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _split_step(model, encoder, x, enc_mask, mask_bg, device) -> tuple[float, float]:
    """One training step timed in two parts: encoder forward + backward, decoder forward + loss + backward.

    The features are detached at the encoder / decoder boundary: the decoder runs forward and backward first, then
    its input gradients are back-propagated through the encoder, which is exactly the work of a normal step.
    """
    _sync(device)
    t0 = time.perf_counter()
    feats = encoder(x, enc_mask)
    _sync(device)
    t1 = time.perf_counter()
    feats_in = [f.detach().requires_grad_() for f in feats]
    loss, _ = mim_loss(model.decoder(feats_in, enc_mask), x, mask_bg)
    loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    # stage-0 features feed no decoder block: no gradient
    pairs = [(f, g.grad) for f, g in zip(feats, feats_in, strict=True) if g.grad is not None]
    torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])
    _sync(device)
    t3 = time.perf_counter()
    return (t1 - t0 + t3 - t2) * 1e3, (t2 - t1) * 1e3


def _forward_ms(model, encoder, x, mask_bg, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.decoder(encoder(x, mask_bg), mask_bg)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _memory(fn: Callable[[], None], device: torch.device) -> float:
    """MB: CUDA peak above the current allocation, or bytes saved for backward on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


class _DenseEncoder(torch.nn.Module):
    """The dense STU-Net encoder with the sparse encoder's contract (the mask is ignored)."""

    def __init__(self, sparse):
        super().__init__()
        self.dense = STUNetEncoder(sparse.in_channels, sparse.widths, [len(s) for s in sparse.stages], sparse.strides)
        self.dense.load_state_dict(sparse.state_dict())

    def forward(self, x, mask_bg):
        return self.dense(x)


def bench(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_mim(args.size, decoder=args.decoder).to(device)
    patch = tuple(int(p) for p in args.patch.split(","))
    patch = patch * 3 if len(patch) == 1 else patch
    grid = model.grid(patch)
    x = torch.randn(args.batch, 1, *patch, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    mask = random_mask(args.batch, grid, args.gamma, generator=gen, device=device)
    visible = torch.zeros_like(mask)
    sparse_encoder = model.encoder

    variants = [("dense", _DenseEncoder(sparse_encoder).to(device), visible, None)]
    variants.append(("masked", sparse_encoder, mask, ("masked", "auto")))
    try:
        from anatomask_lab.models.spconv_backend import _spconv

        _spconv()
        variants.append(("spconv", sparse_encoder, mask, ("spconv", "auto")))
        if device.type == "cuda":
            variants.append(("spconv-native", sparse_encoder, mask, ("spconv", "native")))
    except ImportError:
        print("spconv is not installed: its rows are skipped")

    def use(variant):
        _, encoder, m, backend = variant
        if backend is not None:
            encoder.backend, encoder.spconv_algo = backend
        return encoder, m

    def step(variant):
        encoder, m = use(variant)
        loss, _ = mim_loss(model.decoder(encoder(x, m), m), x, mask)  # dense: all visible, same loss patches
        loss.backward()

    times = {v[0]: {"encoder": [], "decoder": [], "forward": []} for v in variants}
    memory = {}
    for variant in variants:  # warm-up (spconv import, allocator, cuDNN autotuning), then a step that measures memory
        if device.type == "cuda":
            step(variant)
        memory[variant[0]] = _memory(lambda variant=variant: step(variant), device)
        model.zero_grad(set_to_none=True)
    for _ in range(args.repeats):  # round-robin, so that load from other processes hits every variant alike
        for variant in variants:
            encoder, m = use(variant)
            enc_ms, dec_ms = _split_step(model, encoder, x, m, mask, device)
            times[variant[0]]["encoder"].append(enc_ms)
            times[variant[0]]["decoder"].append(dec_ms)
            times[variant[0]]["forward"].append(_forward_ms(model, encoder, x, m, device))
            model.zero_grad(set_to_none=True)
    rows = []
    for variant in variants:
        t = {k: min(v) for k, v in times[variant[0]].items()}
        rows.append({"variant": variant[0], "total": t["encoder"] + t["decoder"], **t, "memory": memory[variant[0]]})
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    mem = "peak MB" if device.type == "cuda" else "saved MB"
    print(
        f"MIM network, size={args.size} decoder={args.decoder} batch={args.batch} patch={args.patch} "
        f"gamma={args.gamma} ({where}; best of {args.repeats})"
    )
    head = (
        f"{'variant':<14}{'step ms':>9}{'x':>6}{'enc ms':>9}{'x':>6}{'dec ms':>9}{'x':>6}{'enc %':>7}"
        f"{'fwd ms':>9}{'x':>6}{mem:>10}{'x':>6}"
    )
    print(head)
    print("-" * len(head))
    ref = rows[0]
    for r in rows:
        enc_share = 100 * r["encoder"] / (r["encoder"] + r["decoder"])
        print(
            f"{r['variant']:<14}{r['total']:>9.1f}{r['total'] / ref['total']:>6.2f}{r['encoder']:>9.1f}"
            f"{r['encoder'] / ref['encoder']:>6.2f}{r['decoder']:>9.1f}{r['decoder'] / ref['decoder']:>6.2f}"
            f"{enc_share:>6.0f}%{r['forward']:>9.1f}{r['forward'] / ref['forward']:>6.2f}"
            f"{r['memory']:>10.1f}{r['memory'] / ref['memory']:>6.2f}"
        )
    best = min(rows[1:], key=lambda r: r["total"])
    print(f"fastest sparse backend here: {best['variant']} ({best['total'] / ref['total']:.2f}x dense step time)")


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=None, help="tiny / S / B / L / H (default: B on CUDA, tiny on a CPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", default=None, help="D,H,W or one size (default: 112,112,128 on CUDA, 64)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gamma", type=float, default=0.6)
    parser.add_argument("--decoder", default="hierarchical", choices=["hierarchical", "simple"])
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads: default 1 on a CPU (stable when shared), 0 = torch's"
    )
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    threads = args.threads if args.threads is not None else (0 if on_cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    args.size = args.size or ("B" if on_cuda else "tiny")
    args.patch = args.patch or ("112,112,128" if on_cuda else "64")
    print_table(bench(args), args)


if __name__ == "__main__":
    main()
