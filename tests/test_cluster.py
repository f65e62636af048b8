"""A two-node Ray cluster on one machine: trials spread over both nodes, and every trial's
results, TensorBoard events and checkpoints end up in the shared storage path."""

from __future__ import annotations

import pytest

from search.results import load_experiment
from tests.test_search import run_search, write_space


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.mark.slow
def test_search_on_two_node_cluster(two_node_cluster, digits_dir, tmp_path):
    space = write_space(tmp_path, samples=4, max_epochs=2, grace=2, space="  aug_strength: {uniform: [0.0, 1.0]}\n")
    storage = tmp_path / "shared-storage"
    r = run_search("--config", space, "--data-dir", digits_dir, "--storage", storage, "--name", "clustered",
                   "--address", two_node_cluster.address, "--concurrency", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = load_experiment(storage / "clustered")
    assert len(exp.trials) == 4 and set(exp.trials["status"]) == {"finished"}
    nodes = {n for h in exp.histories.values() for n in h["node_id"]}
    assert len(nodes) == 2, nodes  # both nodes ran trials
    for d in sorted((storage / "clustered").glob("trial_*")):
        assert (d / "result.json").is_file() and (d / "params.json").is_file()
        assert list(d.glob("events.out.tfevents.*")), f"{d.name}: TensorBoard events missing from storage"
        assert list(d.glob("checkpoint_*/checkpoint.pt")), f"{d.name}: checkpoints missing from storage"
    assert (storage / "clustered" / "best.pt").is_file()


@pytest.mark.slow
def test_worker_node_killed_mid_search(two_node_cluster, digits_dir, tmp_path):
    """A worker node vanishes mid-search: its trials are rescheduled on the remaining node (from their
    checkpoints) and the search completes with every trial finished."""
    import subprocess
    import time

    from tests.test_search import RUN

    epochs = 8
    space = write_space(tmp_path, samples=4, max_epochs=epochs, grace=epochs,
                        space="  aug_strength: {uniform: [0.0, 1.0]}\n")
    storage = tmp_path / "shared-storage"
    args = ["--config", space, "--data-dir", digits_dir, "--storage", storage, "--name", "lossy",
            "--address", two_node_cluster.address, "--concurrency", "2"]
    worker = [n for n in two_node_cluster.worker_nodes][0]
    worker_id = worker.node_id

    def worker_mid_trial() -> bool:
        """A trial on the worker has trained at least one epoch but is far from done."""
        if not (storage / "lossy").exists():
            return False
        exp = load_experiment(storage / "lossy")
        return any(len(h) and h["node_id"].iloc[-1] == worker_id and h["epoch"].iloc[-1] <= epochs // 2
                   for h in exp.histories.values() if "node_id" in h)

    proc = subprocess.Popen([*RUN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not worker_mid_trial():
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.3)
    two_node_cluster.remove_node(worker, allow_graceful=False)  # the node dies with its trials
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    exp = load_experiment(storage / "lossy")
    assert len(exp.trials) == 4 and set(exp.trials["status"]) == {"finished"}, exp.trials
    assert exp.trials["num_failures"].sum() >= 1  # at least one trial was hit and retried
    for trial_id, h in exp.histories.items():
        assert h["epoch"].tolist() == list(range(1, epochs + 1)), (trial_id, h["epoch"].tolist())
    assert (storage / "lossy" / "best.pt").is_file()
