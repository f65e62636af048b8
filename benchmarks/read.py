"""Reading lines of handwriting (Predictor.read, training/reading.py) on lines made from EMNIST's own characters,
against the same model on the same character images given one at a time: what segmentation costs.

    python -m benchmarks.read --model results/NAME --data-dir ../shared/emnist [--lines 200] [--seed 0]
                              [--split test|train] [--heights 32,48,64] [--json out.json]

How the lines are made (benchmarks/lines.py, seeded: line i depends on --seed and i only): 1 to 5 words a line,
each drawn uniformly from the --vocab commonest words of 2 to 12 letters of the English lexicon (symspellpy's list,
training/lexicon.py), so every word is a real one and in the lexicon; a share of lines starts with a capital.
Each letter is one image of its class from --split (`test` by default; `train` to tune the decoder without ever
looking at test), scaled with jitter, on a jittered baseline, with random gaps, some touching or overlapping
(--touch), the line slanted, dark ink on white at the line's character height (the --heights in turn), with noise.
The images placed are exactly the ones the isolated figure classifies (Predictor.probabilities on the 28x28
image; "through preprocess" runs them through Predictor.predict as a user's picture of one character).

Every comparison is case-insensitive (EMNIST Balanced cannot tell many cases apart). CER: the edit distance between
the line read and the line written over the written line's length, spaces included; "letters only" leaves the
spaces out of both, in the isolated figure's units. Word accuracy: written words matched exactly by an optimal
alignment of the words read. Times: Predictor.read after the model and lexicon are loaded, one line at a time on
the CPU; the share of segmentation (training/segment.py) and of the model is measured inside the same calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.lines import MadeLine, glyph_bank, make_line
from training.checkpoint import CheckpointError, load_checkpoint
from training.data import read_split
from training.decoder import edits
from training.ensemble import TestTimeAugment
from training.lexicon import load_lexicon
from training.predict import Predictor, resolve_model

MIN_LETTERS, MAX_LETTERS = 2, 12


@dataclass
class Sample:
    line: MadeLine
    glyphs: list[int]  # the index in the split of each character placed, in text order
    height: int
    in_lexicon: list[bool]  # per word


# -- making the lines -----------------------------------------------------------------------------------------


def vocabulary(counts: dict[str, int], size: int, chars: set[str]) -> list[str]:
    """The `size` commonest words of MIN_LETTERS..MAX_LETTERS ASCII letters that the split can write."""
    ok = [w for w in counts if MIN_LETTERS <= len(w) <= MAX_LETTERS and w.isascii() and w.isalpha()
          and set(w) <= chars]
    ok.sort(key=lambda w: (-counts[w], w))
    return ok[:size]


def _non_word(rng: np.random.Generator, counts: dict[str, int]) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    while True:
        w = "".join(rng.choice(list(letters), int(rng.integers(3, 9))))
        if w not in counts:
            return w


def make_sample(bank: dict[str, list[int]], words: list[str], rng: np.random.Generator, x: np.ndarray, height: int,
                touch: float, slant: tuple[float, float], noise: float, capital: float,
                in_lexicon: list[bool] | None = None) -> Sample:
    """One line of `words`, each letter an image of the split chosen at random; the chosen indexes recorded."""
    if words and rng.random() < capital:
        words = [words[0][:1].upper() + words[0][1:], *words[1:]]
    text = " ".join(words)
    picked = [bank[c][int(rng.integers(len(bank[c])))] for c in text if c != " "]
    line = make_line([[x[i]] for i in picked], text, rng, height=height, touch=touch,
                     slant=float(rng.uniform(*slant)), noise=noise)
    return Sample(line, picked, height, in_lexicon if in_lexicon is not None else [True] * len(words))


def make_samples(bank, vocab: list[str], x: np.ndarray, n: int, seed: int, heights: list[int], touch: float,
                 slant: tuple[float, float], noise: float, capital: float = 0.3, oov: float = 0.0,
                 counts: dict[str, int] | None = None) -> list[Sample]:
    """n lines of 1 to 5 words; line i from its own generator (seed, i), at heights[i % len(heights)]. oov: the
    share of words replaced by random letters that are not in the lexicon."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        words, known = [], []
        for _ in range(int(rng.integers(1, 6))):
            if oov and rng.random() < oov:
                words.append(_non_word(rng, counts or {}))
                known.append(False)
            else:
                words.append(vocab[int(rng.integers(len(vocab)))])
                known.append(True)
        out.append(make_sample(bank, words, rng, x, heights[i % len(heights)], touch, slant, noise, capital, known))
    return out


