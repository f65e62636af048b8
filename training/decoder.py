"""The decoder of a line of handwriting (training/reading.py reads the line): from each candidate character's class
probabilities, the segmentation and the characters of each word with the highest probability under the model (a
beam search over the lattice of spans), and with a lexicon the word that scores best on the model's probabilities,
its frequency and its edit distance from what the model read, and the split of the line into words whose words
score best (decode_line).

EMNIST Balanced merges the two cases of c, i, j, k, l, m, o, p, s, u, v, w, x, y, z (one class each, named by the
capital). Their case in the output comes from the lexicon's word when it has one of its own, else from the case of
the letters the model does tell apart in the same word (or the line).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from editdistpy import levenshtein

from training.lexicon import MAX_DISTANCE, Lexicon

BEAM = 16  # hypotheses kept per position of a word's lattice
TOP_K = 5  # characters tried per span
SPAN_BIAS = 0.0  # log-score added per character: < 0 favours fewer, wider characters
MIX_COST = 2.0  # a digit next to a letter within a word (words are letters or numbers; "he11o" is hello)
LEXICON_WEIGHT = 0.25  # per unit of log frequency (relative to the lexicon's most frequent word)
EDIT_COST = 0.5  # per edit between the model's reading and a lexicon word (on top of the model's own probability)
# a reading of at most SHORT_WORD letters is looked up within one edit, not MAX_DISTANCE: two edits of a 2-3
# letter reading are hundreds of words, and each of its 8 readings is one edit from most of them (on 200 train-split
# lines the same texts; a 10-letter line with the English list 99 -> 87 ms)
SHORT_WORD = 3
LOOKUPS = 8  # a word's best readings whose neighbours in the lexicon are tried
OOV_COST = 12.0  # what keeping a word that is not in the lexicon costs, against a lexicon word's frequency score
# choosing a line's words (decode_line): each piece of a word kept outside the lexicon costs OOV_LETTER on top of
# OOV_COST (else one long misread run is cheaper than the words it holds); each word more than the ink's choice
# costs reading.SPLIT_COST (passed in as `bias`)
OOV_LETTER = 1.0
FLOOR = 1e-6  # the least probability a character is given (a lexicon word is never impossible under the model)
CONFIRM = 1  # with a screening pass: each word's best readings whose spans the full model scores (see read_line)


def merged_classes(classes: list[str]) -> set[str]:
    """The classes that hold both cases of a letter: a letter whose other case is not a class of its own."""
    return {c for c in classes if c.lower() != c.upper() and c.swapcase() not in classes}


class _Table:
    """Log-probabilities of the classes for every span of a line, and of each character whatever its case (a
    lexicon's word is matched whatever the case: the probabilities of a letter's two classes, a and A, add up)."""

    def __init__(self, probs: np.ndarray, classes: list[str]):
        self.logp = np.log(np.maximum(probs, FLOOR))
        self.classes = classes
        folds = sorted({c.lower() for c in classes})
        self.fold = {c: k for k, c in enumerate(folds)}
        member = np.zeros((len(classes), len(folds)))
        for i, c in enumerate(classes):
            member[i, self.fold[c.lower()]] = 1.0
        self.fold_logp = np.log(np.maximum(probs @ member, FLOOR))

    def fold_of(self, ch: str) -> int | None:
        return self.fold.get(ch.lower())

    def folds_of(self, terms: list[str], n: int) -> tuple[list[int], np.ndarray]:
        """For terms of n characters: (the indexes of those whose characters all have a fold, their folds
        (len, n)). ASCII terms through a byte table in one go: a word's reading looks up hundreds."""
        if not hasattr(self, "_lut"):
            self._lut = np.full(256, -1, np.int64)
            for ch, k in self.fold.items():
                for c in {ch, ch.upper()}:
                    if len(c) == 1 and ord(c) < 128:
                        self._lut[ord(c)] = k
        plain = [t for t, term in enumerate(terms) if term.isascii()]
        folds = self._lut[np.frombuffer("".join(terms[t] for t in plain).encode("ascii"), np.uint8)]
        folds = folds.reshape(len(plain), n)
        valid = folds.min(axis=1) >= 0 if len(plain) else np.zeros(0, bool)
        ok = np.asarray(plain, np.int64)[valid].tolist()
        rows = [folds[valid]]
        for t, term in enumerate(terms):
            if not term.isascii():
                f = [self.fold_of(ch) for ch in term]
                if None not in f:
                    ok.append(t)
                    rows.append(np.array([f], np.int64))
        return ok, np.concatenate(rows)


