"""Run folders and checkpoints: resolved config, code version, JSON-lines metrics, atomic checkpoint files.

A run folder holds ``config.json``, ``version.json``, ``metrics.jsonl`` and ``checkpoints/``. Checkpoints are
written to a temporary file and renamed, so a crash never leaves a half-written file in place of a good one, and
they are read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from anatomask_lab import __version__
from anatomask_lab.atomic import atomic_write, atomic_write_json

__all__ = [
    "CHECKPOINT_DIR",
    "checkpoint_path",
    "code_version",
    "encoder_from_state",
    "is_finished",
    "load_student_encoder",
    "load_checkpoint",
    "read_metrics",
    "save_checkpoint",
    "write_json_atomic",
    "MetricsLog",
]

CHECKPOINT_DIR = "checkpoints"


def code_version() -> dict[str, Any]:
    """Package version, git commit (when run from a checkout), torch and Python versions."""
    info: dict[str, Any] = {
        "anatomask_lab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        info["git_commit"] = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True, timeout=5
        )
        info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def device_name(device: torch.device | str = "cpu") -> str:
    """Human-readable name of a device for benchmark tables: the GPU's name, or the CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (see :mod:`anatomask_lab.atomic`)."""
    atomic_write_json(path, obj)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, plain containers and numbers only) atomically."""
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
                    ) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    ``mmap=True`` maps the tensors instead of reading them (cheap for reading a few entries of a large file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # corrupt or foreign file
        raise ValueError(f"{path}: not a readable anatomask-lab checkpoint ({exc})") from exc


def checkpoint_path(run_or_file: str | Path, which: str = "last") -> Path:
    """The checkpoint file of a run folder (``<run>/checkpoints/<which>.pt``), or ``run_or_file`` if it is a file.

    Args:
        run_or_file: a run folder or a checkpoint file.
        which: ``"last"`` (written every ``ckpt_every`` epochs) or ``"best"`` (finetuning: best validation Dice).
    """
    path = Path(run_or_file)
    if path.is_file():
        return path
    return path / CHECKPOINT_DIR / f"{which}.pt"


def is_finished(run: str | Path) -> bool:
    """True when the run folder's last checkpoint has reached the configured number of epochs."""
    path = checkpoint_path(run)
    if not path.is_file():
        return False
    state = load_checkpoint(path, mmap=True)
    return int(state["epoch"]) >= int(state["config"]["epochs"])


def load_student_encoder(path: str | Path) -> dict[str, torch.Tensor]:
    """Encoder weights (keys as in ``STUNet.encoder``) of a pretraining run folder, checkpoint or export.

    Args:
        path: a pretraining run folder or its checkpoint (the student's ``encoder.*`` entries are taken), or a file
            written by ``anatomask-lab export`` (its ``encoder`` entry).

    Raises:
        ValueError: the file is neither.
    """
    file = checkpoint_path(path)
    return encoder_from_state(load_checkpoint(file), file)


def encoder_from_state(state: dict[str, Any], source: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The encoder weights in a loaded pretraining checkpoint or export (see :func:`load_student_encoder`)."""
    if isinstance(state.get("student"), dict):
        prefix = "encoder."
        return {k[len(prefix):]: v for k, v in state["student"].items() if k.startswith(prefix)}
    if isinstance(state.get("encoder"), dict):
        return state["encoder"]
    raise ValueError(f"{source}: neither a pretraining checkpoint nor an exported encoder")


class MetricsLog:
    """Append-only JSON-lines log; a no-op on non-zero ranks."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of a run's ``metrics.jsonl`` (optionally only those of one ``type``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("type") == kind]
