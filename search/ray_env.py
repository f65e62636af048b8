"""Ray's settings for this project, as environment variables: imported (by search/tuner.py) before
Ray itself, since Ray reads some of them when it is imported. A variable the user set wins."""

import os

# Our trials write their own TensorBoard events; Ray's automatic TBX logger would duplicate
# them, so the default loggers are switched off and JSON + CSV are added back explicitly.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 then means silent: Progress prints instead
# Checkpointing every epoch with num_to_keep=2 snapshots the experiment often; that is intended.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# The experiment state (what --resume restores) every second, not every 10+ s: a new trial waits
# for the snapshot that names it before it writes anything (search.repairs.wait_until_recorded).
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
