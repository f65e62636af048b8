"""Predictor page: give the search's final model (final/model.pt, offered first when there is one) or
any trial's model a character (an uploaded image or a drawing), see the 28x28 image the model
actually sees and its top-5 characters, and compare models on the same input. Its second mode,
"Read a line", reads a whole line of writing with the chosen model (dashboard/line_reader.py).

The page is a thin shell around pure functions (`read_upload`, `read_canvas` from dashboard/inputs.py,
`predict_input`, `predict_upload`, `trial_options`) so every bad-input path is unit-tested without a
browser. Nothing here raises into Streamlit for bad input: every failure becomes a message in the page.

Security: checkpoints are only ever taken from the experiment's own listing (or final/model.pt at
its fixed place under the experiment) and re-checked with `safe_checkpoint` (never a user-typed
path); uploads are read by dashboard/inputs.py (training.ink.load_image: pixel-count limit checked
before decoding, truncated/corrupt files rejected; at most safety.MAX_UPLOAD_MB); checkpoints are
read weights-only. Bind address and error details are safety.py's. This page sets no server option,
uses no raw HTML and never prints tracebacks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from dashboard import line_reader
from dashboard.common import UnsafePath, md_text, no_checkpoint_reason, open_experiment, safe_checkpoint
from dashboard.final_figures import delivered_key, final_results
from dashboard.final_summary import delivered_words, read_final
from dashboard.inputs import (  # noqa: F401 (describe_image, UPLOAD_TYPES: this page's names, as before)
    INK,
    UPLOAD_TYPES,
    InputForm,
    PageInput,
    describe_image,
    input_widgets,
    read_canvas,
    read_upload,
)
from dashboard.prediction_view import model_view, top_k_figure
from search.layout import FINAL_DIR, MODEL_FILE
from search.results import Experiment
from training.checkpoint import CheckpointError
from training.ink import ImageError
from training.predict import Prediction, Predictor
from training.preprocess import NoCharacterFound

log = logging.getLogger(__name__)

CANVAS_SIZE = 280
STROKE_WIDTH = 20  # ~7 % of the canvas: strokes come out like EMNIST's pen at 28x28
TOP_K = 5
MAX_COMPARE = 6
ONE_CHARACTER, READ_LINE = "One character", "Read a line"
CHARACTER_FORM = InputForm(
    "predictor", "Image of one character", "Upload an image of a single handwritten character.",
    "Draw one character, filling most of the square. Use the canvas toolbar to undo or clear.",
    CANVAS_SIZE, CANVAS_SIZE, STROKE_WIDTH)


# --- Trials ---------------------------------------------------------------------------------


@dataclass
class TrialOption:
    trial_id: str
    status: str
    val_acc: float | None
    checkpoint: Path | None = None  # best checkpoint of the trial, when it has one
    reason: str = ""  # why the trial cannot be used (no checkpoint)
    title: str = ""  # the final model's name on the page ("final model (refit ensemble of 3)"); trials: none
    test_acc: float | None = None

    def label(self, best: str | None = None) -> str:
        if self.title:
            return self.title + ("" if self.test_acc is None else f" · test acc {self.test_acc:.3f}")
        acc = "no val acc" if self.val_acc is None else f"val acc {self.val_acc:.3f}"
        return f"{self.trial_id} · {acc} · {self.status}" + (" · best" if self.trial_id == best else "")


# The final model's entry among the trial ids: no trial id has a "/" (trial folders are named after them).
FINAL_ID = f"{FINAL_DIR}/{MODEL_FILE}"


def _float_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(value) else value


def trial_options(exp: Experiment) -> tuple[list[TrialOption], list[TrialOption]]:
    """(trials with a checkpoint, best first; trials without one, each with the reason)."""
    available, unavailable = [], []
    for row in exp.trials.to_dict("records"):
        tid = str(row["trial_id"])
        opt = TrialOption(tid, str(row.get("status") or "unknown"), _float_or_none(row.get("best_val_acc")))
        ckpt = exp.best_checkpoint(tid) if row.get("has_checkpoint") else None
        if ckpt is None:
            opt.reason = no_checkpoint_reason(opt.status)
            unavailable.append(opt)
        else:
            opt.checkpoint = ckpt
            available.append(opt)
    best = exp.best_trial
    # Best trial first, then by validation accuracy (trials without one last), then by id.
    available.sort(key=lambda o: (o.trial_id != best, o.val_acc is None, -(o.val_acc or 0.0), o.trial_id))
    return available, unavailable


def final_option(root: Path, name: str) -> tuple[TrialOption | None, str]:
    """(the delivered model, final/model.pt, as the first choice; "") when it exists and loads,
    (None, "") when there is none, (None, why it cannot be used) when it does not load. Its name
    comes from summary.json ("refit ensemble of 3"); the file is always final/model.pt under the
    experiment, never a path named in summary.json."""
    state = read_final(root, name)
    if state.model is None:
        return None, ""
    words = delivered_words(state.final)
    key = state.kind or delivered_key(state.final)
    test_acc = next((r["accuracy"] for r in final_results(state.final) if r["key"] == key), None)
    if state.model_matches is False:  # the report is of another model.pt: its accuracy is not this file's
        test_acc, words = None, "not the model its report is about: run the final stage again"
    option = TrialOption(FINAL_ID, "final", None, checkpoint=state.model, test_acc=test_acc,
                         title=f"final model ({words})" if words else "final model")
    try:
        load_predictor(root, state.model)
    except (CheckpointError, UnsafePath, RuntimeError, ValueError, KeyError, OSError) as e:
        return None, (f"The final model (final/model.pt) cannot be used: {_hide_root(str(e), root)}. "
                      "The trials are offered instead.")
    return option, ""


@st.cache_resource(max_entries=16, show_spinner="Loading the model…")
def _cached_predictor(path: str, mtime_ns: int, size: int) -> Predictor:
    # mtime and size are part of the cache key only: a rewritten checkpoint loads afresh.
    return Predictor.from_checkpoint(path, device="cpu")


def load_predictor(root: Path, checkpoint: str | Path) -> Predictor:
    """The (cached) Predictor of a checkpoint taken from an experiment listing under root.

    Raises UnsafePath (outside root), CheckpointError (missing, unreadable, pickled objects,
    not ours), or RuntimeError/ValueError (weights that do not fit the model).
    """
    path = safe_checkpoint(root, checkpoint)
    try:
        st_ = path.stat()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}") from None
    return _cached_predictor(str(path), st_.st_mtime_ns, st_.st_size)


def _hide_root(message: str, root: Path) -> str:
    """An error message with the server's results path shortened (users know the experiment)."""
    return str(message).replace(str(root.resolve()), "<results>").replace(str(root), "<results>")


