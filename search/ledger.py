"""Where a command's time went: each driver session's seconds by phase, kept in `<exp>/budget.json` as it runs.

The driver (search/run.py) opens a `Ledger` when it starts, moves it from phase to phase (start-up, search,
summary, final stage) and writes it every few seconds, so that a session that is killed outright still counts up
to its last heartbeat and `--resume` continues with what is left of a time budget. The summary, the last lines
printed and the report say where the time went (`spending_lines`); the dashboard reads a running search's
(`read_budget`). No Ray, no torch.
"""

from __future__ import annotations

import math
import time

from search.budget import clock

BUDGET_FILE = "budget.json"  # <exp>/budget.json: the budget and each driver session's phases, kept up to date
PHASES = ("startup", "search", "summary", "final")
HEARTBEAT_S = 5.0


def process_start() -> float:
    """When this process started (time.time()), so that a budget counts the interpreter's and the imports'
    seconds too; Linux reads it from /proc, elsewhere it is now."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        import os

        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class Ledger:
    """A driver session's seconds by phase, written to <exp>/budget.json every few seconds (atomically), so that a
    session that is killed outright still counts up to its last heartbeat: --resume then continues with what is
    left of the budget. Earlier sessions' records are kept; a damaged file counts as no earlier session (and is
    set aside)."""

    def __init__(self, exp_dir, budget_s: float | None, started: float | None = None):
        from pathlib import Path

        self.path = Path(exp_dir) / BUDGET_FILE
        self.budget_s = budget_s
        self.started = started if started is not None else process_start()
        self.phases: dict[str, float] = {}
        self._phase, self._since = "startup", self.started
        self.earlier = self._read_earlier()
        self._stop = None

    def _read_earlier(self) -> list[dict]:
        import json

        from search.layout import set_aside

        if not self.path.exists() and not self.path.is_symlink():
            return []
        try:
            value = json.loads(self.path.read_bytes()) if not self.path.is_symlink() else None
            sessions = value.get("sessions") if isinstance(value, dict) else None
            if isinstance(sessions, list) and all(isinstance(s, dict) and _seconds(s.get("seconds")) is not None
                                                  for s in sessions):
                return sessions
        except (OSError, ValueError, RecursionError):
            pass
        try:
            set_aside(self.path, self.path.parent, "cannot be read (earlier sessions' time is not counted)")
        except OSError:
            pass
        return []

    @property
    def spent_before(self) -> float:
        return sum(float(s["seconds"]) for s in self.earlier)

    def elapsed(self) -> float:
        return time.time() - self.started

    def left(self) -> float | None:
        """Seconds of the budget left now (None: no budget)."""
        return None if self.budget_s is None else self.budget_s - self.spent_before - self.elapsed()

    def enter(self, phase: str) -> None:
        now = time.time()
        self.phases[self._phase] = self.phases.get(self._phase, 0.0) + now - self._since
        self._phase, self._since = phase, now
        self.write()

    def record(self) -> dict:
        now = time.time()
        phases = {**self.phases, self._phase: self.phases.get(self._phase, 0.0) + now - self._since}
        return {"started": self.started, "seconds": now - self.started, "phases": phases}

    def write(self) -> None:
        import json

        from training.fileio import write_atomic

        data = {"budget_s": self.budget_s, "sessions": [*self.earlier, self.record()]}
        try:
            write_atomic(self.path, lambda f: f.write(json.dumps(data, indent=1).encode()))
        except OSError:  # a report: never the reason a search stops
            pass

    def start_heartbeat(self) -> None:
        import threading

        self._stop = threading.Event()

        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                self.write()

        threading.Thread(target=beat, name="budget-heartbeat", daemon=True).start()

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()
        self.write()

    def summary(self) -> dict:
        """How the budget was spent, over every session: seconds by phase, in all, and what is left (idle)."""
        sessions = [*self.earlier, self.record()]
        phases: dict[str, float] = {}
        for s in sessions:
            for k, v in (s.get("phases") or {}).items():
                if _seconds(v) is not None:
                    phases[k] = phases.get(k, 0.0) + float(v)
        spent = sum(float(s["seconds"]) for s in sessions)
        out = {"budget_s": self.budget_s, "spent_s": spent, "sessions": len(sessions), "phases": phases}
        if self.budget_s is not None:
            out["left_s"] = self.budget_s - spent
        return out


def _seconds(v) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 else None


def spending_lines(s: dict) -> list[str]:
    """The budget's spending, for the last lines a search prints and for the report."""
    order = [p for p in PHASES if p in s["phases"]] + [p for p in s["phases"] if p not in PHASES]
    parts = ", ".join(f"{p} {clock(s['phases'][p])}" for p in order)
    head = f"time budget {clock(s['budget_s'])}: " if s.get("budget_s") else "time: "
    tail = f"; {clock(s['left_s'])} left" if s.get("left_s", -1) >= 0 else (
        f"; {clock(-s['left_s'])} over" if "left_s" in s else "")
    over = f" over {s['sessions']} sessions" if s["sessions"] > 1 else ""
    return [f"{head}spent {clock(s['spent_s'])}{over} ({parts}){tail}"]


def read_budget(exp_dir, now: float | None = None) -> dict | None:
    """A budgeted experiment's time as a reader (the dashboard) sees it: {budget_s, spent_s, left_s, running},
    `running` while its driver's heartbeat is fresh (the session still counts on); None without a budget or with a
    budget.json that is not one (never raises)."""
    import json
    from pathlib import Path

    path = Path(exp_dir) / BUDGET_FILE
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 2**20:
            return None
        value = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    total = _seconds(value.get("budget_s")) if isinstance(value, dict) else None
    sessions = value.get("sessions") if isinstance(value, dict) else None
    if not total or not isinstance(sessions, list) or not sessions:
        return None
    if not all(isinstance(x, dict) and _seconds(x.get("seconds")) is not None for x in sessions):
        return None
    now = time.time() if now is None else now
    spent = sum(float(x["seconds"]) for x in sessions)
    last, started = sessions[-1], _seconds(sessions[-1].get("started"))
    # a session whose last beat is fresh is still running: its seconds go on counting until now
    running = started is not None and 0 <= now - (started + float(last["seconds"])) <= 3 * HEARTBEAT_S
    if running:
        spent += now - (started + float(last["seconds"]))
    return {"budget_s": total, "spent_s": spent, "left_s": total - spent, "running": running}
