"""Run folders and checkpoints: resolved config, code version, JSON-lines metrics, atomic checkpoint files.

A run folder holds ``config.json``, ``version.json``, ``metrics.jsonl`` and ``checkpoints/``. Checkpoints are
written to a temporary file and renamed, so a crash never leaves a half-written file in place of a good one, and
they are read with ``torch.load(..., weights_only=True)``.

The rules for using a folder (``docs/safety.md``) live here, for pretraining and finetuning alike:
:func:`run_lock` (one writer per folder), :func:`prepare_run_folder` (refuse, replace or resume an existing run;
clean what a killed run left) and :func:`check_finite_weights` (nothing non-finite is saved).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from anatomask_lab import __version__
from anatomask_lab.atomic import TMP_GLOB, atomic_write, atomic_write_json
from anatomask_lab.config import config_from_dict
from anatomask_lab.config_args import flat_values
from anatomask_lab.stunet_weights import (
    convert_axes,
    is_stunet_checkpoint,
    read_weights_file,
    resolve_axes,
    stunet_encoder,
)

__all__ = [
    "CHECKPOINT_DIR",
    "LOCK_FILE",
    "RUN_FILES",
    "STOP_FILE",
    "RunFolderError",
    "check_finite_weights",
    "check_out_folder",
    "checkpoint_path",
    "clean_temporaries",
    "has_checkpoint",
    "holds_run",
    "prepare_run_folder",
    "run_lock",
    "truncate_metrics",
    "code_version",
    "encoder_from_state",
    "is_finished",
    "load_student_encoder",
    "load_checkpoint",
    "read_metrics",
    "resumed_config",
    "run_from_cli",
    "save_checkpoint",
    "stopped_note",
    "write_json_atomic",
    "MetricsLog",
]

CHECKPOINT_DIR = "checkpoints"
STOP_FILE = "stopped.json"  # written when a run stops on a signal (anatomask_lab.stopping), removed when it goes on
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT_DIR)  # any of them: the folder holds a run
# what --overwrite removes (nothing else): the run files, and what anatomask_lab.tracking and stopping write
_KIT_FILES = (*RUN_FILES, "version.json", "init_report.json", STOP_FILE, "tensorboard", "wandb", "wandb.json")
LOCK_FILE = ".lock"


class RunFolderError(ValueError):
    """A run folder cannot be used as asked; the message names the folder and the way out."""


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


def load_student_encoder(path: str | Path, axes: str = "auto") -> dict[str, torch.Tensor]:
    """Encoder weights (keys as in ``STUNet.encoder``, kernels in the kit's axis order) of a pretraining run folder,
    checkpoint, export, or STU-Net / nnU-Net checkpoint.

    Args:
        path: a pretraining run folder or its checkpoint (the student's ``encoder.*`` entries are taken), a file
            written by ``anatomask-lab export`` (its ``encoder`` entry, or with ``--naming stunet`` its
            ``conv_blocks_context.*`` weights), or an STU-Net ``.model`` / ``.pth`` file (``state_dict`` or
            ``network_weights``). Read with ``weights_only=True`` (see
            :func:`anatomask_lab.stunet_weights.read_weights_file`).
        axes: the axis order of the file's kernels, see :func:`encoder_from_state`.

    Raises:
        ValueError: the file is none of these.
    """
    file = checkpoint_path(path)
    return encoder_from_state(read_weights_file(file), file, axes)


def encoder_from_state(state: dict[str, Any], source: str | Path = "checkpoint", axes: str = "auto"
                       ) -> dict[str, torch.Tensor]:
    """The encoder weights in a loaded pretraining checkpoint, export or STU-Net checkpoint, in the kit's axis order.

    ``axes`` is the order the kernels are stored in: ``"auto"`` (what the file records; else the kit's (x, y, z)
    for the kit's own files and nnU-Net's file order (z, y, x) for STU-Net ones), ``"kit"`` or ``"stunet"``
    (transposed, see :mod:`anatomask_lab.stunet_weights`).
    """
    if is_stunet_checkpoint(state):
        return stunet_encoder(state, source, axes)
    if isinstance(state.get("student"), dict):
        prefix = "encoder."
        encoder = {k[len(prefix):]: v for k, v in state["student"].items() if k.startswith(prefix)}
    elif isinstance(state.get("encoder"), dict):
        encoder = state["encoder"]
    else:
        raise ValueError(f"{source}: neither a pretraining checkpoint nor an exported encoder nor STU-Net weights "
                         "(no 'student', 'encoder', 'state_dict' or 'network_weights' entry)")
    return convert_axes(encoder, resolve_axes(state, axes, source, default="kit"), "kit")


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


# ----------------------------------------------------------------------------------------------------------------
# using a run folder: one writer, refuse / replace / resume, clean up after a kill, never save non-finite weights
# ----------------------------------------------------------------------------------------------------------------
def has_checkpoint(out: str | Path) -> bool:
    """Whether the run folder ``out`` holds a last checkpoint (what ``--resume`` continues from)."""
    return (Path(out) / CHECKPOINT_DIR / "last.pt").is_file()


def holds_run(out: str | Path) -> bool:
    """Whether ``out`` holds (part of) a run: any of ``config.json``, ``metrics.jsonl``, ``checkpoints/``."""
    return any((Path(out) / name).exists() for name in RUN_FILES)


def check_out_folder(out: str | Path) -> Path:
    """Create the run folder ``out`` (and its parents) or say in one line why it cannot be written.

    Raises:
        RunFolderError: ``out`` is an existing file, or the folder cannot be created or written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out}: an existing file, not a run folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"--out {out}: cannot create the run folder ({exc.strerror or exc})") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {out}: the run folder is not writable")
    return out