# --- Predictions ------------------------------------------------------------------------------


def predict_input(predictor: Predictor, inp: PageInput, k: int = TOP_K) -> tuple[Prediction | None, str]:
    """(prediction, "") or (None, message saying why there is none). Never raises for bad input."""
    if inp.error:
        return None, inp.error
    if inp.image is None:
        return None, "No input yet: upload an image or draw a character."
    try:
        pred = predictor.predict(inp.image, k=k)[0]
    except (ImageError, NoCharacterFound) as e:  # Predictor catches these; kept for safety
        return None, _sentence(str(e))
    except Exception as e:
        log.warning("prediction failed", exc_info=True)
        return None, f"The model could not process this input ({type(e).__name__}: {e})."
    if not pred.found:
        return None, _sentence(pred.message or "no character found")
    return pred, ""


def predict_upload(predictor: Predictor, data: bytes, k: int = TOP_K) -> tuple[Prediction | None, str]:
    """Uploaded bytes -> (prediction, notes on how the image was read) or (None, why not)."""
    inp = read_upload(data)
    pred, message = predict_input(predictor, inp, k)
    notes = " ".join(inp.notes)
    if pred is None:
        return None, f"{message} {notes}".strip()
    return pred, notes


def _sentence(message: str) -> str:
    message = message.strip()
    if message.lower().startswith("no character found"):
        message = "No character found" + message[len("no character found"):]
    return message if message.endswith(".") else message + "."


def _code(text: str, limit: int = 40) -> str:
    """Inline code for text from files on disk (class names, trial ids), so it can never be markdown."""
    text = " ".join(str(text).split())[:limit].replace("`", "'")
    return f"`{text}`"


def _error(message: str) -> None:
    st.error(message, icon="⚠️")


# --- Page -------------------------------------------------------------------------------------


