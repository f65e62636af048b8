"""A search that fits the machine it runs on: what it costs here, and how a time budget is spent.

No Ray in here: the driver measures and plans before Ray starts.

1. `calibrate`: a few timed training steps (one thread per trial, as a trial runs) of the default config and of
   a few configurations sampled from the space, on the real data already in memory: images/s of training and
   of validation for each. Seconds, not minutes.
2. `estimate`: what an unbudgeted search will cost on this machine from those speeds, ASHA's rungs and the
   final stage, printed before any trial runs (`estimated 11 h on 2 CPUs for 50 trials (ASHA 2/6/12)`).
3. `plan`: `--time-budget` split between the search and its final stage. The final stage's share comes from
   its expected cost: Ray's start, the ensemble and test-time-augmentation evaluations, and the refit of the chosen
   models on train + validation, which gets 60 % of the training time (see plan). The search gets 40 %, and ASHA
   compares trials at equal cost: its resource is a trial's own seconds of training and validation
   (`run_seconds`), with rungs from the budget (`grace_s * 3**k` up to `max_t_s`), so a configuration 50x more
   expensive per image is judged on what it reached in the same time, never after 50x the compute. Each trial is a
   timed run (training config `train_seconds` = `max_t_s`): its learning-rate schedule is spread over its seconds,
   not its epochs, so at every rung the trials compared are at the same point of their schedules, and the ones
   that reach the last rung have annealed there, whatever their speed. An "epoch" becomes `epoch_images` images
   (drawn afresh each time), a few seconds of the default config, so that trials report, checkpoint and can be
   stopped every few seconds even on a laptop's CPU.

Why time rather than epochs or images as ASHA's resource: under a budget the question a rung asks is "which
configuration is best for the time it had", and a time resource answers it without a cost model; equal images
would let an expensive configuration spend many times the budget of a cheap one before its first decision.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field

from training.config import ConfigError

# ---------------------------------------------------------------- durations

_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(h|min|m|sec|s)?", re.I)
UNITS = {"h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0, "sec": 1.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in '90s', '30m', '2h', '1h30m' or '45' (seconds). ConfigError for anything else."""
    t = str(text).strip().lower().replace(" ", "")
    pos, total = 0, 0.0
    while pos < len(t):
        m = _PART.match(t, pos)
        if not m or m.end() == pos:
            break
        total += float(m[1]) * UNITS[m[2].lower() if m[2] else None]
        pos = m.end()
    if not t or pos != len(t) or not math.isfinite(total) or total <= 0:
        raise ConfigError(f"--time-budget must be a duration such as 90s, 30m, 2h or 1h30m, got {text!r}")
    return total


def clock(seconds: float) -> str:
    """'11 h 05 min', '4 min 30 s', '45 s'."""
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


# ---------------------------------------------------------------- calibration

@dataclass
class Speed:
    label: str  # the configuration, briefly
    train_ips: float  # training images/s of one trial (its threads), augmentation included
    eval_ips: float  # validation images/s
    batch_size: int


@dataclass
class Calibration:
    speeds: list[Speed]  # the default config first
    seconds: float  # what measuring took
    threads: int
    n_train: int
    n_val: int

    @property
    def default(self) -> Speed:
        return self.speeds[0]

    def mean_epoch_s(self, images: int) -> float:
        """An epoch of `images`, with its validation, averaged over the configurations measured."""
        return sum(images / s.train_ips + self.n_val / s.eval_ips for s in self.speeds) / len(self.speeds)


def sample_configs(spec, n: int, seed: int) -> list[dict]:
    """n configurations drawn at random from the space (Optuna's RandomSampler, seeded): complete configs."""
    import optuna

    from search.space import DefineByRun

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    space, out = DefineByRun(spec), []
    for _ in range(n):
        trial = study.ask()
        rest = space(trial)
        out.append({**rest, **trial.params})
    return out


def _brief(config: dict) -> str:
    from search.space import SIZE_KEYS

    return ", ".join(f"{k}={config[k]:.3g}" if isinstance(config[k], float) else f"{k}={config[k]}"
                     for k in (*SIZE_KEYS, "batch_size") if k in config)


