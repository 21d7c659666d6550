"""Safe runs (docs/safety.md): no run is overwritten or mixed unless asked, outputs never replace inputs, nothing
non-finite is saved, a kill leaves nothing behind, files follow the umask, and user errors are one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from anatomask_lab import finetune, pretrain
from anatomask_lab.cli import main
from anatomask_lab.config import config_to_dict, finetune_config, pretrain_config
from anatomask_lab.runs import (
    RunFolderError,
    checkpoint_path,
    load_checkpoint,
    read_metrics,
    run_lock,
    save_checkpoint,
)

PATCH = ("32", "32", "32")


def _pretrain_args(data, out, *extra):
    return ["pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out), "--patch-size", *PATCH,
            "--epochs", "1", "--iters-per-epoch", "1", "--batch-size", "1", "--device", "cpu", "--quiet", *extra]


def _pretrain_cfg(data, out, **kw):
    base = dict(data_dir=str(data), out_dir=str(out), patch_size=(32, 32, 32), epochs=1, iters_per_epoch=1,
                batch_size=1, device="cpu", quiet=True)
    return pretrain_config("tiny", **{**base, **kw})


def _error_line(capsys) -> str:
    """The one stderr line of a refused command (no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("anatomask-lab ")
    return lines[0]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# never overwrite or mix a run without being asked
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_existing_run_is_refused_and_overwrite_replaces_it(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_pretrain_args(tiny_dataset, out)) == 0
    first = read_metrics(out)
    ckpt = checkpoint_path(out)
    digest = _digest(ckpt)
    capsys.readouterr()
    assert main(_pretrain_args(tiny_dataset, out, "--lr", "0.001")) == 2
    line = _error_line(capsys)
    assert "--resume" in line and "--overwrite" in line and str(out) in line
    assert _digest(ckpt) == digest and read_metrics(out) == first
    assert main(_pretrain_args(tiny_dataset, out, "--overwrite", "--lr", "0.001")) == 0
    second = read_metrics(out)
    assert len(second) == len(first) and min(r["time"] for r in second) > max(r["time"] for r in first)
    assert json.loads((out / "config.json").read_text())["lr"] == 0.001
    assert main(_pretrain_args(tiny_dataset, out, "--resume", "--overwrite")) == 2
    assert "exclude each other" in _error_line(capsys)


@pytest.mark.parametrize("leftover", ["config.json", "metrics.jsonl", "checkpoints"])
def test_api_refuses_any_part_of_a_run(tiny_dataset, tmp_path, leftover):
    out = tmp_path / "run"
    out.mkdir()
    (out / leftover).mkdir() if leftover == "checkpoints" else (out / leftover).write_text("{}\n")
    with pytest.raises(RunFolderError, match="--overwrite"):
        pretrain.run(_pretrain_cfg(tiny_dataset, out))
    with pytest.raises(RunFolderError, match="--overwrite"):
        finetune.run(finetune_config("tiny", data_dir=str(tiny_dataset), out_dir=str(out), quiet=True))
    assert (out / leftover).exists()


def test_a_second_writer_is_refused_and_a_stale_lock_does_not_block(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    with run_lock(out):  # another open file description: refused like another process
        assert main(_pretrain_args(tiny_dataset, out)) == 2
        assert "another process" in _error_line(capsys)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom anatomask_lab.runs import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"pid {holder.pid}"):
            with run_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(out):  # the kernel released the dead holder's lock
        pass


@pytest.mark.usefixtures("one_thread")
def test_resume_auto_ignored_flags_and_finished_runs(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}\n")  # killed before its first checkpoint: auto starts afresh
    assert main(_pretrain_args(tiny_dataset, out, "--resume", "auto")) == 0
    assert load_checkpoint(checkpoint_path(out))["epoch"] == 1
    capsys.readouterr()
    assert main(_pretrain_args(tiny_dataset, out, "--resume", "auto", "--lr", "0.5")) == 0
    captured = capsys.readouterr()
    assert "finished" in captured.out
    ignored = [line for line in captured.err.splitlines() if "ignoring" in line]
    assert len(ignored) == 1 and "--lr" in ignored[0] and "--epochs" not in ignored[0] and "--data" not in ignored[0]
    assert pretrain.run(_pretrain_cfg(tiny_dataset, out), resume="auto") == out  # what notebooks call
    assert len(read_metrics(out, "epoch")) == 1


@pytest.mark.usefixtures("one_thread")
def test_resume_cleans_temporaries_and_does_not_duplicate_epochs(tiny_dataset, tmp_path):
    out = pretrain.run(_pretrain_cfg(tiny_dataset, tmp_path / "run"))
    ckpt = checkpoint_path(out)
    state = load_checkpoint(ckpt)
    state["config"]["epochs"] = 2
    torch.save(state, ckpt)
    stale = ckpt.parent / f".last.pt.tmp-{os.getpid()}-0badcafe.pt"
    stale.write_bytes(b"half a checkpoint")
    with (out / "metrics.jsonl").open("a") as f:  # a kill after logging epoch 1, before its checkpoint
        f.write(json.dumps({"type": "epoch", "epoch": 1, "loss": 1.0}) + "\n" + '{"type": "st')
    pretrain.run(resume=True, out_dir=str(out))
    assert not stale.exists()
    assert [r["epoch"] for r in read_metrics(out, "epoch")] == [0, 1]
    assert load_checkpoint(ckpt)["epoch"] == 2


def test_outputs_never_replace_inputs(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "pre"
    save_checkpoint(checkpoint_path(run), {"student": {}, "config": {}, "epoch": 1})
    digest = _digest(checkpoint_path(run))
    assert main(["finetune", "--preset", "tiny", "--data", str(tiny_dataset), "--init", str(run), "--out",
                 str(run), "--overwrite", "--quiet"]) == 2
    assert "--init" in _error_line(capsys) and _digest(checkpoint_path(run)) == digest
    with pytest.raises(RunFolderError, match="--init"):
        finetune.run(finetune_config("tiny", data_dir=str(tiny_dataset), out_dir=str(run),
                                     init=str(checkpoint_path(run)), quiet=True), overwrite=True)
    for ckpt, out in ((checkpoint_path(run), checkpoint_path(run)), (run, checkpoint_path(run))):
        assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 2
        assert "--ckpt" in _error_line(capsys) and _digest(checkpoint_path(run)) == digest
    pred = tmp_path / "pred"
    pred.mkdir()
    (tmp_path / "link").symlink_to(pred)
    for reference in (pred, tmp_path / "link", pred / ".." / "pred"):
        assert main(["predict", "--model", str(run), "--data", str(tiny_dataset), "--out", str(pred),
                     "--reference", str(reference)]) == 2
        assert "--reference" in _error_line(capsys)


# ----------------------------------------------------------------------------------------------------------------
# never save a broken model
# ----------------------------------------------------------------------------------------------------------------
def _poison_after(module, monkeypatch, calls: int) -> None:
    """Make the loop's optimiser step write NaN into the weights from its ``calls``-th call on (the loss stays
    finite: it was computed before the step)."""
    real, count = module.optimizer_step, [0]

    def step(loss, optimizer, scaler, params, grad_clip):
        real(loss, optimizer, scaler, params, grad_clip)
        count[0] += 1
        if count[0] >= calls:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))

    monkeypatch.setattr(module, "optimizer_step", step)


