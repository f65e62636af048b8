"""Hyperparameter search: Ray Tune trials of the training core, Optuna (TPE) suggesting
configs, ASHA stopping weak trials early.

    python search/run.py [--samples 50] [--config configs/search/default.yaml] [--name NAME]
                         [--storage results/] [--address ADDR] [--max-epochs N]
                         [--gpus-per-trial F] [--cpus-per-trial N] [--concurrency N] [--resume]
                         [--data-dir D] [--split S] [--seed N]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from search.space import SearchSpec, default_point, load_search_spec  # noqa: E402
from training.config import ConfigError, make_config  # noqa: E402
from training.data import REPO_ROOT, DataNotFoundError  # noqa: E402
from training.idx import IdxError  # noqa: E402

DEFAULT_SEARCH = REPO_ROOT / "configs" / "search" / "default.yaml"
DEFAULT_STORAGE = REPO_ROOT / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Ray Tune + Optuna + ASHA search over EMNIST training configs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--samples", type=int, default=None, help="number of trials (default: the YAML's, else 50)")
    p.add_argument("--config", type=Path, default=DEFAULT_SEARCH, help="search space YAML")
    p.add_argument("--name", default=None, help="experiment name (default: <config>-<time>); needed for --resume")
    p.add_argument("--storage", default=str(DEFAULT_STORAGE), help="local path, shared path or URI (s3://...)")
    p.add_argument("--address", default=None, help="Ray cluster to join: 'auto' or ray://host:10001")
    p.add_argument("--max-epochs", type=int, default=None, help="ASHA budget per trial (default: the YAML's)")
    p.add_argument("--gpus-per-trial", type=float, default=None, help="default 0.25 with CUDA, else 0")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=None, help="trials at once (default: what resources allow)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted experiment --name")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--split", default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds the Optuna sampler")
    p.add_argument("--device", default=None, help="trial device (default auto: CUDA if present)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace, spec: SearchSpec) -> None:
    """Every argument problem is reported here, before Ray or the data are touched."""
    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples}")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ConfigError(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if args.max_epochs is not None and args.max_epochs < spec.grace_period:
        raise ConfigError(f"--max-epochs {args.max_epochs} is below the ASHA grace period {spec.grace_period}")
    if args.gpus_per_trial is not None and not 0 <= args.gpus_per_trial <= 8:
        raise ConfigError(f"--gpus-per-trial must be between 0 and 8, got {args.gpus_per_trial}")
    if args.cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if args.concurrency is not None and args.concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.resume and not args.name:
        raise ConfigError("--resume needs --name of the experiment to continue")
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        raise ConfigError(f"--name must be a plain folder name, got {args.name!r}")


def is_uri(path: str) -> bool:
    return "://" in path


def experiment_dir(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if is_uri(storage) else str(Path(storage).resolve() / name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_search_spec(args.config)
        check_args(args, spec)
        if args.max_epochs is not None:
            spec.max_epochs = args.max_epochs
        overrides = {k: v for k, v in (("split", args.split), ("device", args.device)) if v is not None}
        spec.fixed.update(overrides)
        base = spec.trial_base()  # validates fixed + overrides
        make_config(default_point(spec), base=base)
        samples = args.samples or spec.samples or 50
        name = args.name or f"{args.config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        exp_dir = experiment_dir(args.storage, name)
        if not is_uri(exp_dir):
            exists = Path(exp_dir).is_dir() and any(Path(exp_dir).glob("experiment_state-*.json"))
            if args.resume and not exists:
                raise ConfigError(f"--resume: no experiment at {exp_dir}")
            if not args.resume and Path(exp_dir).exists() and any(Path(exp_dir).iterdir()):
                raise ConfigError(f"{exp_dir} already exists; use --resume to continue it or another --name")
        from training.data import load_dataset

        # Read once by the driver; trials receive it through Ray's object store.
        data = load_dataset(base["split"], args.data_dir, base["val_fraction"], base["seed"],
                            base["train_limit"], base["val_limit"])
    except (ConfigError, DataNotFoundError, IdxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from search.tuner import run_search  # Ray is imported only from here on

    return run_search(args, spec, base, data, samples, name, exp_dir)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
