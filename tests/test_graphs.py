"""CUDA-graphed training step vs the eager one (runs where CUDA exists; skips on CPU-only machines)."""

from __future__ import annotations

import pytest
import torch

from training.graphs import graphs_wanted
from training.trainer import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA on this machine: the graphed step runs on the GPU machine only")


def test_graphs_only_on_cuda():
    assert not graphs_wanted("auto", torch.device("cpu"))
    assert not graphs_wanted("off", torch.device("cuda"))
    assert graphs_wanted("auto", torch.device("cuda")) == hasattr(torch.cuda, "CUDAGraph")


def _run(digits_data, tiny_config, graphs: str, **extra):
    config = {**tiny_config, "device": "cuda", "cuda_graphs": graphs, "epochs": 3, "aug_strength": 1.0,
              "aug_elastic": 1.0, "aug_erase": 0.3, "dropout": 0.25, **extra}
    return train(config, digits_data)


@cuda
@pytest.mark.parametrize("extra", [{}, {"optimizer": "sgd", "scheduler": "onecycle"},
                                   {"model": "resnet", "grad_clip": 1.0, "scheduler": "cosine"},
                                   {"ema_decay": 0.99, "scheduler": "onecycle"}])
def test_graphed_training_matches_eager(digits_data, tiny_config, extra):
    """Same seed: the same loss curve within bf16 noise, and the same kind of model at the end."""
    eager = _run(digits_data, tiny_config, "off", **extra)
    graphed = _run(digits_data, tiny_config, "auto", **extra)
    assert graphed.graphed and not eager.graphed
    for e, g in zip(eager.history, graphed.history, strict=True):
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=0.05, abs=0.02), (e["epoch"], e, g)
        assert g["lr"] == pytest.approx(e["lr"])  # the schedule drives the graphed run too
    assert graphed.best_val_acc == pytest.approx(eager.best_val_acc, abs=0.05)


@cuda
def test_graphed_run_resumes_and_detects_divergence(digits_data, tiny_config, tmp_path):
    first = train({**tiny_config, "device": "cuda", "cuda_graphs": "auto", "epochs": 1}, digits_data, out_dir=tmp_path)
    assert first.graphed
    resumed = train({**tiny_config, "device": "cuda", "cuda_graphs": "auto", "epochs": 2}, digits_data,
                    out_dir=tmp_path / "again", resume=tmp_path / "last.pt")
    assert [m["epoch"] for m in resumed.history] == [1, 2]
    bad = train({**tiny_config, "device": "cuda", "cuda_graphs": "auto", "lr": 1e6}, digits_data)
    assert bad.diverged and bad.epochs_run == 1


@cuda
@pytest.mark.parametrize("extra", [{}, {"grad_clip": 1.0, "ema_decay": 0.99, "scheduler": "onecycle"}])
def test_graphed_epoch_waits_for_the_gpu_once(digits_data, tiny_config, extra):
    """Nothing inside a graphed epoch makes the CPU wait for the GPU (that would stall the launch queue)
    except the one divergence check at its end: found with torch.cuda.set_sync_debug_mode."""
    import warnings

    from training.config import make_config
    from training.trainer import capture_step, run_epoch, setup

    run = setup(make_config({**tiny_config, "device": "cuda", "cuda_graphs": "auto", **extra}), digits_data)
    capture_step(run)
    assert run.graphed is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for epoch in (1, 2):
                run_epoch(run, epoch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 2, syncs  # one per epoch at most: the divergence check
