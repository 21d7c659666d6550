"""Tracking beside metrics.jsonl: TensorBoard event files, a wandb run (through a stand-in module: no network),
clear errors when a package is missing, and the loss logged as the mean over ranks."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from anatomask_lab import finetune, pretrain
from anatomask_lab.cli import main
from anatomask_lab.cluster import mean_over_ranks
from anatomask_lab.config import finetune_config, pretrain_config
from anatomask_lab.runs import read_metrics
from anatomask_lab.tracking import RunLog, check_backend, record_scalars

pytestmark = pytest.mark.usefixtures("one_thread")


def _pre(data, out, **kw):
    base = dict(data_dir=str(data), out_dir=str(out), patch_size=(32, 32, 32), epochs=2, iters_per_epoch=2,
                batch_size=1, log_every=1, device="cpu", quiet=True)
    return pretrain_config("tiny", **{**base, **kw})


def _scalars(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    if tag is None:
        return set(events.Tags()["scalars"])
    return {e.step: e.value for e in events.Scalars(tag)}


def _expected(run, kind, field):
    return {r["step"]: r[field] for r in read_metrics(run, kind) if r.get(field) is not None}


def test_tensorboard_mirrors_metrics_jsonl(tiny_dataset, tmp_path):
    pytest.importorskip("tensorboard")
    out = pretrain.run(_pre(tiny_dataset, tmp_path / "pre", log="tensorboard"))
    tags = _scalars(out, None)
    assert {"train/loss", "train/teacher_loss", "train/lr", "train/r_t", "train/n_top", "train/n_masked",
            "train/momentum", "epoch/loss", "epoch/lr"} <= tags
    assert not any(t.endswith(("/epoch", "/step", "/time")) for t in tags)
    for kind, prefix in (("step", "train"), ("epoch", "epoch")):
        for field in ("loss", "lr", "r_t"):
            expected = _expected(out, kind, field)
            assert len(expected) == (4 if kind == "step" else 2)
            assert _scalars(out, f"{prefix}/{field}") == pytest.approx(expected, rel=1e-6)
    assert _scalars(out, "train/n_top") == _expected(out, "step", "n_top")
    assert _scalars(out, "train/momentum") == pytest.approx(_expected(out, "step", "momentum"), rel=1e-6)

    pretrain.run(_pre(tiny_dataset, out, log="tensorboard", lr=5e-4), overwrite=True)  # no events of the old run
    assert _scalars(out, "train/loss") == pytest.approx(_expected(out, "step", "loss"), rel=1e-6)
    assert len(list((out / "tensorboard").iterdir())) == 1


def test_finetune_logs_validation_dice(tiny_dataset, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = finetune_config("tiny", data_dir=str(tiny_dataset), out_dir=str(tmp_path / "ft"), epochs=1,
                          iters_per_epoch=1, batch_size=1, val_cases=1, device="cpu", quiet=True, log="tensorboard")
    out = finetune.run(cfg)
    expected = _expected(out, "epoch", "val_dice")
    assert len(expected) == 1 and _scalars(out, "epoch/val_dice") == pytest.approx(expected, rel=1e-6)
    assert _scalars(out, "epoch/loss") == pytest.approx(_expected(out, "epoch", "loss"), rel=1e-6)


def test_a_resumed_log_hides_the_events_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    with RunLog(tmp_path, "tensorboard") as log:
        for step in range(1, 6):
            log.write(type="step", epoch=0, step=step, loss=float(step))
    with RunLog(tmp_path, "tensorboard", resume_step=3) as log:  # resumed from the checkpoint of step 3
        for step in range(4, 7):
            log.write(type="step", epoch=0, step=step, loss=10.0 * step)
    assert _scalars(tmp_path, "train/loss") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0, 6: 60.0}
    assert len(read_metrics(tmp_path)) == 8  # metrics.jsonl itself is truncated by prepare_run_folder, not here


def test_record_scalars_keeps_numbers_only():
    record = {"type": "step", "epoch": 1, "step": 7, "time": 1.0, "loss": 0.5, "teacher_loss": None, "n_top": 3,
              "finite": True, "note": "x"}
    assert record_scalars(record) == {"train/loss": 0.5, "train/n_top": 3.0}
    assert record_scalars({"type": "epoch", "epoch": 0, "step": 2, "val_dice": 0.75}) == {"epoch/val_dice": 0.75}


class _FakeWandb(types.ModuleType):
    """What the kit calls of wandb: ``init(...)`` returning a run with ``log(data, step=)`` and ``finish()``."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class _Run:
            def log(self, data, step):
                fake.logged.append((step, dict(data)))

            def finish(self):
                fake.finished += 1

        return _Run()


def test_wandb_gets_the_same_scalars_and_keeps_its_run_id(tiny_dataset, tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "kit-test")
    out = pretrain.run(_pre(tiny_dataset, tmp_path / "pre", log="wandb", epochs=1))
    (init,) = fake.inits
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    assert init["id"] == run_id and init["resume"] == "allow" and init["project"] == "kit-test"
    assert init["dir"] == str(out) and init["name"] == "pre" and init["config"]["log"] == "wandb"
    assert fake.finished == 1
    losses = {step: data["train/loss"] for step, data in fake.logged if "train/loss" in data}
    assert losses == _expected(out, "step", "loss") and len(losses) == 2
    epoch = [data for step, data in fake.logged if "epoch/loss" in data]
    assert [d["epoch/loss"] for d in epoch] == [r["loss"] for r in read_metrics(out, "epoch")]
    with RunLog(out, "wandb", resume_step=2):  # a resumed run continues the same wandb run
        pass
    assert fake.inits[-1]["id"] == run_id


def test_missing_packages_are_one_line_before_anything_is_written(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    out = tmp_path / "run"
    args = ["pretrain", "--preset", "tiny", "--data", str(tiny_dataset), "--out", str(out), "--quiet"]
    assert main([*args, "--log", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install wandb" in err[0] and "--log wandb" in err[0]
    assert not (out / "config.json").exists()
    assert main(["finetune", "--preset", "tiny", "--data", str(tiny_dataset), "--out", str(out), "--log-to",
                 "wandb", "--quiet"]) == 2
    assert "pip install wandb" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match=r"anatomask-lab\[log\]"):
        check_backend("tensorboard")
    with pytest.raises(ValueError, match="expected one of"):
        check_backend("mlflow")


def test_real_wandb_offline_if_installed(tiny_dataset, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = pretrain.run(_pre(tiny_dataset, tmp_path / "pre", log="wandb", epochs=1))
    assert list((out / "wandb").glob("offline-run-*"))


# ----------------------------------------------------------------------------------------------------------------
# the mean over ranks, with two Gloo processes
# ----------------------------------------------------------------------------------------------------------------
def _mean_worker(rank: int, world: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loss = torch.tensor(1.0 + rank, dtype=torch.float32)  # rank 0: 1, rank 1: 2
        sums = torch.tensor(10.0 * (rank + 1))
        results[rank] = mean_over_ranks([loss, None, sums, 0.5 * rank], world)
    finally:
        dist.destroy_process_group()


def test_mean_over_ranks_with_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_mean_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
        got = dict(results)
    assert got[0] == got[1] == [1.5, None, 15.0, 0.25]
    assert mean_over_ranks([torch.tensor(2.5), None], 1) == [2.5, None]
