"""Start the dashboard with its safe settings, from any folder:

    python -m dashboard [--results DIR] [--port 8501] [--host 127.0.0.1 [--allow-remote]]
    emnist-dashboard ...                       (the same, as an installed console script)

Runs `streamlit run <this package>/app.py` listening on 127.0.0.1 with uploads up to 5 MB, no
error details in the browser and no usage statistics (dashboard/safety.py), whatever the current
folder and its .streamlit/config.toml say. Another --host that is not a loopback address (e.g.
0.0.0.0 to share the dashboard on the network) is refused unless --allow-remote is given too:
the dashboard has no login, and anyone who reaches the port can read the experiments.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from dashboard.safety import ALLOW_REMOTE_ENV, DEFAULT_HOST, DEFAULT_PORT, SAFE_OPTIONS, is_loopback

APP = Path(__file__).resolve().parent / "app.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dashboard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=None, metavar="DIR",
                   help="results root with the experiments (default: $EMNIST_TUNE_RESULTS, else results/ in the repo)")
    p.add_argument("--host", default=DEFAULT_HOST, metavar="ADDR",
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other than a loopback address: the dashboard has no login, so anyone "
                        "who can reach the port sees the experiments and can run the models")
    return p.parse_args(argv)


def build_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """(the `streamlit run` command line, its environment) for parsed arguments."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", args.host,
           "--server.port", str(args.port)]
    for key, value in SAFE_OPTIONS.items():
        cmd += [f"--{key}", value]
    if args.results:
        cmd += ["--", "--results", str(Path(args.results).expanduser().resolve())]
    env = {k: v for k, v in os.environ.items() if k != ALLOW_REMOTE_ENV}
    if args.allow_remote and not is_loopback(args.host):
        env[ALLOW_REMOTE_ENV] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per prediction: the server stays responsive
    return cmd, env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not is_loopback(args.host) and not args.allow_remote:
        print(f"refusing to listen on {args.host!r}: that is not a loopback address, so anyone who can reach "
              "this machine could use the dashboard (it has no login). Add --allow-remote to do it anyway, "
              f"or leave --host out ({DEFAULT_HOST}).", file=sys.stderr)
        return 2
    cmd, env = build_command(args)
    if not is_loopback(args.host):
        print(f"warning: serving on {args.host}:{args.port} to anyone who can reach it (--allow-remote)",
              file=sys.stderr)
    if os.name == "posix":  # become the server: signals (Ctrl+C, kill) reach it directly
        os.execve(cmd[0], cmd, env)
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