def ten_letter_samples(bank, vocab: list[str], x: np.ndarray, n: int, seed: int, heights: list[int], touch: float,
                       slant: tuple[float, float], noise: float) -> list[Sample]:
    """n lines of exactly 10 letters (one to three words), for the latency of a 10-character line."""
    by_len: dict[int, list[str]] = {}
    for w in vocab:
        by_len.setdefault(len(w), []).append(w)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 1_000_003, i])
        while True:
            parts = int(rng.integers(1, 4))
            cuts = sorted(rng.choice(np.arange(1, 10), parts - 1, replace=False).tolist())
            lengths = np.diff([0, *cuts, 10]).tolist()
            if all(n_ in by_len for n_ in lengths):
                break
        words = [by_len[n_][int(rng.integers(len(by_len[n_])))] for n_ in lengths]
        out.append(make_sample(bank, words, rng, x, heights[i % len(heights)], touch, slant, noise, 0.0))
    return out


# -- scoring --------------------------------------------------------------------------------------------------


def matched_words(ref: list[str], hyp: list[str]) -> list[bool]:
    """For each written word, whether an optimal alignment (fewest edits, then most matches) matches it exactly."""
    n, m = len(ref), len(hyp)
    # cost[i][j] = (edits, -matches) of ref[:i] against hyp[:j]
    cost = [[(j, 0) for j in range(m + 1)]] + [[(i, 0)] + [(0, 0)] * m for i in range(1, n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            same = ref[i - 1] == hyp[j - 1]
            diag = cost[i - 1][j - 1]
            cost[i][j] = min((diag[0] + (not same), diag[1] - same), (cost[i - 1][j][0] + 1, cost[i - 1][j][1]),
                             (cost[i][j - 1][0] + 1, cost[i][j - 1][1]))
    hit = [False] * n
    i, j = n, m
    while i > 0 and j > 0:
        same = ref[i - 1] == hyp[j - 1]
        diag = cost[i - 1][j - 1]
        if cost[i][j] == (diag[0] + (not same), diag[1] - same):
            hit[i - 1] = same
            i, j = i - 1, j - 1
        elif cost[i][j] == (cost[i - 1][j][0] + 1, cost[i - 1][j][1]):
            i -= 1
        else:
            j -= 1
    return hit


@dataclass
class Score:
    errors: int = 0  # character edits, spaces included
    length: int = 0
    letter_errors: int = 0  # spaces left out of both
    letters: int = 0
    words: int = 0
    words_right: int = 0
    known: int = 0  # words in the lexicon, and those read right
    known_right: int = 0
    lines: int = 0
    lines_split_right: int = 0  # lines read as as many words as were written

    def add(self, written: str, read: str, in_lexicon: list[bool]) -> None:
        w, r = written.lower(), read.lower()
        self.errors += edits(w, r)
        self.length += len(w)
        self.letter_errors += edits(w.replace(" ", ""), r.replace(" ", ""))
        self.letters += len(w.replace(" ", ""))
        hits = matched_words(w.split(), r.split())
        self.words += len(hits)
        self.words_right += sum(hits)
        self.lines += 1
        self.lines_split_right += len(r.split()) == len(w.split())
        self.known += sum(in_lexicon)
        self.known_right += sum(h for h, k in zip(hits, in_lexicon, strict=True) if k)

    @property
    def cer(self) -> float:
        return self.errors / max(self.length, 1)

    @property
    def letter_cer(self) -> float:
        return self.letter_errors / max(self.letters, 1)

    @property
    def word_acc(self) -> float:
        return self.words_right / max(self.words, 1)

    @property
    def known_acc(self) -> float:
        return self.known_right / max(self.known, 1)


def isolated_wrong(predictor, x: np.ndarray, idx: list[int], truth: list[str]) -> dict[str, np.ndarray]:
    """Per character, whether the model alone gets it wrong: "given" the split's 28x28 image (probabilities),
    "preprocess" the same image through Predictor.predict (as a user's picture of one character), "letters" the
    given image with the best letter class (the digits left out, as a word of letters lets the decoder do)."""
    images = x[np.asarray(idx, dtype=np.int64)]
    probs = predictor.probabilities(images).numpy()
    names = [c.lower() for c in predictor.classes]
    letters = probs * np.array([c.isalpha() for c in names])
    preds = predictor.predict(list(images), k=1)
    return {"given": np.array([names[k] != t.lower() for k, t in zip(probs.argmax(1), truth, strict=True)]),
            "letters": np.array([names[k] != t.lower() for k, t in zip(letters.argmax(1), truth, strict=True)]),
            "preprocess": np.array([not p.found or p.top[0][0].lower() != t.lower()
                                    for p, t in zip(preds, truth, strict=True)])}


# -- timing ---------------------------------------------------------------------------------------------------


class Clock:
    """Seconds spent in segmentation and in the model inside Predictor.read, by wrapping both where they are
    looked up (training.reading.segment_line, the predictor's probabilities)."""

    def __init__(self, predictor):
        import training.reading as reading

        self.segment = self.model = 0.0
        segment_line, probabilities = reading.segment_line, predictor.probabilities

        def timed_segment(image):
            t = time.perf_counter()
            try:
                return segment_line(image)
            finally:
                self.segment += time.perf_counter() - t

        def timed_model(images, *args, **kwargs):
            t = time.perf_counter()
            try:
                return probabilities(images, *args, **kwargs)
            finally:
                self.model += time.perf_counter() - t

        reading.segment_line = timed_segment
        predictor.probabilities = timed_model

    def reset(self) -> None:
        self.segment = self.model = 0.0


def read_all(predictor, samples: list[Sample], lexicon, clock: Clock) -> tuple[list[str], list[float], float, float]:
    """(the text read, seconds per line, seconds in segmentation, seconds in the model)."""
    texts, seconds = [], []
    clock.reset()
    for s in samples:
        t = time.perf_counter()
        reading = predictor.read(s.line.image, lexicon=lexicon)
        seconds.append(time.perf_counter() - t)
        texts.append(reading.text if reading.found else "")
    return texts, seconds, clock.segment, clock.model


def cpu_name() -> tuple[str, bool]:
    """(the CPU's model name, whether it has avx512_bf16), from /proc/cpuinfo (what lscpu shows)."""
    name, bf16 = platform.processor() or "unknown CPU", False
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return name, bf16
    names = [ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")]
    flags = [ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")]
    return (names[0] if names else name), bool(flags) and "avx512_bf16" in flags[0]


def _ms(xs: list[float]) -> str:
    return f"median {1000 * statistics.median(xs):6.1f} ms  p90 {1000 * float(np.percentile(xs, 90)):6.1f} ms"


# -- the command ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model file, or an experiment folder (its final model)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="whose character images write the lines: test (the default), train to tune on")
    p.add_argument("--emnist-split", default=None, help="EMNIST split (default: the model's, e.g. bymerge)")
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--timing-lines", type=int, default=50, help="lines of exactly 10 letters, timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heights", default="32,48,64", help="character heights in pixels, the lines' in turn")
    p.add_argument("--vocab", type=int, default=20000, help="the commonest words of 2-12 letters drawn from")
    p.add_argument("--touch", type=float, default=0.12, help="share of letter gaps that touch or overlap")
    p.add_argument("--slant", default="-0.15,0.3", help="range of slant (x shift per unit of height)")
    p.add_argument("--noise", type=float, default=0.03)
    p.add_argument("--oov", type=float, default=0.0, help="share of words made of random letters (not words)")
    p.add_argument("--tta", choices=("model", "off"), default="model",
                   help="model: as the model file says (the delivered model's views); off: its single view only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    try:
        heights = [int(h) for h in args.heights.split(",")]
        slant = tuple(float(s) for s in args.slant.split(","))
    except ValueError:
        p.error("--heights and --slant are comma-separated numbers")
    if len(slant) != 2 or min(heights) < 8 or args.lines < 1 or args.timing_lines < 0 or not 0 <= args.oov <= 1:
        p.error("--slant takes two numbers, --heights 8 or more, --lines 1 or more, --oov a share")
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        path = resolve_model(args.model)
        predictor = Predictor.from_checkpoint(path)
        if args.tta == "off" and isinstance(predictor.model, TestTimeAugment):
            predictor.model = predictor.model.model  # the model without its views
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    emnist = args.emnist_split or predictor.config.get("split") or "bymerge"
    xt, yt, classes, _ = read_split(emnist, args.split, args.data_dir)
    if sorted(classes) != sorted(predictor.classes):
        print(f"error: the model's classes are not those of EMNIST {emnist}", file=sys.stderr)
        return 2
    x = xt.numpy()
    bank = glyph_bank(np.arange(len(yt)), yt.numpy(), classes)  # indexes into x, by character
    lexicon = load_lexicon("english")
    vocab = vocabulary(lexicon.counts, args.vocab, set(bank))
    samples = make_samples(bank, vocab, x, args.lines, args.seed, heights, args.touch, slant, args.noise,
                           oov=args.oov, counts=lexicon.counts)
    timing = ten_letter_samples(bank, vocab, x, args.timing_lines, args.seed, heights, args.touch, slant, args.noise)

    clock = Clock(predictor)
    predictor.read(samples[0].line.image, lexicon=lexicon)  # warm-up: first calls allocate
    plain, t_plain, seg_plain, model_plain = read_all(predictor, samples, None, clock)
    lexed, t_lex, seg_lex, model_lex = read_all(predictor, samples, lexicon, clock)
    ten_plain = read_all(predictor, timing, None, clock)[1] if timing else []
    ten_lex = read_all(predictor, timing, lexicon, clock)[1] if timing else []

    truth = [c for s in samples for c in s.line.text if c != " "]
    wrong = isolated_wrong(predictor, x, [i for s in samples for i in s.glyphs], truth)

    rows = {}
    for h in [*heights, "all"]:
        chosen = [k for k, s in enumerate(samples) if h == "all" or s.height == h]
        a, b = Score(), Score()
        for k in chosen:
            a.add(samples[k].line.text, plain[k], samples[k].in_lexicon)
            b.add(samples[k].line.text, lexed[k], samples[k].in_lexicon)
        mask = np.concatenate([np.ones(len(samples[k].glyphs), bool) * (h == "all" or samples[k].height == h)
                               for k in range(len(samples))])
        rows[str(h)] = {"lines": len(chosen), "chars": int(mask.sum()), "words": a.words,
                        **{f"isolated_err{k}": float(wrong[w][mask].mean())
                           for k, w in (("", "given"), ("_preprocess", "preprocess"), ("_letters", "letters"))},
                        "cer": a.cer, "cer_lexicon": b.cer, "letter_cer": a.letter_cer,
                        "letter_cer_lexicon": b.letter_cer, "word_acc": a.word_acc, "word_acc_lexicon": b.word_acc,
                        "known_words": a.known, "known_acc": a.known_acc, "known_acc_lexicon": b.known_acc,
                        "word_count_right": a.lines_split_right / max(a.lines, 1),
                        "word_count_right_lexicon": b.lines_split_right / max(b.lines, 1)}

    cpu, bf16 = cpu_name()
    ckpt = load_checkpoint(path)
    kind = f"ensemble of {len(ckpt['members'])}" if "members" in ckpt else "one model"
    kind += f", TTA {ckpt['tta']} views" if ckpt.get("tta", 1) > 1 else ""
    kind += " (--tta off: one view)" if args.tta == "off" and ckpt.get("tta", 1) > 1 else ""
    cfg = predictor.config
    print(f"model: {path} ({cfg.get('model')}, width {cfg.get('width')}, {kind}, {len(classes)} classes)")
    print(f"data: EMNIST {emnist} {args.split}, {len(x):,} images; {len(samples)} lines (seed {args.seed}), "
          f"{len(truth):,} characters, {rows['all']['words']:,} words from the {len(vocab):,} commonest English "
          f"words of {MIN_LETTERS}-{MAX_LETTERS} letters" + (f" ({args.oov:.0%} random non-words)" if args.oov else ""))
    print(f"lines: heights {args.heights} px, touching gaps {args.touch:.0%}, slant {args.slant}, noise "
          f"{args.noise}; {sum(bool(s.line.touching) for s in samples)} lines hold a touching or overlapping pair")
    print(f"CPU: {cpu} (avx512_bf16: {'yes' if bf16 else 'no'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print()
    head = (f"{'height':>6} {'lines':>5} {'chars':>6} | {'isolated err':>12} {'(preproc.)':>10} | {'CER model':>9} "
            f"{'CER +lex':>8} | {'words model':>11} {'words +lex':>10}")
    print(head)
    print("-" * len(head))
    for h, r in rows.items():
        print(f"{h:>6} {r['lines']:>5} {r['chars']:>6} | {r['isolated_err']:>12.2%} "
              f"{r['isolated_err_preprocess']:>10.2%} | {r['cer']:>9.2%} {r['cer_lexicon']:>8.2%} | "
              f"{r['word_acc']:>11.1%} {r['word_acc_lexicon']:>10.1%}")
    al = rows["all"]
    print()
    print(f"letters only (spaces left out): CER model {al['letter_cer']:.2%}, +lexicon {al['letter_cer_lexicon']:.2%}"
          f"; isolated {al['isolated_err']:.2%} (the best letter class alone: {al['isolated_err_letters']:.2%})")
    print(f"cost of segmentation: CER model - isolated = {100 * (al['cer'] - al['isolated_err']):+.2f} points "
          f"(letters only {100 * (al['letter_cer'] - al['isolated_err']):+.2f})")
    print(f"lines read as as many words as written: {al['word_count_right']:.0%} (model), "
          f"{al['word_count_right_lexicon']:.0%} (+lexicon)")
    if args.oov:
        print(f"in-lexicon words ({al['known_words']}): model {al['known_acc']:.1%}, +lexicon "
              f"{al['known_acc_lexicon']:.1%}")
    print()
    print(f"time per line ({len(samples)} lines, {len(truth) / len(samples):.1f} letters on average): model "
          f"{_ms(t_plain)}; +lexicon {_ms(t_lex)}")
    if timing:
        print(f"time per 10-letter line ({len(timing)} lines): model {_ms(ten_plain)}; +lexicon {_ms(ten_lex)}")
    print(f"where the time goes (model alone / +lexicon): segmentation {seg_plain / sum(t_plain):.0%} / "
          f"{seg_lex / sum(t_lex):.0%}, the model {model_plain / sum(t_plain):.0%} / {model_lex / sum(t_lex):.0%}, "
          f"framing and decoding the rest")
    if args.json:
        times = {"line": t_plain, "line_lexicon": t_lex, "ten": ten_plain, "ten_lexicon": ten_lex}
        out = {"model": str(path), "emnist_split": emnist, "split": args.split, "seed": args.seed, "cpu": cpu,
               "avx512_bf16": bf16, "threads": torch.get_num_threads(), "rows": rows,
               "seconds": {k: {"median": statistics.median(v), "p90": float(np.percentile(v, 90))}
                           for k, v in times.items() if v},
               "share": {"segmentation": seg_plain / sum(t_plain), "model": model_plain / sum(t_plain),
                         "segmentation_lexicon": seg_lex / sum(t_lex), "model_lexicon": model_lex / sum(t_lex)}}
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