@pytest.mark.usefixtures("one_thread")
def test_pretraining_never_saves_non_finite_weights(tiny_dataset, tmp_path, monkeypatch, capsys):
    _poison_after(pretrain, monkeypatch, calls=1)
    out = tmp_path / "fresh"
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        pretrain.run(_pretrain_cfg(tiny_dataset, out))
    assert not checkpoint_path(out).exists()
    monkeypatch.undo()
    _poison_after(pretrain, monkeypatch, calls=2)
    out = tmp_path / "run"
    assert main(_pretrain_args(tiny_dataset, out, "--epochs", "2", "--ckpt-every", "1")) == 2
    line = _error_line(capsys)
    assert "non-finite weights" in line and "untouched" in line
    state = load_checkpoint(checkpoint_path(out))
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["student"].values()
                                       if t.is_floating_point())


@pytest.mark.usefixtures("one_thread")
def test_finetuning_never_saves_non_finite_weights(tiny_dataset, tmp_path, monkeypatch):
    _poison_after(finetune, monkeypatch, calls=2)
    cfg = finetune_config("tiny", data_dir=str(tiny_dataset), out_dir=str(tmp_path / "ft"), epochs=2,
                          iters_per_epoch=1, batch_size=1, val_every=5, val_cases=1, ckpt_every=1, quiet=True,
                          device="cpu")
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        finetune.run(cfg)
    for which in ("last", "best"):
        path = checkpoint_path(cfg.out_dir, which)
        if path.exists():
            state = load_checkpoint(path)
            assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values()
                                               if t.is_floating_point())
    assert load_checkpoint(checkpoint_path(cfg.out_dir))["epoch"] == 1


# ----------------------------------------------------------------------------------------------------------------
# processes and paths
# ----------------------------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        found = []
        for stat_file in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat_file.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(stat_file.parent.name))
            except (OSError, ValueError, IndexError):
                pass
        return found
    except Exception:  # the process is gone
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killing_prepare_leaves_no_worker(phantom_release, tmp_path, sig):
    cmd = [sys.executable, "-m", "anatomask_lab.cli", "prepare", "totalsegmentator", "--src", str(phantom_release),
           "--out", str(tmp_path / "out"), "--workers", "2", "--spacing", "1", "--classes", "liver",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(workers) < 2:
        workers = _children(proc.pid)
        time.sleep(0.05)
    assert proc.poll() is None and len(workers) >= 2, "the preparation ended before its workers could be seen"
    time.sleep(0.5)  # the workers are busy with their first cases
    proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.time() + 5
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)]


