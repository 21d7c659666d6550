"""Processes and ranks: how a training command was launched, and the few collectives its loop needs.

Distributed training is launched by ``torchrun``, which gives every process ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``. A SLURM step that starts several tasks without torchrun would start as many independent runs, all
writing the same run folder; :func:`dist_info` refuses that in one line (``docs/cluster.md`` shows the torchrun
command to use instead: one SLURM task per node, torchrun starts one process per GPU).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "LaunchError",
    "check_same_weights",
    "dist_info",
    "gather_across_ranks",
    "mean_over_ranks",
    "slurm_tasks",
]

TORCHRUN_HINT = ("srun --ntasks-per-node 1 torchrun --nnodes $SLURM_NNODES --nproc_per_node GPUS_PER_NODE "
                 "--rdzv_backend c10d --rdzv_endpoint $HEAD:29500 --rdzv_id $SLURM_JOB_ID -m anatomask_lab.cli")


class LaunchError(ValueError):
    """The command was launched in a way that would start independent copies of one run."""


def slurm_tasks(env: Mapping[str, str] | None = None) -> int:
    """The number of processes SLURM started for this job step (1 outside SLURM).

    ``SLURM_STEP_NUM_TASKS`` (set by ``srun`` in every task of a step) is read first, then ``SLURM_NTASKS`` (also
    set in a batch script whose allocation has several tasks).
    """
    env = os.environ if env is None else env
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        value = env.get(name, "").strip()
        if value:
            try:
                return max(int(value), 1)
            except ValueError:
                return 1
    return 1


def dist_info(command: str, env: Mapping[str, str] | None = None, *,
              distributed: bool = True) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment, ``(0, 1, 0)`` for a single process.

    Args:
        command: the subcommand, for the message (``"pretrain"``).
        env: the environment (default ``os.environ``).
        distributed: whether the command runs data-parallel under torchrun (pretraining); finetuning does not,
            so a torchrun launch with more than one process is refused as well.

    Raises:
        LaunchError: several SLURM tasks without torchrun's variables, or (``distributed=False``) several torchrun
            processes: each would train on its own and write the same run folder.
    """
    env = os.environ if env is None else env
    tasks = slurm_tasks(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        if world > 1 and not distributed:
            raise LaunchError(f"{command} runs in one process, but torchrun started {world}: each would train on "
                              f"its own and write the same run folder; run anatomask-lab {command} without torchrun")
        return rank, world, local
    if tasks > 1:
        how = (f"start one task per node and let torchrun start a process per GPU: {TORCHRUN_HINT} {command} ..."
               if distributed else f"run it as one task (srun --ntasks 1 anatomask-lab {command} ...)")
        raise LaunchError(f"SLURM started {tasks} tasks without torchrun (no RANK/WORLD_SIZE): each would train on "
                          f"its own and write the same run folder; {how} (see docs/cluster.md)")
    return 0, 1, 0


# ----------------------------------------------------------------------------------------------------------------
# collectives of the training loop (no-ops for a single process)
# ----------------------------------------------------------------------------------------------------------------
def mean_over_ranks(values: Sequence[torch.Tensor | float | None], world: int) -> list[float | None]:
    """The mean over all ranks of each value (one ``all_reduce``; every rank must call it with as many values).

    ``None`` entries stay ``None`` (they must be ``None`` on every rank). The values travel as one float64 tensor
    on the device of the first tensor given (CUDA under NCCL), and the result is read once (one host sync).
    """
    present = [i for i, v in enumerate(values) if v is not None]
    out: list[float | None] = [None] * len(values)
    if not present:
        return out
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    stacked = torch.stack([torch.as_tensor(values[i], dtype=torch.float64, device=device).reshape(())
                           for i in present])
    if world > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= world
    for i, v in zip(present, stacked.tolist(), strict=True):
        out[i] = v
    return out


def gather_across_ranks(tensor: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's copy of a small CPU tensor (e.g. a generator state), in rank order (all ranks must call)."""
    own = tensor.cpu()
    if world == 1:
        return [own]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, own)
    return gathered


def check_same_weights(module: torch.nn.Module, what: str) -> None:
    """Raise unless ``module``'s parameters have the same checksum on every rank (all ranks must call).

    Raises:
        RuntimeError: the copies differ (e.g. the EMA teachers of two ranks drifted apart).
    """
    checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1).cpu()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, checksum)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"{what} diverged across ranks: {[float(g) for g in gathered]}")
