"""Stopping a training run on a signal, at a step boundary, so that ``--resume`` continues it exactly.

SLURM sends SIGTERM before it pre-empts or cancels a job, and a chosen signal some time before the time limit
(``#SBATCH --signal=USR1@300``). While a run trains, :func:`stop_signals` turns SIGTERM and SIGUSR1 into a request
(a flag; the handler does nothing else). The loop looks at it after every step; under DDP all ranks agree on it
with one tiny all-reduce on a CPU (Gloo) group, so every rank stops after the same step. The loop then writes a
checkpoint of that step (weights, optimiser, random states and the epoch's running sums; a mid-epoch checkpoint
also records how many steps of the epoch are done, and :class:`SkipSampler` skips their batches on resume), writes
``<run>/stopped.json`` and raises :class:`RunStopped`; the command prints one line and exits with
:data:`STOP_EXIT_CODE`. The handlers are installed only in the main thread and restored afterwards (a notebook
kernel keeps its own).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from anatomask_lab.runs import STOP_FILE, checkpoint_path, write_json_atomic

__all__ = [
    "STOP_EXIT_CODE",
    "STOP_SIGNALS",
    "RunStopped",
    "SkipSampler",
    "StopRequest",
    "epoch_sums",
    "ignore_stop_signals",
    "stop_group",
    "stop_run",
    "stop_signals",
    "write_stop_note",
]

#: Exit code of a run stopped on a signal after writing its checkpoint (sysexits' EX_TEMPFAIL: "try again").
STOP_EXIT_CODE = 75
#: The signals that stop a run at the next step boundary.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunStopped(Exception):  # an outcome, not an error
    """A run stopped on a signal after writing its checkpoint; ``--resume`` continues it.

    Attributes:
        out: the run folder.
        signal_name: ``"SIGTERM"`` or ``"SIGUSR1"``.
        epoch: the epoch the run stopped in (the checkpoint's ``epoch``).
        step: the number of optimiser steps taken (the checkpoint's ``step``).
        where: where in the epoch, for the message.
    """

    def __init__(self, out: str | Path, signal_name: str, epoch: int, step: int, where: str = "") -> None:
        self.out, self.signal_name, self.epoch, self.step = Path(out), signal_name, epoch, step
        super().__init__(f"stopped by {signal_name} after step {step}{f' ({where})' if where else ''}; checkpoint "
                         f"{checkpoint_path(out)} written; continue with --resume (or --resume auto)")


class StopRequest:
    """The signal handler and what it recorded: ``signum`` is 0 until SIGTERM or SIGUSR1 arrives."""

    def __init__(self) -> None:
        self.signum = 0
        self.installed = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def agreed(self, group: Any = None) -> int:
        """The signal number any rank received (0: none), the same on every rank; all ranks must call it.

        Args:
            group: the Gloo group of :func:`stop_group` under DDP, None for a single process.
        """
        if group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag)


@contextlib.contextmanager
def stop_signals(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Record ``signals`` in a :class:`StopRequest` while the block runs; the old handlers come back afterwards.

    Outside the main thread (where Python cannot install handlers) the request is returned but never set.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    old = {s: signal.getsignal(s) for s in signals}
    try:
        for s in signals:
            signal.signal(s, request)
        request.installed = True
        yield request
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def stop_group(world: int) -> Any:
    """The group on which ranks agree to stop: None for one process, the default group when it is Gloo, else a
    new Gloo group (a CPU all-reduce, so the check never waits for the GPU). All ranks must call it."""
    if world == 1:
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the training DataLoaders: workers ignore SIGTERM/SIGUSR1 (sent to a whole process group
    by SLURM or torchrun), so that the main process can finish its step and write the checkpoint; they end when
    the main process closes the loader (or dies)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def write_stop_note(out: str | Path, signal_name: str, epoch: int, step: int) -> None:
    """``<run>/stopped.json``: the run stopped on a signal and wants to be resumed (job scripts requeue on it)."""
    write_json_atomic(Path(out) / STOP_FILE, {"signal": signal_name, "epoch": epoch, "step": step,
                                              "time": time.time()})


def stop_run(out: str | Path, signum: int, epoch: int, step: int, where: str, main: bool = True,
             group: Any = None) -> None:
    """End a run after its stop checkpoint is written: the note (rank 0), a barrier, then :class:`RunStopped`.

    Every rank calls it; the barrier keeps a rank from exiting (and torchrun from killing its siblings) before
    rank 0 has written the checkpoint and the note.
    """
    name = signal.Signals(signum).name
    if main:
        write_stop_note(out, name, epoch, step)
    if group is not None:
        dist.barrier(group=group)
    raise RunStopped(out, name, epoch, step, where)


def epoch_sums(partial: dict[str, Any] | None, device: Any) -> tuple[int, Any, Any, float]:
    """``(steps done, loss sum, second loss sum, seconds)`` an epoch starts from: nothing, or the running sums a
    mid-epoch stop checkpoint stored (``partial``: ``done``, ``loss_sum``, ``teacher_loss_sum``, ``seconds``).

    The sums come back as float32 tensors on ``device``, as the loops accumulate them; a float32 value survives
    its trip through a Python float, so a resumed epoch sums exactly as an uninterrupted one.
    """
    if partial is None:
        return 0, None, None, 0.0

    def tensor(value: float | None) -> torch.Tensor | None:
        return None if value is None else torch.tensor(value, dtype=torch.float32, device=device)

    return (int(partial["done"]), tensor(partial.get("loss_sum")), tensor(partial.get("teacher_loss_sum")),
            float(partial.get("seconds", 0.0)))


class SkipSampler(torch.utils.data.Sampler):
    """Indices of ``base`` (a sampler or ``range(len(dataset))``), skipping the first ``skip`` of the next pass.

    A mid-epoch checkpoint records how many batches of its epoch are done; on resume ``skip = done * batch_size``
    makes the loader yield exactly the batches that were still to come (a sample depends only on its index and
    the epoch, see :class:`anatomask_lab.data.sampler.PatchDataset`). Later passes start at 0 again.
    """

    def __init__(self, base: Any) -> None:
        self.base = base
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base) - self.skip

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        for i, index in enumerate(self.base):
            if i >= skip:
                yield index
