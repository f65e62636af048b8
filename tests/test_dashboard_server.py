"""The dashboard's server settings hold wherever it is started from: the launcher (`python -m
dashboard`, `emnist-dashboard`, `make dashboard`) passes them as flags and listens on loopback only
unless told otherwise; app.py itself refuses to serve on any other address without that opt-in and
tightens what a running app can change."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from streamlit import config
from streamlit.testing.v1 import AppTest

from dashboard import __main__ as launcher
from dashboard.common import ENV_RESULTS
from dashboard.safety import ALLOW_REMOTE_ENV, MAX_UPLOAD_MB, is_loopback

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "dashboard" / "app.py")


# ---------------------------------------------------------------- the launcher


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True), ("[::1]", True),
    (None, False), ("", False), ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("example.org", False),
])
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_launcher_passes_the_safe_settings(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_REMOTE_ENV, "1")  # inherited from somewhere: not an opt-in
    monkeypatch.chdir(tmp_path)
    cmd, env = launcher.build_command(launcher.parse_args(["--results", "res", "--port", "9999"]))
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", APP]
    assert flag(cmd, "--server.address") == "127.0.0.1" and flag(cmd, "--server.port") == "9999"
    assert flag(cmd, "--server.maxUploadSize") == str(MAX_UPLOAD_MB)
    assert flag(cmd, "--client.showErrorDetails") == "none"
    assert flag(cmd, "--browser.gatherUsageStats") == "false"
    assert flag(cmd, "--server.headless") == "true"
    assert flag(cmd, "--client.toolbarMode") == "viewer"  # no "Deploy" button or developer menu
    assert cmd[-3:] == ["--", "--results", str(tmp_path / "res")]  # absolute: the cwd does not matter
    assert ALLOW_REMOTE_ENV not in env

    cmd, env = launcher.build_command(launcher.parse_args(["--host", "0.0.0.0", "--allow-remote"]))
    assert flag(cmd, "--server.address") == "0.0.0.0" and env[ALLOW_REMOTE_ENV] == "1"
    assert "--results" not in cmd


def test_launcher_refuses_a_network_address_without_opt_in(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dashboard", "--host", "0.0.0.0"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2, r.stderr
    assert "--allow-remote" in r.stderr and "0.0.0.0" in r.stderr


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["emnist-dashboard"] == "dashboard.__main__:main"
    assert launcher.main is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> list[str]:
    """Local addresses of the sockets listening on a TCP port (from /proc/net/tcp and tcp6)."""
    found = []
    for name, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            host, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(host)
            # /proc stores each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, raw))
    return found


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if is_loopback(address) else address


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening sockets from /proc/net")
def test_launcher_from_another_folder_listens_on_loopback_only(tmp_path, tiny_experiment):
    """Started in a folder without .streamlit/config.toml, the server still binds 127.0.0.1 only."""
    port = _free_port()
    assert not (tmp_path / ".streamlit").exists()
    env = {k: v for k, v in os.environ.items() if k not in (ENV_RESULTS, ALLOW_REMOTE_ENV)}
    env["PYTHONPATH"] = str(REPO)
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dashboard", "--results", str(tiny_experiment), "--port",
                                 str(port)], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        assert _listening(port) == ["127.0.0.1"], (_listening(port), log.read_text())
        outward = _outward_address()
        if outward is not None:  # from the network side, nobody answers
            with pytest.raises(OSError), socket.create_connection((outward, port), timeout=3):
                pass
        # the launcher became the server (exec): the server's own command line has the settings
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--server.maxUploadSize" in cmdline and b"--client.showErrorDetails" in cmdline
        assert cmdline[cmdline.index(b"--client.toolbarMode") + 1] == b"viewer"
        assert b"Collecting usage statistics" not in log.read_bytes()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# ---------------------------------------------------------------- the page itself (AppTest)


@pytest.fixture
def option():
    """Set Streamlit config options for one test (AppTest runs app.py in this process)."""
    saved = {}

    def set_option(key, value):
        saved.setdefault(key, config.get_option(key))
        config.set_option(key, value)

    yield set_option
    for key, value in saved.items():
        config.set_option(key, value)


@pytest.fixture
def results(tiny_experiment, tmp_path):
    root = tmp_path / "results"
    shutil.copytree(tiny_experiment / "tiny", root / "tiny")
    return root


def _page(monkeypatch, root: Path) -> AppTest:
    monkeypatch.setenv(ENV_RESULTS, str(root))
    return AppTest.from_file(APP, default_timeout=60).run()


@pytest.mark.parametrize("address", [None, "0.0.0.0", "::", "192.0.2.2"])
def test_page_refuses_a_network_address_without_opt_in(monkeypatch, option, results, address):
    """`streamlit run /path/to/dashboard/app.py` from a folder without the config (every interface),
    or with --server.address 0.0.0.0: the page says why and shows nothing of the experiments."""
    monkeypatch.delenv(ALLOW_REMOTE_ENV, raising=False)
    option("server.address", address)
    at = _page(monkeypatch, results)
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "not served here" in errors[0] and "python -m dashboard" in errors[0]
    assert not at.dataframe and not at.sidebar.radio and not at.get("plotly_chart")


@pytest.mark.parametrize(("address", "allow"), [("127.0.0.1", False), ("localhost", False), ("0.0.0.0", True)])
def test_page_serves_on_loopback_or_with_opt_in(monkeypatch, option, results, address, allow):
    if allow:
        monkeypatch.setenv(ALLOW_REMOTE_ENV, "1")
    else:
        monkeypatch.delenv(ALLOW_REMOTE_ENV, raising=False)
    option("server.address", address)
    at = _page(monkeypatch, results)
    assert not at.exception and not at.error
    assert [d for d in at.dataframe if "trial_id" in d.value.columns]


def test_page_tightens_what_a_running_app_can_change(monkeypatch, option, results):
    """A server started with Streamlit's defaults (200 MB uploads, error details, usage statistics):
    the app turns them down itself (the upload handler reads the limit on every request)."""
    option("server.address", "127.0.0.1")
    option("server.maxUploadSize", 200)
    option("client.showErrorDetails", "full")
    option("browser.gatherUsageStats", True)
    option("client.toolbarMode", "developer")
    at = _page(monkeypatch, results)
    assert not at.exception and not at.error
    assert config.get_option("server.maxUploadSize") == MAX_UPLOAD_MB
    assert config.get_option("client.showErrorDetails") == "none"
    assert config.get_option("browser.gatherUsageStats") is False
    assert config.get_option("client.toolbarMode") == "viewer"
    at.sidebar.radio[0].set_value("Predictor").run()
    assert at.file_uploader(key="predictor_upload").proto.max_upload_size_mb == MAX_UPLOAD_MB
