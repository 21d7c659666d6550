"""A stop signal seen by one DDP rank stops every rank after the same step; torchrun resumes the run to the end,
and the TensorBoard copy of the logged (rank-mean) losses equals metrics.jsonl."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anatomask_lab.runs import STOP_FILE, checkpoint_path, load_checkpoint, read_metrics

pytest.importorskip("tensorboard")


def _cmd(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "anatomask_lab.cli", "pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out),
            "--patch-size", "32", "32", "32", "--epochs", "1", "--iters-per-epoch", "4", "--batch-size", "1",
            "--device", "cpu", "--log-every", "1", "--resume", "auto", "--log-to", "tensorboard"]


def _rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The pid of the worker with ``RANK=rank`` started by this torchrun (its environment names the agent's run)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = environ.read_bytes().split(b"\0")
            parent = int(Path(environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in variables and parent == torchrun_pid:
            return int(environ.parent.name)
    return None


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_all_ranks_at_the_same_step(tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd(tiny_dataset, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline, pid = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None:
            lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
            if any('"type": "step"' in line for line in lines):
                pid = _rank_pid(proc.pid, 1)
                break
            time.sleep(0.02)
        assert pid is not None, "no step was logged, or rank 1 was not found: " + (proc.stderr.read()[-3000:]
                                                                                   if proc.poll() is not None else "")
        os.kill(pid, signal.SIGUSR1)  # rank 1 only
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0  # torchrun reports its workers' exit code 75 as a failure
    assert re.search(r"exitcode\s*:\s*75", err), err[-3000:]  # the workers stopped cleanly
    assert err.count("stopped by SIGUSR1") == 1  # rank 0 reports for both
    state = load_checkpoint(checkpoint_path(out))
    assert state["epoch"] == 0 and 1 <= state["step"] < 4 and state["partial"]["done"] == state["step"]
    assert len(state["mask_rng"]) == 2  # gathered from both ranks at the same step
    assert json.loads((out / STOP_FILE).read_text())["step"] == state["step"]

    done = subprocess.run(_cmd(tiny_dataset, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = read_metrics(out, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and len(read_metrics(out, "epoch")) == 1
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in steps}, rel=1e-6)  # each step once
