"""A 0-100 document quality score: Gopher / FineWeb-2 style heuristics adapted to Amharic.

Each component is a measured value x turned into a goodness g(x) in [0, 1] by a linear ramp between an
OK bound (g = 1 on the good side) and a BAD bound (g = 0 beyond it); a floor f keeps soft signals from
vetoing (g = f + (1 - f) * ramp). The score is the weighted geometric mean of the goodness values:

    score = 100 * exp(sum_i w_i * ln g_i / sum_i w_i)        (0 as soon as one g_i is 0)

so one component at its BAD bound gives 0, like Gopher's hard rules, while moderate flaws each cost a
little. Every g is monotone in its value, so a text never scores higher for being more repetitive,
more symbol-laden, less Ethiopic, etc.; the score is deterministic and lies in [0, 100].

Components (the measured x is stored in `QualityResult.components`; bounds OK -> BAD; weight w):

repetition (Gopher, Rae et al. 2021, table A1)
- dup_line_frac: duplicate lines / lines, over lines of >= 2 words (separators and page numbers
  such as "***" or "፲" are left to short_line_frac).                                0.10 -> 0.40, w 2
- dup_para_char_frac: chars of paragraphs that repeat an earlier one / paragraph chars; paragraph =
  block between blank lines, or a line when the text has none (our sources: one paragraph a line).
                                                                                    0.10 -> 0.40, w 2
- top_{2,3,4}gram_char_frac: count x chars of the most frequent word n-gram / chars of all words;
  0 unless it occurs >= MIN_TOP_NGRAM_COUNT (3) times, since in a 20-word Bible verse one bigram
  said twice would already cover 20 %.       0.20 -> 0.40, 0.18 -> 0.36, 0.16 -> 0.32, w 1 each

line structure (texts of >= MIN_LINES (3) non-empty lines; otherwise g = 1, not applicable)
- terminal_punct_frac: lines ending in ። ፧ ! ? . … ፨ :: ፡፡ (closing quotes and brackets skipped) /
  lines. Soft (floor 0.3): some ENH newspapers were typed without any ።.   0.30 -> 0.00, w 2
- short_line_frac: lines of fewer than SHORT_LINE_WORDS (3) words / lines.          0.50 -> 0.95, w 1
- bullet_line_frac: lines starting with a bullet (• * - # > …) and not ending like a sentence (the
  terminal_punct rule) / lines: a list of links is not prose, a list of sentences (the Wikipedia's
  "on this day" pages: "*1825 - ባርነት በእንግሊዝ አገር ግዛቶች ሁሉ ባዋጅ ተከለከለ።") is.   0.50 -> 0.95, w 1

words and characters
- mean_word_len: characters per word of `amharic.words(text)`. FLORES-200 Amharic (34,129 words):
  3.96 overall, 3.33-4.76 for 90 % of the sentences, 2.78-6.08 extremes. Two-sided:
  OK in [2.5, 6.5], 0 at <= 1.5 (strings of single letters) or >= 10 (unspaced runs, URLs).  w 2
- symbol_ratio: symbol chars (Unicode S*, emoji, and # * _ { } [ ] \\ @) / non-space chars.
                                                                                    0.05 -> 0.25, w 1
- digit_ratio: digits (Unicode Nd and Ethiopic numerals) / non-space chars.        0.20 -> 0.60, w 1
- ethiopic_share: `amharic.ethiopic_share(text)`.                                   0.80 -> 0.30, w 2

The bounds were set from per-source distributions on the staged corpora: on the news sources (ENH,
ENA, BBC, Al-Ain) 99 % of documents score 100 and none falls under 50 except a handful (9 ENH articles
before the punctuation floor, 1 Al-Ain article repeating its paragraphs); scores are bimodal (0-10 or
>= 50), so any `QualityFilter.min_score` between 10 and 50 drops the same documents.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from fidellm.data.amharic import ethiopic_share, words

MIN_LINES = 3
SHORT_LINE_WORDS = 3
MIN_TOP_NGRAM_COUNT = 3
TERMINAL = ("።", "፧", "!", "?", ".", "…", "፨", "::", "፡፡")
CLOSERS = "\"'»”’)]」›"
BULLETS = ("•", "●", "○", "◦", "▪", "▫", "‣", "⁃", "∙", "·", "*", "-", "–", "—", "►", "➢", "✓", "✔", "#", ">")
EXTRA_SYMBOLS = frozenset("#*_{}[]\\@")


@dataclass(frozen=True)
class Ramp:
    """Linear goodness ramp: 1 on the good side of `ok`, 0 beyond `bad` (either direction)."""

    ok: float
    bad: float

    def __post_init__(self) -> None:
        if self.ok == self.bad:
            raise ValueError(f"ramp bounds must differ, got ok = bad = {self.ok}")

    def __call__(self, x: float) -> float:
        t = (x - self.ok) / (self.bad - self.ok)
        return min(1.0, max(0.0, 1.0 - t))


@dataclass(frozen=True)
class Component:
    """One scored measurement: how to turn its value into goodness, and its weight."""

    ramps: tuple[Ramp, ...]
    weight: float
    line_structure: bool = False
    floor: float = 0.0

    def goodness(self, x: float) -> float:
        return self.floor + (1.0 - self.floor) * min(r(x) for r in self.ramps)


COMPONENTS: dict[str, Component] = {
    "dup_line_frac": Component((Ramp(0.10, 0.40),), 2.0),
    "dup_para_char_frac": Component((Ramp(0.10, 0.40),), 2.0),
    "top_2gram_char_frac": Component((Ramp(0.20, 0.40),), 1.0),
    "top_3gram_char_frac": Component((Ramp(0.18, 0.36),), 1.0),
    "top_4gram_char_frac": Component((Ramp(0.16, 0.32),), 1.0),
    "terminal_punct_frac": Component((Ramp(0.30, 0.0),), 2.0, line_structure=True, floor=0.3),
    "short_line_frac": Component((Ramp(0.50, 0.95),), 1.0, line_structure=True),
    "bullet_line_frac": Component((Ramp(0.50, 0.95),), 1.0, line_structure=True),
    "mean_word_len": Component((Ramp(2.5, 1.5), Ramp(6.5, 10.0)), 2.0),
    "symbol_ratio": Component((Ramp(0.05, 0.25),), 1.0),
    "digit_ratio": Component((Ramp(0.20, 0.60),), 1.0),
    "ethiopic_share": Component((Ramp(0.80, 0.30),), 2.0),
}


@dataclass(frozen=True)
class QualityResult:
    """The 0-100 score, the measured component values (plus `n_lines`) and their goodness in [0, 1]."""

    score: float
    components: dict[str, float]
    goodness: dict[str, float] = field(default_factory=dict)


@lru_cache(maxsize=16384)
def _char_class(ch: str) -> int:
    """0 = whitespace, 1 = digit, 2 = symbol, 3 = other (letters, punctuation, marks)."""
    if ch.isspace():
        return 0
    if ch.isdigit() or 0x1369 <= ord(ch) <= 0x137C:
        return 1
    if ch in EXTRA_SYMBOLS or unicodedata.category(ch).startswith("S"):
        return 2
    return 3


def _duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(duplicate items / items, chars of duplicate items / chars of all items); (0, 0) if empty."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_n = dup_chars = 0
    for item in items:
        if item in seen:
            dup_n += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    total = sum(len(item) for item in items)
    return dup_n / len(items), (dup_chars / total if total else 0.0)


def _top_ngram_char_frac(ws: list[str], n: int, total_chars: int) -> float:
    """Chars covered by the most frequent word n-gram (count x chars) / word chars; 0 without repeats."""
    if len(ws) < n or not total_chars:
        return 0.0
    # the n-grams as tuples: the shifted lists zipped (the shorter ones end it), ~2x faster than slicing
    counts = Counter(zip(*(ws[i:] for i in range(n)), strict=False))
    gram, count = counts.most_common(1)[0]
    if count < MIN_TOP_NGRAM_COUNT:
        return 0.0
    return min(1.0, count * sum(len(w) for w in gram) / total_chars)


def _ends_terminal(line: str) -> bool:
    return line.rstrip(CLOSERS + " ").endswith(TERMINAL)


def measure(text: str) -> dict[str, float]:
    """The raw component values of `text` (see the module docstring for the definitions)."""
    lines = [s for s in (raw.strip() for raw in text.split("\n")) if s]
    line_words = [words(s) for s in lines]
    content_lines = [s for s, lw in zip(lines, line_words, strict=True) if len(lw) >= 2]
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    paragraphs = blocks if len(blocks) > 1 else lines
    ws = [w for lw in line_words for w in lw]
    word_chars = sum(len(w) for w in ws)
    classes: Counter[int] = Counter()
    for ch, count in Counter(text).items():
        classes[_char_class(ch)] += count
    non_space = len(text) - classes[0]
    n_lines = len(lines) or 1
    values = {
        "dup_line_frac": _duplicate_fractions(content_lines)[0],
        "dup_para_char_frac": _duplicate_fractions(paragraphs)[1],
        "top_2gram_char_frac": _top_ngram_char_frac(ws, 2, word_chars),
        "top_3gram_char_frac": _top_ngram_char_frac(ws, 3, word_chars),
        "top_4gram_char_frac": _top_ngram_char_frac(ws, 4, word_chars),
        "terminal_punct_frac": sum(_ends_terminal(s) for s in lines) / n_lines,
        "short_line_frac": sum(len(lw) < SHORT_LINE_WORDS for lw in line_words) / n_lines,
        "bullet_line_frac": sum(s.startswith(BULLETS) and not _ends_terminal(s) for s in lines) / n_lines,
        "mean_word_len": word_chars / len(ws) if ws else 0.0,
        "symbol_ratio": classes[2] / non_space if non_space else 0.0,
        "digit_ratio": classes[1] / non_space if non_space else 0.0,
        "ethiopic_share": ethiopic_share(text),
    }
    values["n_lines"] = float(len(lines))
    return values


def quality_score(text: str) -> QualityResult:
    """Score `text` from 0 (junk) to 100 (clean prose); empty or word-less text scores 0."""
    values = measure(text)
    structured = values["n_lines"] >= MIN_LINES
    goodness = {
        name: (comp.goodness(values[name]) if structured or not comp.line_structure else 1.0)
        for name, comp in COMPONENTS.items()
    }
    if not values["mean_word_len"] or min(goodness.values()) == 0.0:
        score = 0.0
    else:
        total_w = sum(c.weight for c in COMPONENTS.values())
        log_mean = sum(COMPONENTS[n].weight * math.log(g) for n, g in goodness.items()) / total_w
        score = 100.0 * math.exp(log_mean)
    return QualityResult(score=round(score, 4), components=values, goodness=goodness)