@contextlib.contextmanager
def run_lock(out: str | Path, enabled: bool = True) -> Iterator[Path]:
    """Hold ``<out>/.lock`` (``flock``) while writing the run folder; a second writer is refused.

    The kernel releases the lock when the holder dies, so a killed run never blocks the next one. Under DDP only
    rank 0 takes it (``enabled=False`` elsewhere makes this a no-op).

    Raises:
        RunFolderError: another living process holds the lock, or the folder cannot be written.
    """
    out = Path(out)
    if not enabled:
        yield out
        return
    check_out_folder(out)
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise RunFolderError(f"--out {out}: cannot create its lock file ({exc.strerror or exc})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunFolderError(f"--out {out}: another process (pid {holder}) is writing this run folder; wait "
                                 "for it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield out
    finally:
        os.close(fd)  # releases the lock


def clean_temporaries(out: str | Path) -> list[Path]:
    """Remove the temporary checkpoint files a killed writer left in ``<out>/checkpoints``; returns them."""
    stale = sorted((Path(out) / CHECKPOINT_DIR).glob(TMP_GLOB))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def truncate_metrics(out: str | Path, epoch: int, step: int | None = None) -> int:
    """Drop the records of epochs ``>= epoch`` (those after the checkpoint being resumed) and any torn line from
    ``<out>/metrics.jsonl``, rewriting it atomically; returns the number of lines dropped.

    ``step``: the checkpoint was written in the middle of epoch ``epoch`` after this many steps (a run stopped on
    a signal); the step records of that epoch up to ``step`` are kept.
    """
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        if step is not None and record.get("type") == "step" and isinstance(record.get("step"), int):
            if record["step"] <= step:
                keep.append(line)
        elif not (isinstance(record.get("epoch"), int) and record["epoch"] >= epoch):
            keep.append(line)
    if len(keep) != len(lines):
        atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in keep)))
    return len(lines) - len(keep)


def _clear_run(out: Path) -> None:
    """Remove the kit's files of an old run (``--overwrite``); other files in the folder are left alone."""
    for name in _KIT_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def prepare_run_folder(out: str | Path, resume: bool | str = False, overwrite: bool = False, *,
                       main: bool = True) -> dict[str, Any] | None:
    """Apply the run-folder rules before a training loop starts; returns the checkpoint to resume, or None.

    * a folder holding a run (:func:`holds_run`) is refused unless ``resume`` or ``overwrite`` is given;
    * ``overwrite=True`` removes the old run's files (config, version, metrics, init report, checkpoints) first;
    * ``resume=True`` loads ``checkpoints/last.pt`` and drops the metrics records after it (a checkpoint written
      mid-epoch by a run stopped on a signal keeps the step records up to it);
    * ``resume="auto"`` resumes when that checkpoint exists, else starts afresh (replacing a run killed before its
      first checkpoint), for job chains;
    * temporary checkpoint files left by a kill, and the note of a run stopped on a signal (``stopped.json``), are
      removed in every case.

    Call it holding :func:`run_lock`. ``main=False`` (DDP ranks > 0) only reads: it returns the same checkpoint
    rank 0 resumes from and changes nothing.

    Raises:
        RunFolderError: a run is there and neither flag was given, both flags were given, ``--resume`` without a
            checkpoint, or the folder cannot be written.
    """
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume must be False, True or 'auto', got {resume!r}")
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other")
    out = Path(out)
    if main:
        check_out_folder(out)
        clean_temporaries(out)
        (out / STOP_FILE).unlink(missing_ok=True)
    if resume == "auto":
        resume = has_checkpoint(out)
        overwrite = not resume  # a run killed before its first checkpoint starts again
    if resume:
        if not has_checkpoint(out):
            raise RunFolderError(f"--resume: {out} holds no checkpoint ({checkpoint_path(out)}); start the run "
                                 "without --resume")
        state = load_checkpoint(checkpoint_path(out))
        if main:
            truncate_metrics(out, int(state["epoch"]), int(state["step"]) if state.get("partial") else None)
        return state
    if main and holds_run(out):
        if not overwrite:
            found = ", ".join(name for name in RUN_FILES if (out / name).exists())
            raise RunFolderError(f"--out {out} already holds a run ({found}); pass --resume to continue it or "
                                 "--overwrite to replace it")
        _clear_run(out)
    return None