def _nbest(spans: list[tuple[int, int]], row: dict, table: _Table, start: int, stop: int,
           prior: dict) -> list[tuple[float, str, tuple]]:
    """The BEAM best readings of one word (pieces start..stop-1): (log-probability, class symbols, the spans)."""
    return _nbest_to(spans, row, table, start, [stop], prior)[stop]


def _nbest_to(spans: list[tuple[int, int]], row: dict, table: _Table, start: int, stops: list[int],
              prior: dict) -> dict[int, list[tuple[float, str, tuple]]]:
    """_nbest of the words start..stop-1 for each of `stops`, in one pass: the beam that reaches a stop is the one
    a word ending there has, as long as no span runs over that stop (decode_line checks)."""
    # hypotheses: (score, symbols, spans, whether the last symbol is a digit)
    beams: dict[int, list[tuple[float, str, tuple, bool]]] = {start: [(0.0, "", (), False)]}
    by_start: dict[int, list[tuple[int, int]]] = {}
    for s in spans:
        by_start.setdefault(s[0], []).append(s)
    digits = np.array([c.isdigit() for c in table.classes])
    out = {}
    for i in range(start, max(stops) + 1):
        here = beams.get(i, [])
        here.sort(key=lambda b: -b[0])
        del here[BEAM:]
        if i in stops:
            out[i] = [b[:3] for b in here]
        if not here or i not in by_start:
            continue
        scores = np.array([b[0] for b in here])
        last_digit = np.array([b[3] for b in here])
        mixable = np.array([bool(b[1]) for b in here])
        for span in by_start[i]:
            lp = table.logp[row[span]]
            top = np.argsort(-lp)[:TOP_K]
            is_digit = digits[top]
            # every hypothesis x every character; only the BEAM best can reach the next beam (which keeps BEAM),
            # added in the order the full product would be (ties break alike)
            total = (scores[:, None] + (lp[top] + (SPAN_BIAS + prior.get(span, 0.0)))[None, :]
                     - MIX_COST * ((last_digit[:, None] != is_digit[None, :]) & mixable[:, None])).ravel()
            keep = np.sort(np.argsort(-total, kind="stable")[:BEAM])
            nxt = beams.setdefault(span[1], [])
            for q in keep.tolist():
                h, o = divmod(q, len(top))
                b = here[h]
                nxt.append((float(total[q]), b[1] + table.classes[top[o]], (*b[2], span), bool(is_digit[o])))
    return out


def _align(word: str, spans: list[tuple[int, int]], row: dict, table: _Table, start: int, stop: int, prior: dict):
    """The segmentation of pieces start..stop-1 into len(word) spans under which the model finds `word` most
    likely: (log-probability, spans), or None when no segmentation has that many characters."""
    cls = [table.fold_of(ch) for ch in word]
    if any(c is None for c in cls):
        return None
    n = len(word)
    # best[m][j]: the best score of word[:m] covering pieces start..j-1
    best = [dict() for _ in range(n + 1)]
    best[0][start] = (0.0, ())
    for m in range(1, n + 1):
        prev, cur, c = best[m - 1], best[m], cls[m - 1]
        for span in spans:
            if span[0] in prev:
                score = prev[span[0]][0] + float(table.fold_logp[row[span], c]) + SPAN_BIAS + prior.get(span, 0.0)
                if span[1] not in cur or score > cur[span[1]][0]:
                    cur[span[1]] = (score, (*prev[span[0]][1], span))
        if not cur:
            return None
    return best[n].get(stop)


def _align_scores(terms: list[str], spans: list[tuple[int, int]], row: dict, table: _Table, start: int,
                  stop: int, prior: dict) -> np.ndarray:
    """_align's log-probability for every term at once (-inf where it has none): the same dynamic programme over
    the positions between pieces, run for all terms of one length together as arrays (a word's reading tries
    hundreds of lexicon words)."""
    out = np.full(len(terms), -np.inf)
    if not spans or not terms:
        return out
    spans = sorted(spans, key=lambda s: s[1])
    i_at = np.array([s[0] - start for s in spans])
    ends = np.array([s[1] - start for s in spans])
    firsts = np.flatnonzero(np.r_[True, ends[1:] != ends[:-1]])  # each end's first span (sorted by end)
    extra = np.array([SPAN_BIAS + prior.get(s, 0.0) for s in spans])
    logp = table.fold_logp[[row[s] for s in spans]]  # (spans, folds)
    width = stop - start + 1
    by_length: dict[int, list[int]] = {}
    for t, term in enumerate(terms):
        by_length.setdefault(len(term), []).append(t)
    for n, which in by_length.items():
        if n == 0:
            continue
        ok, cls = table.folds_of([terms[t] for t in which], n)  # cls: (words, n)
        if not ok:
            continue
        which = [which[k] for k in ok]
        best = np.full((len(which), width), -np.inf)
        best[:, 0] = 0.0
        for m in range(n):
            cand = best[:, i_at] + logp[:, cls[:, m]].T + extra  # (words, spans): word[:m+1] ending with each span
            best = np.full_like(best, -np.inf)
            best[:, ends[firsts]] = np.maximum.reduceat(cand, firsts, axis=1)
        out[which] = best[:, width - 1]
    return out


