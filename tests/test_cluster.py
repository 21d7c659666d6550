"""Clusters (docs/cluster.md): stopping on SIGTERM/SIGUSR1 with a checkpoint that resumes exactly, job chains with
--resume auto, the SLURM-tasks guard, progress bars in log files, and the job scripts' command lines."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from anatomask_lab import finetune, pretrain
from anatomask_lab.cli import build_parser, main
from anatomask_lab.cluster import LaunchError, dist_info, slurm_tasks
from anatomask_lab.config import config_to_dict, finetune_config, pretrain_config
from anatomask_lab.config_args import config_to_args
from anatomask_lab.progress import progress
from anatomask_lab.runs import STOP_FILE, checkpoint_path, load_checkpoint, read_metrics
from anatomask_lab.stopping import STOP_EXIT_CODE, STOP_SIGNALS, SkipSampler, stop_signals

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "scripts" / "slurm"


def _records(path: Path) -> list[dict]:
    """The complete lines of a metrics file another process may be writing."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point())


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _summary(run: Path) -> list[tuple]:
    return [(r["type"], r["epoch"], r["step"], r["loss"], r.get("val_dice")) for r in read_metrics(run)]


# ----------------------------------------------------------------------------------------------------------------
# stop on a signal, resume exactly, chain with --resume auto
# ----------------------------------------------------------------------------------------------------------------
PRE = dict(patch_size=(32, 32, 32), epochs=2, iters_per_epoch=3, batch_size=1, log_every=1, device="cpu")


def _pretrain_cmd(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "anatomask_lab.cli", "pretrain", "--preset", "tiny", "--data", str(data), "--out",
            str(out), "--patch-size", "32", "32", "32", "--epochs", "2", "--iters-per-epoch", "3", "--batch-size", "1",
            "--log-every", "1", "--device", "cpu", "--workers", "1", "--resume", "auto"]


