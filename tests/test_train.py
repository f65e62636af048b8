"""train(): it learns, it overfits a batch, it stops on divergence/early stopping, it logs to
TensorBoard, it resumes exactly, and its checkpoints round-trip (and refuse pickles)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import (
    CheckpointError,
    build_from_checkpoint,
    check_compatible,
    load_checkpoint,
    load_state,
    save_checkpoint,
)
from training.inference import evaluate
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    pass


def _stopped_after_two_then_resumed(cfg, data, folder):
    """Train `cfg` into folder, stopped after epoch 2 by raising from the reporter (as an interrupted
    run stops), then resumed from its last.pt; returns the resumed run's result."""
    def stop_after_two(m, _):
        if m["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg, data, reporter=stop_after_two, out_dir=folder)
    return train(cfg, data, out_dir=folder, resume=folder / "last.pt")


def test_learns_on_small_data(digits_data, tiny_config):
    result = train({**tiny_config, "epochs": 8}, digits_data)
    losses = [m["train_loss"] for m in result.history]
    assert losses[-1] < 0.6 * losses[0]
    assert result.best_val_acc > 0.6  # chance is 0.1
    assert result.epochs_run == 8 and not result.diverged
    m = result.history[-1]
    assert set(m) >= {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_sec"}


def test_each_epoch_reports_where_its_time_went(digits_data, tiny_config, tmp_path):
    """The search's time budget (benchmarks.search) is built from these: start-up with a run's first
    epoch only, validation and checkpoint-save seconds with every epoch."""
    reported = []
    train({**tiny_config, "epochs": 2}, digits_data, reporter=lambda m, _path: reported.append(dict(m)),
          out_dir=tmp_path)
    first, second = reported
    assert first["setup_seconds"] > 0 and first["capture_seconds"] is None  # no CUDA graph on the CPU
    assert "setup_seconds" not in second and "capture_seconds" not in second
    for m in reported:
        assert 0 < m["eval_seconds"] < m["epoch_seconds"] and m["save_seconds"] > 0


def test_overfits_one_batch(digits_data, tiny_config):
    one = dataclasses.replace(digits_data, train_x=digits_data.train_x[:32], train_y=digits_data.train_y[:32])
    cfg = {**tiny_config, "epochs": 60, "aug_strength": 0, "dropout": 0, "label_smoothing": 0,
           "weight_decay": 0, "optimizer": "adam", "lr": 3e-3}
    result = train(cfg, one)
    last = result.history[-1]
    assert last["train_acc"] == 1.0 and last["train_loss"] < 0.05


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("scheduler", ["none", "step", "plateau", "cosine", "onecycle"])
def test_every_optimizer_and_scheduler_runs(digits_data, tiny_config, optimizer, scheduler):
    small = dataclasses.replace(digits_data, train_x=digits_data.train_x[:128], train_y=digits_data.train_y[:128])
    cfg = {**tiny_config, "optimizer": optimizer, "scheduler": scheduler, "epochs": 2, "step_size": 1,
           "warmup_epochs": 0.5, "lr": 0.05 if optimizer == "sgd" else 3e-3}
    result = train(cfg, small)
    lrs = [m["lr"] for m in result.history]  # each epoch's learning rate at its end
    base = cfg["lr"]
    assert result.epochs_run == 2 and all(0 <= lr <= base * (1 + 1e-9) for lr in lrs), lrs
    expected = {  # what each schedule does over 2 epochs
        "none": lambda: lrs == [base, base],  # constant
        "step": lambda: lrs == pytest.approx([base, base * 0.1]),  # x0.1 every step_size (1) epochs
        "plateau": lambda: lrs[0] == base,  # no cut before it has seen a plateau
        "cosine": lambda: base * 0.4 < lrs[0] < base and lrs[1] < base * 1e-3,  # half-way down, then ~0
        "onecycle": lambda: base * 0.1 < lrs[0] < base and lrs[1] < base * 0.1,  # past its peak, then far down
    }
    assert expected[scheduler](), (scheduler, lrs)


def test_divergence_ends_cleanly(digits_data, tiny_config):
    reports = []
    result = train({**tiny_config, "optimizer": "sgd", "lr": 1e8, "momentum": 0.9, "epochs": 5}, digits_data,
                   reporter=lambda m, p: reports.append(m))
    assert result.diverged and result.epochs_run == 1
    assert reports[-1]["diverged"] is True and len(reports) == 1


def test_early_stopping(digits_data, tiny_config):
    result = train({**tiny_config, "epochs": 40, "early_stop_patience": 2, "lr": 5e-3}, digits_data)
    assert result.stopped_early and result.epochs_run < 40
    assert result.epochs_run - result.best_epoch == 2


def test_resuming_an_ended_run_trains_nothing_more(digits_data, tiny_config, tmp_path):
    """An early-stopped or complete run stays ended when resumed (a search resumed right after a
    trial finished hands it its final checkpoint)."""
    cfg = {**tiny_config, "epochs": 40, "early_stop_patience": 1, "lr": 5e-3}
    ended = train(cfg, digits_data, out_dir=tmp_path / "a")
    assert ended.stopped_early
    reports = []
    again = train(cfg, digits_data, out_dir=tmp_path / "a", resume=tmp_path / "a" / "last.pt",
                  reporter=lambda m, p: reports.append(m))
    assert reports == [] and again.stopped_early and again.epochs_run == ended.epochs_run
    assert again.best_val_acc == ended.best_val_acc
    done = train({**tiny_config, "epochs": 1}, digits_data, out_dir=tmp_path / "b")
    again = train({**tiny_config, "epochs": 1}, digits_data, out_dir=tmp_path / "b", resume=tmp_path / "b" / "last.pt",
                  reporter=lambda m, p: reports.append(m))
    assert reports == [] and again.epochs_run == 1 and not again.stopped_early
    assert again.best_val_acc == done.best_val_acc
    # and its folder is left as it was (no new TensorBoard event file)
    assert len(list((tmp_path / "a").glob("events.out.tfevents.*"))) == 1
    assert len(list((tmp_path / "b").glob("events.out.tfevents.*"))) == 1


def test_tensorboard_logs(digits_data, tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train({**tiny_config, "hist_every": 1, "epochs": 2}, digits_data, out_dir=tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("accuracy/val")] == [1, 2]
    assert {"loss/train", "loss/val", "accuracy/train", "opt/lr", "perf/images_per_sec",
            "hparam/best_val_acc"} <= set(tags["scalars"])
    assert any(t.startswith("weights/") for t in tags["histograms"])
    assert any(t.startswith("grads/") for t in tags["histograms"])
    assert {"val/confusion_matrix", "val/misclassified"} <= set(tags["images"])
    # the HParams plugin's session info is there (so the HParams tab lists this run)
    assert "hparams" in acc.PluginTagToContent("hparams") or acc.PluginTagToContent("hparams")


def test_run_started_over_in_the_same_folder_shows_each_epoch_once(digits_data, tiny_config, tmp_path):
    """A trial restarted from scratch (its checkpoints unreadable) logs into the folder that has its
    first attempt's events: TensorBoard must show each epoch once, not epoch 1 twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for attempt in ("a", "b"):
        train({**tiny_config, "epochs": 2}, digits_data, out_dir=tmp_path / "tb", checkpoint_dir=tmp_path / attempt)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    assert [e.step for e in acc.Scalars("accuracy/val")] == [1, 2]


def test_a_purging_writer_is_read_after_the_files_before_it(tmp_path, monkeypatch):
    """TensorBoard reads event files in name order, and a process's 10th writer's file ('.10') sorts before its
    9th ('.9') within one second: the run that starts over must still be read last, or its purge hides nothing
    (CI saw epoch 1 twice once its test process had made that many writers)."""
    import tensorboard.summary.writer.event_file_writer as efw
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.tblog import TBLogger

    monkeypatch.setattr(efw._global_uid, "_value", 9)
    for purge in (None, 1):  # the first run, then one started over from epoch 1 (both within a second)
        tb = TBLogger(str(tmp_path), {"model": "small_cnn"}, ["0", "1"], purge_step=purge)
        for epoch in (1, 2):
            tb.epoch({"epoch": epoch, "val_acc": 0.5 + 0.1 * epoch + (0.2 if purge else 0.0)})
        tb.close()
    names = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert [n.rsplit(".", 1)[1] for n in names] == ["9", "10"], names  # the second run's file is read last
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("accuracy/val")] == [(1, 0.8), (2, 0.9)]


def test_checkpoint_round_trip(digits_data, tiny_config, tmp_path):
    result = train({**tiny_config, "epochs": 2}, digits_data, out_dir=tmp_path)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["config"]["model"] == "small_cnn" and best["classes"] == list("0123456789")
    assert best["epoch"] == result.best_epoch and best["metrics"]["val_acc"] == result.best_val_acc
    assert len(best["metrics"]["val"]["per_class"]) == 10
    model = build_from_checkpoint(best)
    _, acc, _ = evaluate(model, digits_data.val_x, digits_data.val_y)
    assert acc == pytest.approx(result.best_val_acc, abs=1e-6)
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 2 and "optimizer" in last and len(last["history"]) == 2


def test_resume_continues_exactly(digits_data, tiny_config, tmp_path):
    cfg = {**tiny_config, "epochs": 3, "scheduler": "onecycle"}
    straight = train(cfg, digits_data, out_dir=tmp_path / "a")
    resumed = _stopped_after_two_then_resumed(cfg, digits_data, tmp_path / "b")
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3]
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5), k
    assert resumed.history[-1]["val_acc"] == pytest.approx(straight.history[-1]["val_acc"])
    assert resumed.val == straight.val  # best-epoch metrics survive the restart


def test_wrong_architecture_or_class_count_is_refused(digits_data, tiny_config, tmp_path):
    train({**tiny_config, "epochs": 1}, digits_data, out_dir=tmp_path)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="'small_cnn' model with 10 classes.*'resnet' model with 10"):
        check_compatible(ckpt, "resnet", 10)
    with pytest.raises(CheckpointError, match="with 47 classes was expected"):
        check_compatible(ckpt, "small_cnn", 47)
    with pytest.raises(CheckpointError, match="'resnet'"):
        train({**tiny_config, "model": "resnet"}, digits_data, resume=tmp_path / "last.pt")
    from models import build_model

    with pytest.raises(CheckpointError, match="does not fit this model's architecture"):
        load_state(build_model("small_cnn", 10, width=2.0), ckpt)


class Payload:
    """Unpickling this runs code (writes a marker file): what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_pickled_payload_is_refused_and_never_runs(tmp_path, monkeypatch, force_unsafe_env):
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {"model": "small_cnn"}, "classes": ["a"], "epoch": 1,
                "extra": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*pickled Python objects"):
        load_checkpoint(path)
    assert not marker.exists()


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))  # a raw pickle stream of noise
    with pytest.raises(CheckpointError, match="unreadable \\(corrupt or not a checkpoint\\)") as e:
        load_checkpoint(tmp_path / "random.pt")
    assert "weights_only" not in str(e.value)  # never suggest the unsafe way out
    save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.ones(1000)}, "config": {}, "classes": [], "epoch": 1})
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"just": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an emnist-tune checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": {}, "classes": [], "epoch": 1})
    before = path.read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": {}, "classes": [], "epoch": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temp file left behind