def edits(a, b) -> int:
    """Levenshtein distance between two sequences (strings, or lists of words: benchmarks/read.py)."""
    if isinstance(a, str) and isinstance(b, str):  # (editdistpy's compiled distance: the decoder calls it ~1000x)
        return levenshtein.distance(a, b, max(len(a), len(b)))
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# -- case -------------------------------------------------------------------------------------------------------


def _case_votes(symbols: str, merged: set[str]) -> tuple[int, int]:
    """(upper, lower) among the letters the model tells apart by case."""
    told = [c for c in symbols if c.isalpha() and c not in merged and c.upper() != c.lower()]
    return sum(c.isupper() for c in told), sum(c.islower() for c in told)


def _cased(symbols: str, merged: set[str], line_votes: tuple[int, int]) -> str:
    """Class symbols with the merged letters in the case the word's own letters (else the line's) show: capitals
    when most of them are, else lowercase, the first letter a capital when it is one and the rest are not."""
    up, low = _case_votes(symbols[1:], merged)
    if up + low == 0:
        up, low = _case_votes(symbols, merged)
        if up + low == 0:
            up, low = line_votes
    upper = up > low
    first = symbols[:1]
    first_up = first.isupper() and first not in merged  # a told capital; a merged one follows the rest
    out = []
    for i, c in enumerate(symbols):
        if c in merged:
            c = c.upper() if (upper or (i == 0 and first_up)) else c.lower()
        out.append(c)
    return "".join(out)


def _as_written(term: str, form: str, symbols: str, merged: set[str], line_votes) -> str:
    """A lexicon word in the case it is written: as the word list has it when that has capitals of its own (a
    name), else in the case the model's letters show (all capitals, a capital first, or lowercase)."""
    if form != form.lower():
        return form
    up, low = _case_votes(symbols, merged)
    if up + low == 0:
        up, low = line_votes
    rest_up, rest_low = _case_votes(symbols[1:], merged)
    if up > low and (rest_up >= rest_low or len(symbols) == 1):
        return term.upper()
    if symbols[:1].isupper() and symbols[:1] not in merged and rest_up < max(rest_low, 1):
        return term[:1].upper() + term[1:]
    return term


# -- a line's words -----------------------------------------------------------------------------------------

@dataclass
class Decoded:
    text: str  # the word as read (after the lexicon)
    raw: str  # the model alone
    spans: tuple[tuple[int, int], ...]  # the span of each character of text
    in_lexicon: bool
    merged: set[str]  # the classes that hold both cases
    contenders: set = field(default_factory=set)  # spans of the chosen, the raw and the CONFIRM best readings


def decode(words: list[tuple[int, int, list[tuple[int, int]]]], probs: dict[tuple[int, int], np.ndarray],
           classes: list[str], lexicon: Lexicon | None = None, prior: dict | None = None) -> list[Decoded | None]:
    """Choose each word's segmentation and characters. words: (first piece, end piece, the spans (i, j) that may
    be a character: pieces i..j-1); probs: each span's class probabilities; prior: a log-score for a span from the
    ink alone (span_prior). A word gives None when no run of its spans covers it."""
    return decode_line([words], probs, classes, lexicon, prior)


