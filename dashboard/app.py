"""emnist-tune dashboard: compare a search's trials, see the model it delivered, and predict characters
with it or any trial.

    python -m dashboard [--results results/]        (or: emnist-dashboard, make dashboard)

That launcher runs `streamlit run` on this file with the safe server settings (dashboard/safety.py).
Started any other way, the page refuses to show anything while the server listens beyond this machine.
"""

from __future__ import annotations

import streamlit as st

from dashboard import explorer, final, predictor, safety
from dashboard.common import experiment_names, results_root

st.set_page_config(page_title="emnist-tune", page_icon="✍️", layout="wide")
safety.enforce()  # stops here on a server that listens beyond this machine without --allow-remote

root = results_root()
st.sidebar.title("emnist-tune")
page = st.sidebar.radio("Page", ["Trial explorer", "Final model", "Predictor"], key="page")
names = experiment_names(root)
if not names:
    st.info(f"No experiments under the results root `{root}` yet. Run a search first: "
            "`python search/run.py --config configs/search/smoke.yaml`.")
    st.stop()
name = st.sidebar.selectbox("Experiment", names, key="experiment")

if page == "Trial explorer":
    explorer.render(root, name)
elif page == "Final model":
    final.render(root, name)
else:
    predictor.render(root, name)
