"""What each trial asks Ray for, and how many trials run at once (search and refit alike).

Ray-free, so the command line can check and carry it before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_GPU_SHARE = 0.25  # small CNNs: four trials share a GPU


@dataclass
class Resources:
    gpus_per_trial: float | None = None  # None: DEFAULT_GPU_SHARE where the cluster has GPUs, else 0
    cpus_per_trial: float = 1.0
    concurrency: int | None = None  # None: as many trials as the cluster's CPUs and GPUs fit

    def fit(self, cluster: dict[str, float]) -> tuple[float, float, int]:
        """(cpus per trial, gpus per trial, trials at once) on a cluster with these totals
        (ray.cluster_resources()). ValueError when a trial asks for more GPU than there is."""
        gpus_total, cpus_total = cluster.get("GPU", 0), cluster.get("CPU", 1)
        gpt = self.gpus_per_trial
        if gpt is None:
            gpt = DEFAULT_GPU_SHARE if gpus_total > 0 else 0.0
        cpt = self.cpus_per_trial
        if gpt > 0 and gpus_total < gpt:
            raise ValueError(f"--gpus-per-trial {gpt} but the Ray cluster has {gpus_total:g} GPUs")
        fit = int(cpus_total // cpt)
        if gpt > 0:
            fit = min(fit, int(gpus_total // gpt))
        return cpt, gpt, self.concurrency or max(1, fit)

    def on_this_machine(self, device: str = "auto") -> tuple[float, float, int]:
        """fit() for this machine alone (before Ray starts, or for a plan): its CPUs and, where the trials may
        use CUDA, its GPUs."""
        import os

        import torch

        gpus = torch.cuda.device_count() if device == "auto" or device.startswith("cuda") else 0
        return self.fit({"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)})