def render(root: Path, name: str) -> None:
    st.header("Predictor")
    try:
        exp = open_experiment(root, name)
    except (UnsafePath, OSError, ValueError) as e:
        _error(f"Cannot open experiment {name!r}: {_hide_root(str(e), root)}")
        return

    if exp.refused:
        st.warning(f"{len(exp.refused)} trial folder(s) lead outside the results root and were not read: "
                   + ", ".join(md_text(t) for t in sorted(exp.refused)[:10]) + ("…" if len(exp.refused) > 10 else ""))
    available, unavailable = trial_options(exp)
    final, final_problem = final_option(root, name)
    if final_problem:
        st.warning(final_problem, icon="⚠️")
    if final is not None:
        available = [final, *available]  # what the search delivered comes first, then the best trial
    best = exp.best_trial
    if not available:
        _error(f"No trial of experiment {_code(name)} has a checkpoint yet, so there is no model to predict with.")
        _unavailable_list(unavailable)
        return

    by_id = {o.trial_id: o for o in available}
    ids = list(by_id)
    trial_id = st.selectbox("Trial", ids, index=0, key=f"predictor_trial:{name}",
                            format_func=lambda t: by_id[t].label(best),
                            help="The search's final model comes first (when it has one), then the best trial; only "
                                 "trials with a saved checkpoint can predict.")
    _unavailable_list(unavailable)
    chosen = by_id[trial_id]
    mode = st.radio("Mode", [ONE_CHARACTER, READ_LINE], horizontal=True, key="predictor_mode",
                    help="One character: its 28×28 image and top-5. Read a line: a word or a few, cut into "
                         "characters, read by the same model and corrected with a word list.")
    if mode == READ_LINE:
        line_reader.render(lambda: _load_or_report(root, chosen))
        return

    left, right = st.columns([1, 2], gap="large")
    with left:
        inp = input_widgets(CHARACTER_FORM)
    with right:
        predictor = _load_or_report(root, chosen)
        pred = None
        if predictor is not None:
            pred = _show_prediction(predictor, inp)

    st.divider()
    st.subheader("Compare trials")
    default = ids[: min(3, len(ids))]
    # Widget keys carry the experiment, so switching experiments starts from its own defaults.
    compare = st.multiselect("Trials to compare on the same input", ids, default=default,
                             key=f"predictor_compare:{name}", format_func=lambda t: by_id[t].label(best),
                             max_selections=MAX_COMPARE)
    if not compare:
        st.caption("Pick trials above to see their predictions side by side.")
    elif not inp.ok:
        st.caption("Give the page an input (upload or drawing) to compare trials on it.")
    elif pred is None and predictor is not None:
        st.caption("Nothing to compare: the input has no usable character.")
    else:
        _compare(root, [by_id[t] for t in compare], inp, best)


def _unavailable_list(unavailable: list[TrialOption]) -> None:
    if not unavailable:
        return
    with st.expander(f"{len(unavailable)} trial(s) unavailable (no checkpoint)"):
        for o in unavailable:
            st.markdown(f"- {_code(o.trial_id)} ({o.status}): {o.reason}")


def _load_or_report(root: Path, option: TrialOption) -> Predictor | None:
    try:
        return load_predictor(root, option.checkpoint)
    except (CheckpointError, UnsafePath, RuntimeError, ValueError, KeyError, OSError) as e:
        what = "The final model" if option.title else f"Trial {_code(option.trial_id)}"
        _error(f"{what} cannot be used: its checkpoint could not be loaded "
               f"({_hide_root(str(e), root)}). Pick another trial.")
        return None


def _show_prediction(predictor: Predictor, inp: PageInput) -> Prediction | None:
    for note in inp.notes:
        st.info(note, icon="ℹ️")
    if not inp.ok and not inp.error:
        st.info("Upload an image or draw a character to see what the model predicts.")
        return None
    pred, message = predict_input(predictor, inp)
    if pred is None:
        _error(message)
        return None
    char, prob = pred.top[0]
    st.markdown(f"### Prediction: {_code(char)} ({prob:.1%})")
    a, b = st.columns([1, 2])
    with a:
        st.image(model_view(pred.image), caption="What the model sees (28×28)")
    with b:
        st.plotly_chart(top_k_figure(pred.top, title=f"Top {len(pred.top)}"), key="predictor_topk",
                        config={"displayModeBar": False})
    return pred


def _compare(root: Path, options: list[TrialOption], inp: PageInput, best: str | None) -> None:
    cols = st.columns(len(options))
    for col, option in zip(cols, options, strict=True):
        with col:
            acc = "" if option.val_acc is None else f" · val {option.val_acc:.3f}"
            if option.test_acc is not None:
                acc = f" · test {option.test_acc:.3f}"
            title = md_text(option.title, 60) if option.title else _code(option.trial_id)
            st.markdown(f"**{title}**{acc}" + (" · best" if option.trial_id == best else ""))
            predictor = _load_or_report(root, option)
            if predictor is None:
                continue
            pred, message = predict_input(predictor, inp)
            if pred is None:
                _error(message)
                continue
            char, prob = pred.top[0]
            st.markdown(f"Top-1: {_code(char)} ({prob:.1%})")
            st.plotly_chart(top_k_figure(pred.top, height=200), key=f"predictor_cmp_{option.trial_id}",
                            config={"displayModeBar": False})
