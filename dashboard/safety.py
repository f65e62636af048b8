"""The dashboard's server settings, enforced wherever it is started from.

`python -m dashboard` / `emnist-dashboard` (dashboard/__main__.py) passes them to Streamlit as
flags, so they hold in any folder (`.streamlit/config.toml` is read only from the current one).
`enforce()`, the first thing app.py does, covers a plain `streamlit run .../dashboard/app.py`
started elsewhere: it refuses to show anything when the server listens on a non-loopback
address (or on every interface, Streamlit's default) unless the launcher was told so with
`--allow-remote`, and it tightens at run time what Streamlit lets a running app change.
"""

from __future__ import annotations

import ipaddress
import os

MAX_UPLOAD_MB = 5  # characters are small images
ALLOW_REMOTE_ENV = "EMNIST_DASHBOARD_ALLOW_REMOTE"  # "1": a non-loopback address was asked for deliberately
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501
# Streamlit options and the values the dashboard runs with (flags of `streamlit run`).
SAFE_OPTIONS = {
    "server.maxUploadSize": str(MAX_UPLOAD_MB),
    "client.showErrorDetails": "none",  # no tracebacks in the browser
    "browser.gatherUsageStats": "false",
    "server.headless": "true",  # no browser opened on the server, no e-mail prompt
    "server.fileWatcherType": "none",  # a served app does not rerun on source edits
    "client.toolbarMode": "viewer",  # no "Deploy" button or developer menu for the users
}


def is_loopback(address: str | None) -> bool:
    """Whether a bind address reaches this machine only: 127.0.0.0/8, ::1 or "localhost".
    None or "" (Streamlit's default: every interface), 0.0.0.0, :: and any other address or
    host name are not."""
    if not address:
        return False
    address = address.strip().strip("[]")
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def remote_allowed() -> bool:
    return os.environ.get(ALLOW_REMOTE_ENV) == "1"


REFUSAL = (
    "This dashboard is not served here: the server listens on {where}, so anyone who can reach this "
    "machine could use it, and it has no login. Start it with `python -m dashboard` (or "
    "`emnist-dashboard`), which listens on 127.0.0.1 only. To share it on purpose: "
    "`python -m dashboard --host 0.0.0.0 --allow-remote`."
)


def enforce() -> None:
    """In the running app: refuse a non-loopback bind without the opt-in (st.error + st.stop), then
    tighten the options a running app can change: error details off, usage statistics off, the toolbar
    in viewer mode (read when a browser session starts), and the upload limit (Streamlit's upload
    handler reads it on every request) down to MAX_UPLOAD_MB."""
    import streamlit as st
    from streamlit import config

    address = config.get_option("server.address")
    if not is_loopback(address) and not remote_allowed():
        where = f"address {address}" if address else "every network interface (Streamlit's default)"
        st.error(REFUSAL.format(where=where))
        st.stop()
    if config.get_option("client.showErrorDetails") != "none":
        st.set_option("client.showErrorDetails", "none")
    if config.get_option("client.toolbarMode") != "viewer":
        config.set_option("client.toolbarMode", "viewer")
    if config.get_option("browser.gatherUsageStats"):
        config.set_option("browser.gatherUsageStats", False)
    limit = config.get_option("server.maxUploadSize")
    if not isinstance(limit, int) or limit > MAX_UPLOAD_MB:
        config.set_option("server.maxUploadSize", MAX_UPLOAD_MB)
