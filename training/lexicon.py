"""Word lists for reading lines (training/reading.py): the English one bundled with symspellpy (82,765 words with
their frequencies in a large web corpus, installed with the package: nothing is downloaded), or a user's file.

A user's file has one word a line, optionally followed by its count (`word` or `word 1234`, whitespace between);
blank lines and lines starting with # are skipped. Words are matched whatever their case; a word written with
capitals of its own (a name: "McDonald") is given back as written.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

ENGLISH = "english"
MAX_DISTANCE = 2  # edits between what the model read and a word it may be
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_WORD = 40  # longer "words" are not words (symspell's prefix index is built for short ones anyway)


class LexiconError(ValueError):
    """A word list that cannot be used: missing, unreadable, empty or not text."""


class Lexicon:
    def __init__(self, counts: dict[str, int], forms: dict[str, str], name: str):
        from symspellpy import SymSpell  # (imported here: a Predictor without a lexicon never needs it)
        from symspellpy.editdistance import DistanceAlgorithm, EditDistance

        if not counts:
            raise LexiconError(f"word list {name} holds no words")
        self.name = name
        self.counts, self.forms = counts, forms
        self._top = max(counts.values())
        self._found: dict[tuple[str, int], list[tuple[str, int]]] = {}  # lookups already made (see candidates)
        # editdistpy's compiled distance (symspellpy[editdistpy]): lookups ~5x faster than the pure-Python one
        self._spell = SymSpell(max_dictionary_edit_distance=MAX_DISTANCE, prefix_length=7,
                               distance_comparer=EditDistance(DistanceAlgorithm.DAMERAU_OSA_FAST))
        for word, count in counts.items():
            self._spell.create_dictionary_entry(word, count)

    def __contains__(self, word: str) -> bool:
        return word.lower() in self.counts

    def __len__(self) -> int:
        return len(self.counts)

    def candidates(self, word: str, max_distance: int = MAX_DISTANCE) -> list[tuple[str, int]]:
        """The words within max_distance edits of `word` (any case): (word, edits), nearest and commonest first."""
        from symspellpy import Verbosity

        word = word.lower()
        if not word or len(word) > MAX_WORD:
            return []
        key = (word, min(max_distance, MAX_DISTANCE))
        hit = self._found.get(key)
        if hit is None:
            # (kept: reading a line decodes it again after the full model scores the chosen spans, and the same
            # readings come back; ~1 ms a lookup)
            if len(self._found) >= 50_000:
                self._found.clear()
            hit = [(s.term, s.distance) for s in self._spell.lookup(word, Verbosity.ALL, max_edit_distance=key[1])]
            self._found[key] = hit
        return list(hit)

    def log_frequency(self, word: str) -> float:
        """log of the word's count over the commonest word's (0 for the commonest, below for the rest)."""
        return math.log(self.counts.get(word.lower(), 1) / self._top)

    def log_frequencies(self, words: list[str]) -> np.ndarray:
        """log_frequency of each word (lowercase words: what candidates gives)."""
        counts = self.counts
        return np.log(np.array([counts.get(w, 1) for w in words], np.float64) / self._top)

    def form(self, word: str) -> str:
        """The word as the list writes it."""
        return self.forms.get(word.lower(), word.lower())


def read_word_list(path: str | Path) -> tuple[dict[str, int], dict[str, str]]:
    """(count by lowercase word, the word as written) of a word-list file; LexiconError naming the file and line."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LexiconError(f"word list {path} not found (give a file of words, 'english' or 'none')") from None
    except OSError as e:
        raise LexiconError(f"word list {path} cannot be read: {e.strerror or e}") from None
    if path.is_dir():
        raise LexiconError(f"word list {path} is a folder, not a file of words")
    if size > MAX_FILE_BYTES:
        raise LexiconError(f"word list {path} is {size / 1e6:.0f} MB: more than {MAX_FILE_BYTES // 2**20} MB is "
                           "not a word list")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LexiconError(f"word list {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise LexiconError(f"word list {path} cannot be read: {e.strerror or e}") from None
    if "\x00" in text:
        raise LexiconError(f"word list {path} is not text (it holds NUL bytes)")
    counts: dict[str, int] = {}
    forms: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) > 2:
            raise LexiconError(f"word list {path}, line {n}: expected 'word' or 'word count', got {line[:60]!r}")
        word = parts[0]
        try:
            count = int(parts[1]) if len(parts) == 2 else 1
        except ValueError:
            raise LexiconError(f"word list {path}, line {n}: the count {parts[1][:30]!r} is not a whole number") \
                from None
        if count < 1:
            raise LexiconError(f"word list {path}, line {n}: the count must be 1 or more")
        if len(word) > MAX_WORD:
            continue
        key = word.lower()
        counts[key] = counts.get(key, 0) + count
        if key not in forms or word != key:
            forms[key] = word
    if not counts:
        raise LexiconError(f"word list {path} holds no words")
    return counts, forms


@functools.lru_cache(maxsize=1)
def english() -> Lexicon:
    """symspellpy's bundled English frequency list (loaded once a process: ~2 s, ~150 MB)."""
    from importlib import resources

    path = resources.files("symspellpy") / "frequency_dictionary_en_82_765.txt"
    counts, forms = read_word_list(Path(str(path)))
    return Lexicon(counts, forms, ENGLISH)


def load_lexicon(spec) -> Lexicon | None:
    """None or "none": no lexicon; "english": the bundled list; a Lexicon: itself; else a word-list file."""
    if spec is None or isinstance(spec, Lexicon):
        return spec
    if str(spec).lower() == "none":
        return None
    if str(spec).lower() == ENGLISH:
        return english()
    counts, forms = read_word_list(spec)
    return Lexicon(counts, forms, Path(spec).name)
