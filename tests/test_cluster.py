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
