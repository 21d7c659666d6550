"""``anatomask-lab bench``: run the benchmark scripts of a checkout's ``bench/`` folder and print their tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["BENCHMARKS", "bench_dir", "run_benchmarks"]

BENCHMARKS = ("masking", "network", "pretrain", "data", "metrics")


def bench_dir() -> Path:
    """The ``bench/`` folder beside the package (present in a checkout / editable install)."""
    folder = Path(__file__).resolve().parents[1] / "bench"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: the benchmarks ship with a checkout of anatomask-lab, "
                                "not with an installed wheel")
    return folder


def run_benchmarks(names=BENCHMARKS, extra: list[str] | None = None) -> int:
    """Run ``bench/bench_<name>.py`` for each name in turn; returns the first non-zero exit code (or 0)."""
    folder = bench_dir()
    code = 0
    for name in names:
        script = folder / f"bench_{name}.py"
        print(f"\n=== {script.name}", flush=True)
        rc = subprocess.run([sys.executable, str(script), *(extra or [])]).returncode
        code = code or rc
    return code


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run the benchmarks (bench/bench_*.py) and print measured tables")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"which benchmarks: {', '.join(BENCHMARKS)} (default: all)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return run_benchmarks(args.names or BENCHMARKS)