def _cli(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "training" / "train.py"), *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


def test_cli_trains_evaluates_and_prints_json(digits_dir, tmp_path):
    import json

    out = tmp_path / "run"
    r = _cli("--data-dir", str(digits_dir), "--split", "digits", "--epochs", "2", "--out", str(out),
             "--set", "batch_size=32", "--set", "hist_every=0", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 < summary["val_acc"] <= 1 and 0 < summary["test_acc"] <= 1
    assert Path(summary["checkpoint"]).is_file() and "most confused" in r.stdout
    assert list(out.glob("events.out.tfevents.*"))
    # the same --out again would overwrite a finished run: refused, nothing touched
    before = (out / "best.pt").read_bytes()
    r2 = _cli("--data-dir", str(digits_dir), "--split", "digits", "--out", str(out))
    assert r2.returncode == 2 and "already holds a run" in r2.stderr
    assert (out / "best.pt").read_bytes() == before


def test_cli_bad_config_fails_before_training(tmp_path):
    r = _cli("--set", "optimizer=lion", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "optimizer must be one of" in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_real_emnist_two_epochs_small_cnn(real_run):
    """The acceptance bar: 2 epochs of the small CNN on 20,000 real images reach >= 75 % val accuracy."""
    data, result = real_run
    assert len(data.train_x) == 20000
    assert result.best_val_acc >= 0.75, result.history


def test_resume_keeps_this_machines_optimizer_implementation(digits_data, tiny_config, tmp_path):
    """A last.pt written on a GPU (fused optimizer) resumes on a CPU, which trains with its own kind."""
    from training.checkpoint import load_checkpoint, save_checkpoint

    train({**tiny_config, "epochs": 1}, digits_data, out_dir=tmp_path)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    for g in ckpt["optimizer"]["param_groups"]:
        g["fused"], g["foreach"] = True, False  # as the CUDA run saves it
    save_checkpoint(tmp_path / "gpu.pt", ckpt)
    resumed = train({**tiny_config, "epochs": 2}, digits_data, out_dir=tmp_path / "cpu", resume=tmp_path / "gpu.pt")
    assert [m["epoch"] for m in resumed.history] == [1, 2] and not resumed.diverged
    assert all(not g["fused"] for g in load_checkpoint(tmp_path / "cpu" / "last.pt")["optimizer"]["param_groups"])


def test_weight_average_unit():
    """WeightAverage: a lerp of every floating tensor (BatchNorm statistics included) with a decay that
    ramps up as (1 + t) / (10 + t), integer buffers copied, and the trained model left untouched."""
    from torch import nn

    from training.optim import WeightAverage

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = WeightAverage(model, 0.99)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(1)
    ema.update()  # step 1: decay min(0.99, 2 / 11)
    d = 2 / 11
    for k, v in ema.model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, d * before[k] + (1 - d) * (before[k] + 1)), k
        else:
            assert v == model.state_dict()[k], k  # num_batches_tracked is copied
    assert all(not p.requires_grad for p in ema.model.parameters())
    ema.steps = 10**6
    ema.update()  # long past the ramp: the configured decay
    w = ema.model[0].weight.clone()
    ema.update()
    assert torch.allclose(ema.model[0].weight, 0.99 * w + 0.01 * model[0].weight)


def test_weight_average_is_what_is_validated_and_delivered(digits_data, tiny_config, tmp_path):
    """ema_decay > 0 trains exactly as without (the same raw weights), but validation measures the
    average, and best.pt/last.pt hold it as their model; last.pt also keeps the raw weights."""
    small = dataclasses.replace(digits_data, train_x=digits_data.train_x[:192], train_y=digits_data.train_y[:192])
    cfg = {**tiny_config, "epochs": 2, "scheduler": "onecycle"}
    plain = train(cfg, small, out_dir=tmp_path / "plain")
    averaged = train({**cfg, "ema_decay": 0.9}, small, out_dir=tmp_path / "ema")
    p_last, e_last = load_checkpoint(tmp_path / "plain" / "last.pt"), load_checkpoint(tmp_path / "ema" / "last.pt")
    assert "train_model" not in p_last and e_last["ema_steps"] == 2 * (192 // 32)
    for k, v in p_last["model"].items():
        assert torch.allclose(v.float(), e_last["train_model"][k].float(), atol=1e-6), k  # training unchanged
    w = "0.weight"
    assert not torch.allclose(e_last["model"][w], e_last["train_model"][w])  # the average differs
    best = load_checkpoint(tmp_path / "ema" / "best.pt")
    assert "train_model" not in best and best["epoch"] == averaged.best_epoch
    _, acc, _ = evaluate(build_from_checkpoint(best), small.val_x, small.val_y)
    assert acc == pytest.approx(best["metrics"]["val_acc"], abs=1e-6)
    assert acc == pytest.approx(averaged.best_val_acc, abs=1e-6)
    raw = build_from_checkpoint({**e_last, "model": e_last["train_model"]})
    _, raw_acc, _ = evaluate(raw, small.val_x, small.val_y)
    assert raw_acc == pytest.approx(plain.history[-1]["val_acc"], abs=1e-6)


def test_resume_with_weight_average_continues_exactly(digits_data, tiny_config, tmp_path):
    small = dataclasses.replace(digits_data, train_x=digits_data.train_x[:192], train_y=digits_data.train_y[:192])
    cfg = {**tiny_config, "epochs": 3, "scheduler": "onecycle", "ema_decay": 0.9}
    straight = train(cfg, small, out_dir=tmp_path / "a")
    resumed = _stopped_after_two_then_resumed(cfg, small, tmp_path / "b")
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["ema_steps"] == b["ema_steps"] == 3 * (192 // 32)
    for part in ("model", "train_model"):
        for k in a[part]:
            assert torch.allclose(a[part][k].float(), b[part][k].float(), atol=1e-5), (part, k)
    assert [m["val_acc"] for m in resumed.history] == pytest.approx([m["val_acc"] for m in straight.history])


def test_cpu_evaluation_runs_in_bounded_batches_with_the_same_logits():
    """predict_logits on the CPU splits an evaluation of any asked batch into batches of at most
    CPU_EVAL_BATCH (a large batch is slower there: benchmarks/eval.py), and the logits are those of
    the whole set run at once, in order."""
    from models import build_model
    from training.inference import CPU_EVAL_BATCH, eval_batch_size, predict_logits

    torch.manual_seed(0)
    model = build_model("small_cnn", 10).eval()
    x = torch.randint(0, 256, (CPU_EVAL_BATCH * 2 + 37, 28, 28), dtype=torch.uint8)
    seen = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    got = predict_logits(model, x, batch_size=1024, precision="fp32")
    handle.remove()
    assert seen == [CPU_EVAL_BATCH, CPU_EVAL_BATCH, 37]
    ref = torch.cat([predict_logits(model, x[i : i + 1], 1, precision="fp32") for i in range(len(x))])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # elsewhere the asked batch stands (a GPU evaluates in large batches)
    assert eval_batch_size(1024, torch.device("cuda")) == 1024 and eval_batch_size(64, torch.device("cpu")) == 64
