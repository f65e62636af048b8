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

    def refit_share(self, members: int, cluster: dict[str, float]) -> tuple[float, float, int]:
        """(cpus per model, gpus per model, models at once) for a time budget's refit of `members` models, all in
        one round. With GPUs, as the trials ran. On CPUs alone the models share every CPU (one model on 2 CPUs is
        its trial's on 1 and more: measured on the 2-core machine, one vgg trained 330 s on 2 threads reached 0.9002
        val, two on a thread each 0.8981 averaged, two of other configs 0.8943-0.8987)."""
        cpt, gpt, at_once = self.fit(cluster)
        if gpt > 0:
            return cpt, gpt, at_once
        cpus_total = cluster.get("CPU", 1)
        cpus = max(cpt, float(int(cpus_total // max(1, members))))
        return cpus, 0.0, max(1, int(cpus_total // cpus))

    def _machine(self, device: str) -> dict[str, float]:
        import os

        import torch

        gpus = torch.cuda.device_count() if device == "auto" or device.startswith("cuda") else 0
        return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}

    def on_this_machine(self, device: str = "auto") -> tuple[float, float, int]:
        """fit() for this machine alone (before Ray starts, or for a plan): its CPUs and, where the trials may
        use CUDA, its GPUs."""
        return self.fit(self._machine(device))

    def refit_on_this_machine(self, members: int, device: str = "auto") -> tuple[float, float, int]:
        """refit_share() for this machine alone."""
        return self.refit_share(members, self._machine(device))