def measure(config: dict, data, seconds: float = 1.0) -> Speed:
    """Training and validation images/s of one config on `data`, in this process's threads: two warm-up steps,
    then steps for about `seconds`; validation on up to 512 images."""
    from training.config import make_config
    from training.inference import predict_logits
    from training.trainer import run_epoch, setup

    c = make_config({**config, "epochs": 1, "hist_every": 0, "scheduler": "none"})  # (steps are set below)
    run = setup(c, data)
    whole = run.steps  # (batches in the training split: an epoch of run_epoch never asks for more)

    def timed(steps: int) -> float:
        t0, done = time.perf_counter(), 0
        while done < steps:
            run.steps = min(whole, steps - done)
            run_epoch(run, 1)
            done += run.steps
        return time.perf_counter() - t0

    timed(2)  # warm-up: the first steps allocate and pick kernels
    per_step = max(1e-4, timed(2) / 2)
    steps = max(2, min(200, int(seconds / per_step)))
    train_ips = steps * run.batch_size / timed(steps)
    x = run.x_val[:512]
    predict_logits(run.model, x[:64], c.eval_batch_size, run.channels_last, c.precision)
    t0 = time.perf_counter()
    predict_logits(run.model, x, c.eval_batch_size, run.channels_last, c.precision)
    eval_ips = len(x) / max(1e-6, time.perf_counter() - t0)
    return Speed(_brief(c.to_dict()), train_ips, eval_ips, run.batch_size)


def calibrate(spec, data, threads: int, seed: int = 0, samples: int = 5, seconds: float = 1.0) -> Calibration:
    """Speeds of the default config and `samples` configurations of the space (see the module doc)."""
    import torch

    from search.space import default_point, start_points

    t0 = time.perf_counter()
    base = spec.trial_base()
    configs = [{**base, **default_point(spec)}, *({**base, **p} for p in start_points(spec)),
               *sample_configs(spec, samples, seed)]
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        speeds = [measure(c, data, seconds) for c in configs]
    finally:
        torch.set_num_threads(before)
    return Calibration(speeds, time.perf_counter() - t0, threads, len(data.train_x), len(data.val_x))


# ---------------------------------------------------------------- costs

# Fixed costs measured on the 2-core development machine (benchmarks.search's budget line): starting Ray and
# its first actor; a trial's start-up in a reused actor (model, restore, TensorBoard writer) and its per-epoch
# reports and checkpoint saves; the driver's own end (summary). They are small against real trials.
RAY_START_S = 12.0
TRIAL_START_S = 2.0
REPORT_S = 0.25
# The final stage under a budget (search/timed_refit.py), the same figures for its plan here and its refit there:
# a refit trial's start (its actor, the data on the device, the model) and its end (last validation, checkpoint,
# report), and the delivery's fixed part (the test split's load, the writing).
REFIT_START_S = 10.0
REFIT_END_S = 5.0
DELIVERY_FIXED_S = 20.0


def asha_rungs(grace: float, factor: int, max_t: float) -> list[float]:
    rungs, r = [], grace
    while r < max_t:
        rungs.append(r)
        r *= factor
    return [*rungs, max_t]


def expected_resource(grace: float, factor: int, max_t: float) -> float:
    """ASHA's expected resource per trial: a 1/factor of the trials goes on at each rung."""
    total, prev = 0.0, 0.0
    for k, r in enumerate(asha_rungs(grace, factor, max_t)):
        total += (r - prev) / factor**k
        prev = r
    return total


@dataclass
class Estimate:
    search_s: float
    final_s: float
    trials: int
    concurrency: int
    rungs: list
    startup_s: float

    @property
    def total_s(self) -> float:
        return self.startup_s + self.search_s + self.final_s


def final_stage_s(cal: Calibration, n_test: int, refit_s: float, concurrency: int, candidates: int = 3,
                  members: int = 2, tta: bool = True) -> float:
    """The final stage: Ray again, the refit (members in rounds of `concurrency`, each `refit_s` of training), the
    selection on validation (candidates, then the chosen with test-time augmentation), the test report
    (candidates, the delivered model with its views), and the end-of-search summary's test evaluation."""
    d = cal.default
    rounds = math.ceil(members / max(1, concurrency))
    from search.selection import TTA_VIEWS  # (one count of views; imported here: it brings torch)

    views = TTA_VIEWS if tta else 1
    evals = (candidates * cal.n_val + members * views * cal.n_val      # selection, TTA's choice
             + (candidates + members * views + 1) * n_test) / d.eval_ips  # test report, summary
    return RAY_START_S + rounds * (refit_s + REFIT_START_S + REFIT_END_S) + evals + DELIVERY_FIXED_S


def estimate(spec, samples: int, concurrency: int, cal: Calibration, n_test: int, elapsed_s: float) -> Estimate:
    """An unbudgeted search on this machine: ASHA on epochs of the whole training split, `samples` trials,
    `concurrency` at once, then its final stage with the default settings."""
    epoch_images = cal.n_train
    epochs = expected_resource(spec.grace_period, spec.reduction_factor, spec.max_epochs)
    per_trial = TRIAL_START_S + epochs * (cal.mean_epoch_s(epoch_images) + REPORT_S)
    search_s = samples * per_trial / max(1, min(concurrency, samples))
    d = cal.default
    refit_epoch_s = (cal.n_train + cal.n_val) / d.train_ips + cal.n_val / d.eval_ips
    final_s = final_stage_s(cal, n_test, spec.max_epochs * refit_epoch_s, concurrency)
    return Estimate(search_s, final_s, samples, concurrency,
                    asha_rungs(spec.grace_period, spec.reduction_factor, spec.max_epochs), elapsed_s + RAY_START_S)


