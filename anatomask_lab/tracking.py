"""Experiment tracking beside ``metrics.jsonl``: TensorBoard event files or a Weights & Biases run.

``metrics.jsonl`` stays the record of a run (resume, reports and notebooks read it). With ``log="tensorboard"``
(``--log tensorboard``) or ``log="wandb"`` every record written to it is mirrored, field by field, as scalars:
a step record's ``loss`` becomes ``train/loss`` at that step, an epoch record's ``val_dice`` becomes
``epoch/val_dice`` at the step the epoch ended on. The numbers are the same as in ``metrics.jsonl`` (under DDP
the loss there is already the mean over ranks).

* TensorBoard writes to ``<run>/tensorboard/``; a resumed run hides the events logged after its checkpoint
  (``purge_step``), so a curve never shows an interrupted stretch twice.
* wandb logs into ``<run>/wandb/`` under the project ``$WANDB_PROJECT`` (default ``anatomask-lab``); the run id is
  kept in ``<run>/wandb.json`` so that a resumed run continues the same wandb run. ``WANDB_MODE=offline`` works
  as usual.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from anatomask_lab.config import LOG_BACKENDS
from anatomask_lab.runs import MetricsLog, write_json_atomic

__all__ = ["LOG_BACKENDS", "RunLog", "check_backend", "record_scalars"]

TENSORBOARD_DIR = "tensorboard"
WANDB_FILE = "wandb.json"
_NOT_SCALARS = ("type", "epoch", "step", "time")
_INSTALL = {"tensorboard": "pip install 'anatomask-lab[log]' (or pip install tensorboard)",
            "wandb": "pip install wandb"}


def check_backend(backend: str) -> None:
    """Fail early (before a run folder is written) when the backend's package is missing.

    Raises:
        ValueError: an unknown backend, or its package does not import (the message says what to install).
    """
    if backend not in LOG_BACKENDS:
        raise ValueError(f"--log {backend!r}: expected one of {', '.join(LOG_BACKENDS)}")
    if backend == "none":
        return
    module = "torch.utils.tensorboard" if backend == "tensorboard" else "wandb"
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"--log {backend}: the {backend} package is not installed ({exc}); {_INSTALL[backend]}, "
                         "or leave --log at none (metrics.jsonl is written either way)") from exc


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of a ``metrics.jsonl`` record, tagged ``train/<field>`` (step records) or ``<type>/<field>``.

    Numbers only; ``None``, booleans, strings and the record's bookkeeping (``type``, ``epoch``, ``step``,
    ``time``) are left out.
    """
    kind = record.get("type", "record")
    prefix = "train" if kind == "step" else kind
    return {f"{prefix}/{key}": float(value) for key, value in record.items()
            if key not in _NOT_SCALARS and isinstance(value, int | float) and not isinstance(value, bool)}


class _TensorBoard:
    def __init__(self, out: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path, config: dict[str, Any] | None) -> None:
        wandb = importlib.import_module("wandb")
        id_file = out / WANDB_FILE
        run_id = json.loads(id_file.read_text())["id"] if id_file.is_file() else secrets.token_hex(8)
        write_json_atomic(id_file, {"id": run_id})
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "anatomask-lab"), name=out.name, id=run_id,
                              resume="allow", dir=str(out), config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """``metrics.jsonl`` plus the chosen tracker; a no-op on non-zero ranks. Use as a context manager.

    Args:
        out: the run folder.
        backend: one of :data:`LOG_BACKENDS`.
        enabled: False on DDP ranks other than 0.
        resume_step: the step of the checkpoint a resumed run continues from (TensorBoard hides later events).
        config: the run's configuration as a dict (given to wandb).
    """

    def __init__(self, out: str | Path, backend: str = "none", *, enabled: bool = True,
                 resume_step: int | None = None, config: dict[str, Any] | None = None) -> None:
        out = Path(out)
        self.metrics = MetricsLog(out / "metrics.jsonl", enabled=enabled)
        self.tracker: _TensorBoard | _Wandb | None = None
        if enabled and backend != "none":
            check_backend(backend)
            self.tracker = _TensorBoard(out, resume_step) if backend == "tensorboard" else _Wandb(out, config)

    def write(self, **record: Any) -> None:
        """Append ``record`` to ``metrics.jsonl`` and send its scalars to the tracker (at ``record["step"]``)."""
        self.metrics.write(**record)
        if self.tracker is not None and isinstance(record.get("step"), int):
            scalars = record_scalars(record)
            if scalars:
                self.tracker.log(scalars, record["step"])

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