def _group_writable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IWGRP)


@pytest.mark.usefixtures("one_thread")
def test_files_and_folders_follow_the_umask(phantom_release, tmp_path):
    from anatomask_lab.data.prepare import totalsegmentator

    release = tmp_path / "release"
    release.mkdir()
    shutil.copytree(phantom_release / "s0000", release / "s0000")
    shutil.copytree(phantom_release / "s0001", release / "s0001")
    old = os.umask(0o002)
    try:
        data = totalsegmentator.prepare(release, tmp_path / "data" / "prepared", classes=["liver"],
                                        spacing=(4.0, 4.0, 4.0), workers=1, progress=False)
        out = pretrain.run(_pretrain_cfg(data, tmp_path / "runs" / "r"))
    finally:
        os.umask(old)
    paths = [data.parent, data, data / "cases", data / "cases" / "s0000", data / "cases" / "s0000" / "image.npy",
             data / "dataset.json", data / "prepare.json", out.parent, out, out / "checkpoints",
             checkpoint_path(out), out / "config.json", out / "metrics.jsonl", out / ".lock"]
    assert [p for p in paths if not _group_writable(p)] == []


# ----------------------------------------------------------------------------------------------------------------
# messages, not tracebacks
# ----------------------------------------------------------------------------------------------------------------
def _one_subject_release(phantom_release, root: Path) -> Path:
    root.mkdir()
    shutil.copytree(phantom_release / "s0000", root / "s0000")
    return root


def _prepare_args(src, out):
    return ["prepare", "totalsegmentator", "--src", str(src), "--out", str(out), "--workers", "1", "--spacing",
            "4", "--classes", "liver", "--no-progress"]


def test_singular_affine_and_unreadable_case_are_one_line(phantom_release, tmp_path, capsys):
    src = _one_subject_release(phantom_release, tmp_path / "singular")
    ct = src / "s0000" / "ct.nii.gz"
    img = nib.load(ct)
    header = img.header.copy()  # a flat z axis, written into the header (nibabel will not build such an image)
    header.set_qform(None, code=0)
    header.set_sform(None, code=1)
    header["srow_z"] = [0, 0, 0, 0]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header=header), ct)
    assert main(_prepare_args(src, tmp_path / "o1")) == 2
    line = _error_line(capsys)
    assert "singular affine" in line and str(ct) in line

    src = _one_subject_release(phantom_release, tmp_path / "broken")
    shutil.copytree(src / "s0000", src / "s0001")
    (src / "s0001" / "ct.nii.gz").unlink()
    (src / "s0001" / "ct.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    assert main(_prepare_args(src, tmp_path / "o2")) == 2
    assert str(src / "s0001" / "ct.nii.gz") in _error_line(capsys)


def test_bad_out_folders_are_one_line(tiny_dataset, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a folder")
    assert main(_pretrain_args(tiny_dataset, file)) == 2
    assert "existing file" in _error_line(capsys)
    assert main(_pretrain_args(tiny_dataset, file / "sub")) == 2
    assert str(file / "sub") in _error_line(capsys)
    assert main(["finetune", "--preset", "tiny", "--data", str(tiny_dataset), "--out", str(file), "--quiet"]) == 2
    assert "existing file" in _error_line(capsys)


def _label_map(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def test_evaluate_refuses_bad_predictions_in_one_line(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    labels = np.zeros((8, 8, 8), np.int32)
    labels[2:5, 2:5, 2:5] = 1
    _label_map(gt / "a.nii.gz", labels)
    good = _label_map(tmp_path / "good.nii.gz", labels).read_bytes()
    (pred / "a.nii.gz").write_bytes(good[: len(good) // 2])  # truncated
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--quiet"]) == 2
    assert str(pred / "a.nii.gz") in _error_line(capsys)
    (pred / "a.nii.gz").write_text("not an image")
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--quiet"]) == 2
    assert str(pred / "a.nii.gz") in _error_line(capsys)
    huge = labels.copy()
    huge[0, 0, 0] = 2_000_000_000  # would allocate gigabytes per label
    _label_map(pred / "a.nii.gz", huge)
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--quiet"]) == 2
    assert "2000000000" in _error_line(capsys)
    table = tmp_path / "labels.json"
    table.write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    huge[0, 0, 0] = 7
    _label_map(pred / "a.nii.gz", huge)
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--labels", str(table), "--quiet"]) == 2
    assert "labels [7] outside the class table [1]" in _error_line(capsys)
    table.write_text("{labels: ")
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--labels", str(table), "--quiet"]) == 2
    assert str(table) in _error_line(capsys)


def _fake_segmenter(path: Path) -> Path:
    model = finetune.build_segmenter("tiny", 1, 6, deep_supervision=False)
    save_checkpoint(path, {"model": model.state_dict(), "config": config_to_dict(finetune_config("tiny")),
                           "in_channels": 1, "num_classes": 6, "epoch": 1})
    return path


def test_predict_flags_and_relative_sources_are_one_line(tiny_dataset, tmp_path, capsys, monkeypatch):
    model = _fake_segmenter(tmp_path / "model.pt")
    args = ["predict", "--model", str(model), "--data", str(tiny_dataset), "--out", str(tmp_path / "p"), "--quiet"]
    assert main([*args, "--split", "foo"]) == 2
    assert "foo" in _error_line(capsys)
    assert main([*args, "--device", "foo"]) == 2
    assert "--device" in _error_line(capsys)
    assert main(["finetune", "--preset", "tiny", "--patch-size", "32", "32", "32", "--print-config"]) == 2
    assert "patch_size" in _error_line(capsys)

    meta = json.loads((tiny_dataset / "cases" / "s0000" / "meta.json").read_text())
    assert all(Path(p).is_absolute() for p in meta["source"]["images"]) and meta["source"]["cwd"]
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    from anatomask_lab.data.dataset import DatasetInfo

    case = DatasetInfo.read(data).split("test")[0]
    meta_file = data / "cases" / case / "meta.json"
    meta = json.loads(meta_file.read_text())
    root = Path(meta["source"]["images"][0]).parent.parent
    monkeypatch.chdir(root)
    relative = {**meta["source"], "images": [os.path.relpath(p, root) for p in meta["source"]["images"]],
                "mask_files": {n: os.path.relpath(p, root) for n, p in meta["source"]["mask_files"].items()}}
    relative.pop("cwd", None)
    meta_file.write_text(json.dumps({**meta, "source": relative}))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "p"), "--quiet",
                 "--device", "cpu", "--reference", str(tmp_path / "ref")]) == 2
    assert str(meta_file) in _error_line(capsys)
    meta_file.write_text(json.dumps({**meta, "source": {**relative, "cwd": str(root)}}))
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "p"), "--quiet",
                 "--device", "cpu", "--reference", str(tmp_path / "ref")]) == 0
    assert (tmp_path / "ref" / f"{case}.nii.gz").is_file()


