"""The final stage's report, rendered from its one record (search.final_report.FinalReport): final/report.md (every
test figure, the selection on validation, the refit, the problems), the lines printed at the end, and the picture
of the most confused pairs (search/final.py, step 4)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from search.layout import FINAL_DIR, MODEL_FILE, PAIRS_IMAGE
from search.selection import SIGNIFICANT_P
from training.fileio import write_atomic

if TYPE_CHECKING:
    import torch

    from search.final_report import FinalReport


def confused_pairs_image(path: Path, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, classes: list[str],
                         pairs: list[dict], per_side: int = 6, scale: int = 2) -> Path:
    """One row per confused pair: test images of a read as b, then of b read as a (as the model
    saw them, upright), labelled."""
    from PIL import Image, ImageDraw

    cell, label_w = 28 * scale + 4, 150
    rows = max(1, len(pairs))
    img = Image.new("RGB", (label_w + cell * (2 * per_side + 1), cell * rows + 4), "white")
    draw = ImageDraw.Draw(img)
    index = {c: i for i, c in enumerate(classes)}
    for r, p in enumerate(pairs):
        a, b = index[p["a"]], index[p["b"]]
        top = 2 + r * cell
        draw.text((4, top + 4), f"{p['a']} read as {p['b']}: {p['a_as_b']}", fill="black")
        draw.text((4, top + cell // 2), f"{p['b']} read as {p['a']}: {p['b_as_a']}", fill="black")
        for side, (t, q) in enumerate(((a, b), (b, a))):
            hits = ((y == t) & (pred == q)).nonzero().flatten()[:per_side].tolist()
            for j, i in enumerate(hits):
                glyph = Image.fromarray((255 - x[i].numpy()).astype("uint8")).resize((28 * scale, 28 * scale))
                img.paste(glyph, (label_w + (side * (per_side + 1) + j) * cell, top))
    if not pairs:
        draw.text((4, 10), "no confusions", fill="black")
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return write_atomic(path, lambda f: f.write(buf.getvalue()))


def _row(name: str, r: dict | None) -> str:
    if not r:
        return f"| {name} | - | - | - |"
    lo, hi = r["ci95"]
    return f"| {name} | {r['label']} | {r['accuracy']:.4f} | [{lo:.4f}, {hi:.4f}] |"


def _tta_sentence(tta: dict | None) -> str:
    if not tta or tta.get("val_acc") is None:
        return "Test-time augmentation: not tried (--tta off). "
    return (f"Test-time augmentation ({tta['views']} views of each image, averaged): val accuracy "
            f"{tta['val_acc']:.4f} against {tta['val_acc_without']:.4f} without, so "
            f"{'used' if tta['used'] else 'not used'}. ")


def _refit_sentence(refit: dict) -> str:
    seconds = [m["seconds"] for m in refit["members"] if m.get("seconds")]
    if seconds:  # a time budget's refit: timed runs
        return (f"Refit: {len(refit['members'])} model(s) on train + validation, each trained for "
                f"{max(seconds):.0f} s (the time budget's share), its schedule spread over that time.")
    if not refit["members"] and refit.get("budget"):
        return "Refit: none (the time budget left less time for it than the search gave its trials)."
    return f"Refit: {refit['seeds']} seed(s) per config, on train + validation, epochs: {refit['epochs_mode']}."


def write_report(path: Path, name: str, report: FinalReport) -> Path:
    t = report.test
    sel = report.selection
    lines = [f"# {name}: final model", "",
             f"Delivered: `{report.model or 'none'}` ({report.delivered}), sha256 `{report.model_sha256}`.",
             "", f"Every test figure here is computed in {report.test_precision} "
             "(training.evaluate: one precision for every test figure of the experiment).", "",
             f"## Test accuracy ({next(iter(t.values()))['n'] if t else 0} test images, 95 % Wilson interval)", "",
             "| model | what | test accuracy | 95 % interval |", "| --- | --- | --- | --- |",
             _row("best single trial", t.get("single")), _row("ensemble of search checkpoints", t.get("ensemble")),
             _row("refit (delivered)", t.get("refit")), "",
             *([] if t.get("refit") else [f"No refit finished: delivered {report.delivered}, test accuracy "
                                          f"{report.delivered_test['accuracy']:.4f}.", ""]),
             "The test split was read once, for this table. Everything was chosen on the validation split:", "",
             "## Selection on the validation split", "",
             f"{sel['n_val']} validation images; an ensemble is kept only where it beats the best single model"
             + (f" beyond chance (McNemar p < {SIGNIFICANT_P}: under a time budget on CPUs the refit's models share "
                "the cores)." if sel.get("p_by_k") else "."), "",
             "| k (top trials averaged) | val accuracy |" + (" McNemar p vs k = 1 |" if sel.get("p_by_k") else ""),
             "| --- | --- |" + (" --- |" if sel.get("p_by_k") else ""),
             *[f"| {k} | {v:.4f} |" + (f" {sel['p_by_k'].get(k, 1.0):.3g} |" if sel.get("p_by_k") else "")
               for k, v in sel["val_acc_by_k"].items()], "",
             f"Chosen: k = {sel['chosen_k']} ({'ensemble' if sel['ensemble_pays'] else 'single model'}). "
             + _tta_sentence(sel.get("tta")) +
             _refit_sentence(report.refit), ""]
    if report.problems:
        lines += ["## Problems", "", *[f"- {p}" for p in report.problems], ""]
    lines += ["## Top trials on the test split", "", "| trial | val accuracy | test accuracy | 95 % interval |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {r['trial_id']} | {r['val_acc']:.4f} | {r['accuracy']:.4f} | "
              f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}] |" for r in report.test_trials]
    main = report.delivered_test
    if main:
        lines += ["", f"## Most confused pairs ({main['label']})", "", f"![confused pairs]({PAIRS_IMAGE})", "",
                  "| pair | mistakes | a read as b | b read as a |", "| --- | --- | --- | --- |",
                  *[f"| {p['a']} / {p['b']} | {p['count']} | {p['a_as_b']} | {p['b_as_a']} |"
                    for p in main["most_confused"]],
                  "", f"## Per class ({main['label']})", "", "| class | precision | recall | F1 | support |",
                  "| --- | --- | --- | --- | --- |",
                  *[f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
                    for r in main["per_class"]]]
    write_atomic(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return path


def print_final(report: FinalReport) -> None:
    """The final stage's last lines: each tested model's test accuracy, the delivered one marked, and the problems."""
    print("test accuracy, 95 % interval (the test split is read only here):")
    for key in ("single", "ensemble", "refit"):
        r = report.test.get(key)
        if r:
            lo, hi = r["ci95"]
            mark = f"  <- delivered ({FINAL_DIR}/{MODEL_FILE})" if key == report.delivered_kind else ""
            print(f"  {r['accuracy']:.4f}  [{lo:.4f}, {hi:.4f}]  {key:8s}  {r['label']}{mark}")
    if "refit" not in report.test:
        r = report.delivered_test
        print(f"  {r['accuracy']:.4f}  [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]  delivered: {report.delivered}")
    for p in report.problems:
        print(f"  problem: {p}")