def stopped_note(out: str | Path) -> str:
    """The end of every non-finite error: the run stops and its last good checkpoint is kept."""
    return (f"the run stops here. The last good checkpoint ({checkpoint_path(out)}) is untouched: lower the "
            "learning rate or check the data, then resume.")


def check_finite_weights(modules: dict[str, torch.nn.Module | None], out: str | Path, epoch: int) -> None:
    """Raise unless every floating-point parameter and buffer of ``modules`` is finite (before a checkpoint).

    One fused reduction (the infinity norm of each tensor) and one host sync; meant for checkpoint time only.

    Raises:
        FloatingPointError: naming the first non-finite tensor, the epoch and the checkpoint that is kept.
    """
    named = [(f"{prefix}.{name}", t.detach())
             for prefix, module in modules.items() if module is not None
             for name, t in (*module.named_parameters(), *module.named_buffers())
             if t.is_floating_point() and t.numel()]
    if not named:
        return
    norms = torch._foreach_norm([t for _, t in named], float("inf"))
    if bool(torch.stack([n.float() for n in norms]).isfinite().all()):
        return
    bad = next(name for (name, _), n in zip(named, norms, strict=True) if not torch.isfinite(n))
    raise FloatingPointError(f"non-finite weights ({bad}) after epoch {epoch}; " + stopped_note(out))


def resumed_config(state: dict[str, Any], out: str | Path, cls: type, requested: Any = None, *,
                   main: bool = True) -> Any:
    """The stored configuration of a resumed run (``out_dir`` set to ``out``).

    A ``requested`` configuration that differs is not applied: the fields it would change are named on stderr.
    A finished run (its checkpoint at the configured number of epochs) is announced on stdout.
    """
    cfg = dataclasses.replace(config_from_dict(state["config"], cls), out_dir=str(out))
    if main and requested is not None:
        stored, wanted = flat_values(cfg), flat_values(requested)
        changed = [name for name in stored if name != "out_dir" and stored[name] != wanted[name]]
        if changed:
            print(f"resuming {out} with its stored configuration; ignoring {', '.join(changed)}", file=sys.stderr)
    if main and int(state["epoch"]) >= cfg.epochs:
        print(f"{out}: the run is finished (epoch {state['epoch']} of {cfg.epochs}); nothing to do")
    return cfg


def run_from_cli(args: Any, cls: type, build: Callable[[], Any], run: Callable[..., Path], command: str,
                 main: bool = True) -> Path | None:
    """The training commands' common path through ``--print-config``, ``--resume [auto]`` and ``--overwrite``.

    Resuming (``--resume``, or ``--resume auto`` where ``--out`` has a checkpoint) uses the stored configuration and
    names on stderr the flags that would have changed it; otherwise ``build()`` makes the configuration.

    Returns:
        The run folder, or None when only the configuration was printed.
    """
    from anatomask_lab.config_args import ignored_flags, print_config, require_out

    if args.resume and args.overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other")
    if args.resume is True or (args.resume == "auto" and args.out_dir and has_checkpoint(args.out_dir)):
        state = load_checkpoint(checkpoint_path(require_out(args)), mmap=True)
        stored = resumed_config(state, args.out_dir, cls, main=False)
        if args.print_config:
            print_config(stored)
            return None
        flags = ignored_flags(args, cls, stored, build())
        if flags and main:
            print(f"anatomask-lab {command}: --resume keeps the stored configuration of {args.out_dir}; ignoring "
                  f"{', '.join(flags)}", file=sys.stderr)
        return run(resume=args.resume, overwrite=args.overwrite, out_dir=args.out_dir)
    cfg = build()
    if args.print_config:
        print_config(cfg)
        return None
    require_out(args)
    return run(cfg, resume=args.resume, overwrite=args.overwrite)