def test_debug_shows_the_traceback(tiny_dataset, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(RunFolderError):
        main(["--debug", *_pretrain_args(tiny_dataset, file)])


def test_prepare_from_another_source_prepares_the_changed_cases_again(tmp_path):
    from anatomask_lab.data.phantom import generate_cohort
    from anatomask_lab.data.prepare import totalsegmentator

    kw = dict(shape=(40, 40, 32), spacing=(6.0, 6.0, 7.5), workers=1, progress=False)
    first, second = tmp_path / "a", tmp_path / "b"
    generate_cohort(first, 3, seed=0, **kw)
    generate_cohort(second, 3, seed=5, **kw)
    out = tmp_path / "prepared"
    prep = dict(classes=["liver", "spleen"], spacing=(6.0, 6.0, 6.0), workers=1, progress=False)
    totalsegmentator.prepare(first, out, **prep)
    case = sorted((out / "cases").iterdir())[0]
    before = np.load(case / "image.npy")
    totalsegmentator.prepare(first, out, **prep)  # same sources: reused as they are
    assert np.array_equal(np.load(case / "image.npy"), before)
    totalsegmentator.prepare(second, out, **prep)  # same case ids, other files: prepared again
    meta = json.loads((case / "meta.json").read_text())
    assert meta["source"]["images"][0].startswith(str(second.resolve()))
    assert not np.array_equal(np.load(case / "image.npy"), before)
    fresh = tmp_path / "fresh"
    totalsegmentator.prepare(second, fresh, **prep)
    assert np.array_equal(np.load(case / "image.npy"), np.load(fresh / "cases" / case.name / "image.npy"))


def test_an_extra_structure_file_is_named(tmp_path, capsys):
    from anatomask_lab.data.phantom import generate_cohort

    release = tmp_path / "release"
    generate_cohort(release, 2, seed=0, shape=(40, 40, 32), spacing=(6.0, 6.0, 7.5), workers=1, progress=False)
    extra = sorted(p for p in release.iterdir() if p.is_dir())[1] / "segmentations" / "extra_thing.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), extra)
    for more in ([], ["--version", "v2"]):
        code = main(["prepare", "totalsegmentator", "--src", str(release), "--out", str(tmp_path / "out"),
                     "--spacing", "6", "--workers", "1", *more])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and str(extra) in err and "extra_thing" in err