@pytest.mark.usefixtures("one_thread")
def test_sigterm_mid_epoch_checkpoints_and_resume_auto_finishes_exactly(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # job 1 of a chain: no folder yet, so --resume auto starts the run; a DataLoader worker runs beside it and the
    # signal goes to the whole process group, as SLURM and torchrun send it
    proc = subprocess.Popen(_pretrain_cmd(tiny_dataset, out), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if any(r["type"] == "step" for r in _records(out / "metrics.jsonl")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be signalled: " + proc.stderr.read()[-2000:]
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == STOP_EXIT_CODE, err[-2000:]
    lines = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert len(lines) == 1 and "--resume" in lines[0] and str(checkpoint_path(out)) in lines[0]
    state = load_checkpoint(checkpoint_path(out))
    assert state["epoch"] == 0 and 1 <= state["step"] < 3  # stopped in the middle of the first epoch
    assert state["partial"]["done"] == state["step"] and _finite(state["student"]) and _finite(state["teacher"])
    assert json.loads((out / STOP_FILE).read_text())["signal"] == "SIGTERM"
    assert [r["step"] for r in read_metrics(out, "step")] == list(range(1, state["step"] + 1))

    # job 2 resumes and finishes (a job 3 would find it finished and exit 0: tests/test_safety.py)
    done = subprocess.run(_pretrain_cmd(tiny_dataset, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (out / STOP_FILE).exists()

    # the same weights and metrics as a run that was never stopped
    reference = pretrain.run(pretrain_config("tiny", data_dir=str(tiny_dataset), out_dir=str(tmp_path / "ref"),
                                             quiet=True, workers=0, **PRE))
    final = load_checkpoint(checkpoint_path(out))
    assert final["epoch"] == 2 and final["step"] == 6 and final["partial"] is None
    assert _same_weights(final["student"], load_checkpoint(checkpoint_path(reference))["student"])
    assert _summary(out) == _summary(reference)
    assert [r["epoch"] for r in read_metrics(out, "epoch")] == [0, 1]


FT_ARGS = ["--epochs", "2", "--iters-per-epoch", "2", "--batch-size", "1", "--val-every", "2", "--val-cases", "1",
           "--rotate-scale-p", "0.5", "--device", "cpu", "--quiet"]


@pytest.mark.usefixtures("one_thread")
def test_finetune_sigusr1_stops_after_the_step_and_resumes_exactly(tiny_dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "--preset", "tiny", "--data", str(tiny_dataset), "--out", str(out), *FT_ARGS,
            "--resume", "auto"]
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    real, calls = finetune.train_step, []

    def step_then_signal(*a, **kw):  # the signal arrives while the first step runs
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*a, **kw)

    monkeypatch.setattr(finetune, "train_step", step_then_signal)
    assert main(args) == STOP_EXIT_CODE
    err = capsys.readouterr().err
    assert "stopped by SIGUSR1 after step 1 (in epoch 0, 1 of 2 steps done)" in err and "--resume" in err
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before  # a notebook kernel keeps its handlers
    state = load_checkpoint(checkpoint_path(out))
    assert (state["epoch"], state["step"], state["partial"]["done"]) == (0, 1, 1) and _finite(state["model"])
    assert read_metrics(out) == [] and (out / STOP_FILE).is_file()

    monkeypatch.undo()
    assert main(args) == 0
    reference = finetune.run(finetune_config("tiny", data_dir=str(tiny_dataset), out_dir=str(tmp_path / "ref"),
                                             epochs=2, iters_per_epoch=2, batch_size=1, val_every=2, val_cases=1,
                                             rotate_scale_p=0.5, device="cpu", quiet=True))
    for which in ("last", "best"):
        assert _same_weights(load_checkpoint(checkpoint_path(out, which))["model"],
                             load_checkpoint(checkpoint_path(reference, which))["model"])
    assert _summary(out) == _summary(reference) and len(_summary(out)) == 2
    assert not (out / STOP_FILE).exists()


def test_stop_signals_restore_handlers_and_only_install_in_the_main_thread():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with stop_signals() as request:
        assert request.installed and all(signal.getsignal(s) is request for s in STOP_SIGNALS)
        assert request.agreed() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert request.agreed() == signal.SIGUSR1
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    seen = {}

    def in_thread():
        with stop_signals() as req:
            seen["installed"], seen["handlers"] = req.installed, {s: signal.getsignal(s) for s in STOP_SIGNALS}

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == {"installed": False, "handlers": before}


def test_skip_sampler_skips_once():
    sampler = SkipSampler(range(10))
    sampler.skip = 4
    assert len(sampler) == 6 and list(sampler) == [4, 5, 6, 7, 8, 9]
    assert list(sampler) == list(range(10))  # the next epoch starts at 0
    dist_sampler = torch.utils.data.distributed.DistributedSampler(range(12), num_replicas=2, rank=1, seed=3)
    wrapped = SkipSampler(dist_sampler)
    wrapped.set_epoch(5)
    full = list(wrapped)
    wrapped.skip = 2
    assert list(wrapped) == full[2:] and dist_sampler.epoch == 5


# ----------------------------------------------------------------------------------------------------------------
# several SLURM tasks without torchrun
# ----------------------------------------------------------------------------------------------------------------
def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.usefixtures("one_thread")
def test_slurm_tasks_without_torchrun_are_refused(tiny_dataset, tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    out = tmp_path / "run"
    pre = ["pretrain", "--preset", "tiny", "--data", str(tiny_dataset), "--out", str(out), "--patch-size", "32", "32",
           "32", "--epochs", "1", "--iters-per-epoch", "1", "--batch-size", "1", "--device", "cpu", "--quiet"]
    assert main(pre) == 2
    line = _error_line(capsys)
    assert "SLURM started 4 tasks" in line and "torchrun" in line and "--rdzv_backend c10d" in line
    assert main(["finetune", "--preset", "tiny", "--data", str(tiny_dataset), "--out", str(out), "--quiet"]) == 2
    assert "srun --ntasks 1" in _error_line(capsys)
    with pytest.raises(LaunchError):
        pretrain.run(pretrain_config("tiny", data_dir=str(tiny_dataset), out_dir=str(out)))
    assert not out.exists()  # refused before anything was written

    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # srun --ntasks 1 inside a 4-task allocation: one run
    assert main(pre) == 0 and load_checkpoint(checkpoint_path(out))["epoch"] == 1


def test_dist_info_reads_torchrun_and_slurm():
    assert dist_info("pretrain", {}) == (0, 1, 0)
    assert dist_info("pretrain", {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == (0, 1, 0)
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_NTASKS": "2"}
    assert dist_info("pretrain", torchrun) == (3, 8, 1)  # torchrun under srun, one task per node
    with pytest.raises(LaunchError, match="without torchrun"):
        dist_info("finetune", torchrun, distributed=False)
    assert dist_info("finetune", {"RANK": "0", "WORLD_SIZE": "1"}, distributed=False) == (0, 1, 0)
    with pytest.raises(LaunchError, match="SLURM started 2 tasks"):
        dist_info("pretrain", {"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "8"})
    assert slurm_tasks({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "8"}) == 1


# ----------------------------------------------------------------------------------------------------------------
# progress bars in log files
# ----------------------------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_write_few_whole_lines_to_a_log_file():
    log = io.StringIO()
    for _ in progress(range(20000), desc="cases", file=log, unit="case"):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2  # the start and the end, nothing in between
    assert "0/20000" in lines[0] and "20000/20000" in lines[1]

    log = io.StringIO()
    for _ in progress(range(500), desc="steps", leave=False, file=log):
        pass
    assert log.getvalue() == ""  # a short inner loop adds no line

    log, interval = io.StringIO(), 0.1
    t0 = time.monotonic()
    bar = progress(range(40), desc="slow", file=log, interval=interval)
    for _ in bar:
        time.sleep(0.01)
        bar.set_postfix(loss=1.0)  # tqdm redraws on every postfix; the log gets none of them in between
    elapsed = time.monotonic() - t0
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= elapsed / interval + 2 and "40/40" in lines[-1]
    assert all(line.startswith("slow:") for line in lines)

    terminal = _Terminal()
    for _ in progress(range(3), desc="tty", file=terminal):
        pass
    assert "\r" in terminal.getvalue()  # a terminal keeps tqdm's redrawn bar


# ----------------------------------------------------------------------------------------------------------------
# the job scripts and docs use flags that exist
# ----------------------------------------------------------------------------------------------------------------
SCRIPTS = sorted(p for p in SLURM_DIR.iterdir() if p.suffix in (".sh", ".sbatch"))


def test_scripts_are_valid_bash():
    assert {p.name for p in SCRIPTS} >= {"pretrain_1node.sbatch", "pretrain_multinode.sbatch", "finetune.sbatch",
                                         "papermill.sbatch", "jupyter.sbatch", "chain.sh"}
    for path in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


def _commands(text: str) -> list[list[str]]:
    """Shell command lines (continuations joined) split into words; a word with a shell variable becomes "1"."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for stop in ("||", "&&", ";", "|"):
            if stop in words:
                words = words[: words.index(stop)]
        if "..." not in words:  # an elided example in the docs
            out.append(["1" if "$" in w else w for w in words])
    return out


def _shell_texts() -> list[tuple[str, str]]:
    texts = [(p.name, p.read_text()) for p in SCRIPTS]
    doc = (ROOT / "docs" / "cluster.md").read_text()
    texts += [(f"docs/cluster.md block {i}", block) for i, block in
              enumerate(re.findall(r"```bash\n(.*?)```", doc, flags=re.S))]
    return texts


def test_every_command_line_in_the_scripts_and_docs_parses():
    from torch.distributed.run import get_args_parser

    parser, checked = build_parser(), {"anatomask": 0, "torchrun": 0, "papermill": 0}
    params = _notebook_parameters(ROOT / "notebooks" / "04_pretrain.ipynb")
    for name, text in _shell_texts():
        for words in _commands(text):
            if "anatomask_lab.cli" in words:
                cli = words[words.index("anatomask_lab.cli") + 1:]
            elif "anatomask-lab" in words:
                cli = words[words.index("anatomask-lab") + 1:]
            else:
                cli = None
            if cli is not None:
                args = parser.parse_args(cli)  # SystemExit (a failure) on an unknown flag or bad value
                assert args.command in ("pretrain", "finetune") and args.resume == "auto", (name, cli)
                checked["anatomask"] += 1
            if "torchrun" in words:
                ours = words.index("-m") if "-m" in words else len(words)
                torch_args = words[words.index("torchrun") + 1: ours] + ["-m", "anatomask_lab.cli"]
                ns = get_args_parser().parse_args(_known_to_torchrun(torch_args))
                assert ns.standalone or ns.rdzv_backend == "c10d", (name, torch_args)
                checked["torchrun"] += 1
            if "papermill" in words:
                names = [words[i + 1] for i, w in enumerate(words) if w == "-p"]
                assert names and set(names) <= params, (name, set(names) - params)
                checked["papermill"] += 1
    assert checked["anatomask"] >= 5 and checked["torchrun"] >= 4 and checked["papermill"] >= 2, checked


def _known_to_torchrun(args: list[str]) -> list[str]:
    """``args`` without the signal flags where the installed torchrun predates them (docs/cluster.md says what to
    use instead); torch 2.13, the version CI tests, has both."""
    from torch.distributed.run import get_args_parser

    known = {s for a in get_args_parser()._actions for s in a.option_strings}
    out, skip = [], False
    for word in args:
        if skip:
            skip = False
        elif word in ("--signals-to-handle", "--shutdown-timeout") and word not in known:
            skip = True
        else:
            out.append(word)
    return out


def _notebook_parameters(path: Path) -> set[str]:
    cells = json.loads(path.read_text())["cells"]
    source = "".join(next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))["source"])
    return {line.split("=")[0].strip() for line in source.splitlines() if "=" in line}


def test_training_flags_pass_through_torchrun_unchanged():
    """torchrun's parser sees the whole command line; a flag it takes for an abbreviation of its own would be
    refused or eaten (``--log`` is: hence ``--log-to``, which config_to_args and the notebooks write)."""
    from torch.distributed.run import get_args_parser

    commands = [["pretrain", *config_to_args(pretrain_config("B", log="tensorboard")), "--resume", "auto"],
                ["finetune", *config_to_args(finetune_config("B", log="wandb")), "--resume", "auto"]]
    for cli in commands:
        ns = get_args_parser().parse_args(["--standalone", "--nproc_per_node", "2", "-m", "anatomask_lab.cli", *cli])
        assert ns.training_script_args == cli
        parsed = build_parser().parse_args(cli)
        assert parsed.log == cli[cli.index("--log-to") + 1]
    assert build_parser().parse_args(["pretrain", "--log", "tensorboard"]).log == "tensorboard"
    assert config_to_dict(pretrain_config("tiny"))["log"] == "none"