# ---------------------------------------------------------------- the budget's plan

FACTOR = 3  # ASHA's reduction factor under a budget


@dataclass
class Plan:
    budget_s: float
    elapsed_s: float  # spent before the plan (start-up, data, calibration)
    search_s: float  # the search's share, from when it starts
    final_s: float  # the final stage's share (and the summary's)
    grace_s: float  # ASHA's first rung, in seconds of a trial's training + validation
    max_t_s: float  # the most a trial trains
    epoch_images: int  # a trial reports (is validated, checkpointed, judged) every this many images
    rungs: list = field(default_factory=list)
    margin_s: float = 0.0  # kept free at the end (the last lines, Ray's shutdown)

    def to_dict(self) -> dict:
        return asdict(self)


def _epoch_s(speed: Speed, images: int, n_val: int) -> float:
    return images / speed.train_ips + n_val / speed.eval_ips + REPORT_S


SEARCH_SHARE = 0.4  # of the time left for training: the search ranks configurations, the refit makes the model


def plan(budget_s: float, elapsed_s: float, cal: Calibration, concurrency: int, n_test: int,
         tta: bool = True) -> Plan:
    """Split what is left of `budget_s` (after `elapsed_s`) between the search and its final stage (see the module
    doc). ConfigError, naming the smallest budget that would work, when it cannot buy the first rung.

    What is left for training after the fixed costs (Ray's starts, the evaluations, a margin) goes 40 % to the
    search and 60 % to the refit of the chosen models, which train on all the data with a whole schedule for the
    time that is left (search.timed_refit.fit_refit). Measured on the 2-core machine (bymerge, 30 minutes): with the
    search taking what the refit of its longest trial left, the best trials had trained ~0.3 passes over the data
    and the delivered model reached 0.888; the refit, not the search, is where a short budget buys accuracy."""
    d = cal.default
    alpha = 0.5 if concurrency >= 2 else 1 / 3  # a trial's most training, as a share of the search's time
    members = max(1, min(concurrency, 3))  # the refit under a budget: one round, at most `concurrency` models
    fixed = final_stage_s(cal, n_test, 0.0, concurrency, members=members, tta=tta)
    margin = max(5.0, 0.02 * budget_s)
    left = budget_s - elapsed_s - fixed - margin - RAY_START_S
    search_s = SEARCH_SHARE * left
    # the smallest useful search: the default config through a few short epochs, so that ASHA has a rung
    min_images = min(cal.n_train, max(20 * d.batch_size, cal.n_train // 100))
    min_search = 3 * (_epoch_s(d, min_images, cal.n_val) + TRIAL_START_S) / alpha
    if search_s < min_search:
        need = budget_s - left + min_search / SEARCH_SHARE
        raise ConfigError(f"--time-budget {clock(budget_s)} is too small for this search on this machine: after "
                          f"start-up ({clock(elapsed_s)}) and the final stage's evaluations ({clock(fixed)}) it "
                          f"cannot buy the first rung of the default config; the smallest budget that would work "
                          f"here is about {clock(math.ceil(need / 10) * 10)}")
    max_t = alpha * search_s
    # One rung, at a third of max_t, then max_t. A rung asks "which is best after this long", and at a short one the
    # configurations that are fast per image are ahead whatever they reach later: measured on the 2-core machine
    # (bymerge, the trials of `benchmarks.budget --budget 30m`, timed onecycle runs of 330 s, one thread each),
    # vgg width 1 stood at 0.79 val against small_cnn width 1's 0.83 after ~38 s (a rung at max_t / 9), nearly
    # level after ~110 s (max_t / 3), and ahead at 330 s (0.8945 against 0.8912). Fewer trials, judged where the
    # judgement holds.
    grace = max(max_t / FACTOR, 3 * (_epoch_s(d, min_images, cal.n_val)))
    # an epoch (a report): about a twelfth of the first rung of the default config, never less than min_images
    images = int((grace / 12 - cal.n_val / d.eval_ips - REPORT_S) * d.train_ips)
    images = max(min_images, min(cal.n_train, images)) // d.batch_size * d.batch_size or d.batch_size
    final_s = budget_s - elapsed_s - margin - search_s
    return Plan(budget_s, elapsed_s, search_s, final_s, grace, max_t, images, asha_rungs(grace, FACTOR, max_t), margin)
