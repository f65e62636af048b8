"""search/resources.py: what a trial asks Ray for, and how many run at once."""

import pytest

from search.resources import Resources


@pytest.mark.parametrize("res, cluster, want", [
    (Resources(), {"CPU": 16, "GPU": 1}, (1.0, 0.25, 4)),  # four trials share the GPU
    (Resources(), {"CPU": 2}, (1.0, 0.0, 2)),  # no GPU: one trial per core
    (Resources(gpus_per_trial=0.5, cpus_per_trial=4), {"CPU": 16, "GPU": 2}, (4, 0.5, 4)),
    (Resources(cpus_per_trial=3), {"CPU": 2}, (3, 0.0, 1)),  # never zero trials
    (Resources(concurrency=7), {"CPU": 2}, (1.0, 0.0, 7)),
])
def test_fit(res, cluster, want):
    assert res.fit(cluster) == want


def test_more_gpu_than_the_cluster_has():
    with pytest.raises(ValueError, match="--gpus-per-trial 1 but the Ray cluster has 0 GPUs"):
        Resources(gpus_per_trial=1).fit({"CPU": 4})