def decode_line(choices: list[list[tuple[int, int, list[tuple[int, int]]]]], probs: dict[tuple[int, int], np.ndarray],
                classes: list[str], lexicon: Lexicon | None = None, prior: dict | None = None,
                bias: list[float] | None = None) -> list[Decoded | None]:
    """decode() for the words of whichever of `choices` (ways to split the line into words, as decode's `words`)
    scores best with the lexicon: the sum of its words' scores as _correct weighs them (the model's log-probability
    of the word chosen, its frequency and edits, or OOV_COST for a word kept outside the lexicon). A word the
    lexicon knows beats two halves it does not ("mapped", not "map ped"), and two known words beat one unknown
    run ("dependent flute", not "dependentflute"); each extra word pays its own frequency, as a word does. Without
    a lexicon nothing tells words apart but the ink: the first choice."""
    prior = prior or {}
    table = _Table(np.stack(list(probs.values())), classes)
    row = {s: r for r, s in enumerate(probs)}
    merged = merged_classes(classes)
    if lexicon is None:
        choices = choices[:1]
    # the words of all choices that start at one piece are read in one pass to the farthest end (their beams agree
    # up to each end where no span runs over it: a word gap)
    ends: dict[int, dict[int, list]] = {}
    for words in choices:
        for a, b, ss in words:
            ends.setdefault(a, {})[b] = ss
    nbests: dict[tuple[int, int], list] = {}
    for a, stops in ends.items():
        far = max(stops)
        clear = [b for b in stops if not any(i < b < j for i, j in stops[far])]
        nbests.update(((a, b), nb) for b, nb in _nbest_to(stops[far], row, table, a, clear, prior).items())
        nbests.update(((a, b), _nbest(stops[b], row, table, a, b, prior)) for b in stops if b not in clear)
    read: dict = {}  # (first piece, end piece) -> (n-best, lexicon's choice, score): ranges shared by choices
    best, best_score = choices[0], -np.inf
    for k, words in enumerate(choices):
        total = bias[k] if bias else 0.0
        for a, b, ss in words:
            if (a, b) not in read:
                nb = nbests[(a, b)]
                found = _correct(nb, ss, row, table, lexicon, a, b, prior) if lexicon is not None and nb else None
                if not nb:
                    score = -np.inf
                elif found:
                    score = found[3]
                elif nb[0][1].isdigit():  # a number: no word list holds it, and it is no misread word ("1984")
                    score = nb[0][0]
                else:
                    score = nb[0][0] - OOV_COST - OOV_LETTER * (b - a)
                read[(a, b)] = (nb, found, score)
            total += read[(a, b)][2]
        if total > best_score + 1e-9:  # (ties, even by rounding, and choices with a word no span covers: the first)
            best, best_score = words, total
    nbests = [read[(a, b)][0] for a, b, _ in best]
    votes = [_case_votes(nb[0][1], merged) for nb in nbests if nb]
    line_votes = (sum(v[0] for v in votes), sum(v[1] for v in votes))
    out: list[Decoded | None] = []
    for a, b, _ in best:
        nb, found, _ = read[(a, b)]
        if not nb:
            out.append(None)
            continue
        _, symbols, path = nb[0]
        raw = _cased(symbols, merged, line_votes)
        contenders = {sp for _, _, p in nb[:CONFIRM] for sp in p}
        if found is None:
            out.append(Decoded(raw, raw, path, False, merged, contenders))
        else:
            term, form, spans, _ = found
            out.append(Decoded(_as_written(term, form, symbols, merged, line_votes), raw, spans, True, merged,
                               contenders | set(spans)))
    return out


def _correct(nbest, spans, row, table: _Table, lexicon: Lexicon, start: int, stop: int, prior: dict):
    """The lexicon word that beats the model's own best reading once frequency, edits and the cost of a word
    outside the lexicon are counted: (term, its written form, its spans, its score), or None to keep the model's
    reading."""
    top_score = nbest[0][0]
    # (readings that differ only in case look up the same words)
    looked = tuple(dict.fromkeys(symbols.lower() for _, symbols, _ in nbest[:LOOKUPS]))
    terms, fixed = _terms(lexicon, looked)
    if not terms:
        return None
    score = _align_scores(terms, spans, row, table, start, stop, prior) + fixed
    k = int(np.argmax(score))
    if not score[k] > top_score - OOV_COST:
        return None
    aligned = _align(terms[k], spans, row, table, start, stop, prior)
    return terms[k], lexicon.form(terms[k]), aligned[1], float(score[k])


_TERMS: dict = {}  # (lexicon, readings looked up) -> _terms (a line is decoded again after each full-model round)


def _terms(lexicon: Lexicon, looked: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """The lexicon's words near the readings `looked` (the first is the model's best), nearest readings' words
    first (ties go to them), with the part of each word's score that does not depend on the model: its frequency
    and its edits from the best reading."""
    key = (lexicon, looked)
    hit = _TERMS.get(key)
    if hit is None:
        terms = list(dict.fromkeys(term for symbols in looked
                                   for term, _ in lexicon.candidates(symbols, 1 if len(symbols) <= SHORT_WORD
                                                                     else MAX_DISTANCE)))
        fixed = (LEXICON_WEIGHT * lexicon.log_frequencies(terms)
                 - EDIT_COST * np.array([edits(looked[0], t) for t in terms], np.float64))
        if len(_TERMS) >= 20_000:
            _TERMS.clear()
        hit = _TERMS[key] = (terms, fixed)
    return hit
