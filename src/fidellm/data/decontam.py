"""Decontamination: remove pretraining lines that share text with any evaluation set.

Matching is done on `amharic.match_key` (NFC, homophone + labialization folding, lower case, punctuation
removed), so a copy with other punctuation, spacing or ሐ/ሀ spelling still matches.

* Units with at least one word n-gram (default n = 8): their distinct n-grams are indexed, n-grams made
  mostly of numbers ("1 2 3 4 5 6 7 8") excepted. A document line is contaminated by a unit when it
  holds ``min(min_shared, ceil(min_coverage * N))`` of the unit's N n-grams (defaults 3 and 0.5): all of
  a short unit, or a run of about 10 shared words of a long one (see `EvalNgramIndex`).
* Shorter units (tweets, questions) are matched whole: a line is contaminated when the line itself or
  one of its sentences has exactly the unit's key, and the key has at least `min_short_chars` characters
  (the MANIFEST's overlap check uses the same 25-character floor; shorter keys such as "አመሰግናለሁ"
  would match ordinary text).

Words are numbered in the order the units are read (the index's vocabulary); an n-gram's hash is a
polynomial rolling hash of its word numbers with a splitmix64 finish (blake2b of the whole key for short
units), so hashes are deterministic across processes. A text's word that is not in the vocabulary gets
0 and its n-grams are never looked up: they cannot be in the index, and most n-grams of a pretraining
text hold such a word. The hashes are kept in sorted numpy arrays, so the index is small (6.6 MB of
hashes and a ~14 MB dictionary of 117,544 words for the eight default eval sets, built in a few
seconds) and each datatrove worker builds it once, lazily, and caches it per process (`Decontaminate`
pickles without it). Units too short to match safely (under n words and under `min_short_chars`, e.g.
AmQA answers, 2-word tweets) are counted per set, never silently ignored: `EvalNgramIndex.skipped_units`,
logged by the step when it builds the index (`EvalNgramIndex.summary`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import repeat
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.logging import logger

from fidellm.data.amharic import match_key, sentences, words
from fidellm.data.registry import EvalUnit, SourceSpec, load_registry
from fidellm.data.sources import iter_eval_units
from fidellm.errors import FidelError
from fidellm.hashing import ngram_hashes, stable_hash64

MAX_SETS = 64


@lru_cache(maxsize=1 << 20)
def _has_letter(word: str) -> bool:
    return any(ch.isalpha() for ch in word)


def key_hash(key: str) -> int:
    """Deterministic 64-bit hash of a whole match key (blake2b, 8 bytes)."""
    return stable_hash64(key, person=b"unit")


def word_ids(ws: list[str], vocab: dict[str, int]) -> np.ndarray:
    """The vocabulary number of each word of `ws`, 0 for a word the vocabulary lacks."""
    return np.fromiter(map(vocab.get, ws, repeat(0)), dtype=np.uint64, count=len(ws))


def _window_sums(flags: np.ndarray, n: int) -> np.ndarray:
    """How many of each n-gram's n words have the flag."""
    return np.convolve(flags.astype(np.int32), np.ones(n, dtype=np.int32), mode="valid")


def _valid(ws: list[str], n: int) -> np.ndarray:
    """Which n-grams count: those where at least half the words contain a letter (not runs of numbers)."""
    has_letter = np.fromiter(map(_has_letter, ws), dtype=bool, count=len(ws))
    return _window_sums(has_letter, n) * 2 >= n


def _all_known(ids: np.ndarray, n: int) -> np.ndarray:
    """Which n-grams of `ids` have all their words in the vocabulary (only those can be indexed)."""
    return _window_sums(ids > 0, n) == n


def _known_ngrams(ids: np.ndarray, n: int) -> np.ndarray:
    """Hashes of the n-grams of `ids` whose words are all in the vocabulary."""
    if len(ids) < n:
        return np.empty(0, dtype=np.uint64)
    return ngram_hashes(ids, n)[_all_known(ids, n)]


def _masks(hashes: list[int], set_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique hashes and, for each, the OR of 1 << set_id over the units it came from."""
    h = np.asarray(hashes, dtype=np.uint64)
    bits = np.left_shift(np.uint64(1), np.asarray(set_ids, dtype=np.uint64))
    unique, inverse = np.unique(h, return_inverse=True)
    masks = np.zeros(len(unique), dtype=np.uint64)
    np.bitwise_or.at(masks, inverse, bits)
    return unique, masks


@dataclass
class EvalNgramIndex:
    """Word n-grams of the evaluation units (and whole keys of short units), mapped back to their units.

    A line is contaminated by a unit of N distinct n-grams when it contains at least
    ``min(min_shared, ceil(min_coverage * N))`` of them: a whole short unit (an 8-word tweet needs its
    single n-gram), or ``min_shared`` n-grams (about min_shared + n - 1 consecutive words) of a long one.
    One shared formulaic phrase ("ምክትል ጠቅላይ ሚኒስትርና የውጭ ጉዳይ ሚኒስትር አቶ ደመቀ መኮንን", 8 words) does not
    remove a news paragraph; with a one-shared-8-gram rule it cut paragraphs from 40 ENA articles (29
    dropped whole) that MasakhaNEWS only resembles. Units shorter than n words are matched whole.
    """

    n: int
    min_shared: int
    min_coverage: float
    min_short_chars: int
    set_names: tuple[str, ...]
    unit_ids: tuple[str, ...]
    unit_sets: np.ndarray  # unit -> set id
    unit_ngrams: np.ndarray  # unit -> number of distinct n-grams
    ngrams: np.ndarray  # sorted hashes, one entry per (hash, unit)
    ngram_units: np.ndarray  # unit of each entry of `ngrams`
    shorts: np.ndarray  # sorted hashes of whole short-unit keys
    short_masks: np.ndarray  # bitmask of the sets each short key came from
    vocab: dict[str, int]  # word -> number (from 1), every word of every unit read
    short_units: dict[str, int] = field(default_factory=dict)  # per set: units matched whole
    skipped_units: dict[str, int] = field(default_factory=dict)  # per set: too short to match safely

    @classmethod
    def build(
        cls,
        units: Iterable[EvalUnit],
        n: int = 8,
        min_shared: int = 3,
        min_coverage: float = 0.5,
        min_short_chars: int = 25,
    ) -> EvalNgramIndex:
        """Index `units`. A unit with no valid n-gram and a key under `min_short_chars` characters cannot
        be matched safely and is skipped (counted per set in `skipped_units`)."""
        if n < 1 or min_shared < 1 or not 0.0 < min_coverage <= 1.0:
            raise FidelError(
                f"decontamination needs n >= 1, min_shared >= 1, 0 < min_coverage <= 1; got "
                f"{n}, {min_shared}, {min_coverage}"
            )
        names: dict[str, int] = {}
        vocab: dict[str, int] = {}
        unit_ids: list[str] = []
        unit_sets: list[int] = []
        unit_counts: list[int] = []
        parts: list[np.ndarray] = []
        short_hashes: list[int] = []
        short_ids: list[int] = []
        skipped: Counter[str] = Counter()
        short_units: Counter[str] = Counter()
        for unit in units:
            set_id = names.setdefault(unit.set_name, len(names))
            if set_id >= MAX_SETS:
                raise FidelError(f"at most {MAX_SETS} evaluation sets can be indexed together")
            key = match_key(unit.text)
            ws = words(key)
            numbered = (vocab.setdefault(w, len(vocab) + 1) for w in ws)
            ids = np.fromiter(numbered, dtype=np.uint64, count=len(ws))
            grams = np.unique(ngram_hashes(ids, n)[_valid(ws, n)]) if len(ws) >= n else ids[:0]
            if len(grams):
                parts.append(grams)
                unit_ids.append(unit.unit_id)
                unit_sets.append(set_id)
                unit_counts.append(len(grams))
            elif len(key) >= min_short_chars:
                short_hashes.append(key_hash(key))
                short_ids.append(set_id)
                short_units[unit.set_name] += 1
            else:
                skipped[unit.set_name] += 1
        hashes = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
        owners = np.repeat(np.arange(len(parts), dtype=np.uint32), [len(p) for p in parts])
        order = np.argsort(hashes, kind="stable")
        shorts, short_masks = _masks(short_hashes, short_ids)
        return cls(
            n, min_shared, min_coverage, min_short_chars, tuple(names), tuple(unit_ids),
            np.asarray(unit_sets, dtype=np.uint8), np.asarray(unit_counts, dtype=np.uint32),
            hashes[order], owners[order], shorts, short_masks, vocab, dict(short_units), dict(skipped),
        )  # fmt: skip

    @classmethod
    def from_data_dir(
        cls,
        data_dir: str | Path,
        sets: list[str] | None = None,
        n: int = 8,
        registry: Mapping[str, SourceSpec] | None = None,
        **options: float,
    ) -> EvalNgramIndex:
        """Index the evaluation sets of `registry` (default: the packaged one) found in `data_dir` (all
        default-on eval sets if None)."""
        index = cls.build(iter_eval_units(Path(data_dir), sets, registry), n=n, **options)
        if not index.set_names:
            raise FidelError(f"no evaluation units found in {data_dir} for sets {sets or 'all'}")
        return index

    @property
    def nbytes(self) -> int:
        arrays = (
            self.unit_sets,
            self.unit_ngrams,
            self.ngrams,
            self.ngram_units,
            self.shorts,
            self.short_masks,
        )
        return sum(a.nbytes for a in arrays)

    def summary(self) -> str:
        """One line for the log: what was indexed, per set."""
        by_ngrams = Counter(self.set_names[i] for i in self.unit_sets)
        parts = [
            f"{name}: {by_ngrams[name]} by {self.n}-grams, {self.short_units.get(name, 0)} whole, "
            f"{self.skipped_units.get(name, 0)} too short to match"
            for name in self.set_names
        ]
        size = f"{self.nbytes / 1e6:.1f} MB of hashes, {len(self.vocab):,} words"
        return f"decontamination index ({size}): " + "; ".join(parts)

    def names_of(self, mask: int) -> list[str]:
        return [name for i, name in enumerate(self.set_names) if mask >> i & 1]

    def matched_units(self, key: str) -> np.ndarray:
        """Indices of the units a line with match key `key` is contaminated by (n-gram rule only)."""
        queries = np.unique(_known_ngrams(word_ids(words(key), self.vocab), self.n))
        if not len(queries) or not len(self.ngrams):
            return np.empty(0, dtype=np.uint32)
        left = np.searchsorted(self.ngrams, queries, "left")
        right = np.searchsorted(self.ngrams, queries, "right")
        hit = right > left
        if not hit.any():
            return np.empty(0, dtype=np.uint32)
        left, lengths = left[hit], (right - left)[hit]
        starts = np.repeat(left - np.cumsum(lengths) + lengths, lengths)
        owners = self.ngram_units[starts + np.arange(lengths.sum())]
        units, shared = np.unique(owners, return_counts=True)
        need = np.minimum(self.min_shared, np.ceil(self.min_coverage * self.unit_ngrams[units]))
        return units[shared >= need]

    def match_mask(self, line: str) -> int:
        """Bitmask of the eval sets `line` is contaminated with (0 when clean)."""
        return self.line_masks([line])[0]

    def line_masks(self, lines: list[str]) -> list[int]:
        """`match_mask` of every line, the lines looked up together: one n-gram search for all of them,
        the per-unit count only for lines with a hit, one search of the whole-unit keys."""
        keys = [match_key(line) if line.strip() else "" for line in lines]
        masks = [0] * len(lines)
        for i in self._ngram_hits(keys):
            for set_id in np.unique(self.unit_sets[self.matched_units(keys[i])]):
                masks[i] |= 1 << int(set_id)
        if not len(self.shorts):
            return masks
        queries, owners = [], []
        for i, (line, key) in enumerate(zip(lines, keys, strict=True)):
            if not key:
                continue
            parts = sentences(line)
            for k in {key, *(match_key(s) for s in parts)} if len(parts) > 1 else {key}:
                if len(k) >= self.min_short_chars:
                    queries.append(key_hash(k))
                    owners.append(i)
        if queries:
            hashes = np.asarray(queries, dtype=np.uint64)
            idx = np.minimum(np.searchsorted(self.shorts, hashes), len(self.shorts) - 1)
            found = self.shorts[idx] == hashes
            for i, set_mask in zip(np.asarray(owners)[found], self.short_masks[idx[found]], strict=True):
                masks[i] |= int(set_mask)
        return masks

    def _ngram_hits(self, keys: list[str]) -> list[int]:
        """Indices of the keys that may hold an indexed n-gram, the candidates `matched_units` decides on:
        the n-grams of all keys at once (a window across two keys at worst adds a candidate)."""
        word_lists = [words(key) for key in keys]
        flat = [word for ws in word_lists for word in ws]
        if len(flat) < self.n or not len(self.ngrams):
            return []
        owner = np.repeat(np.arange(len(keys)), [len(ws) for ws in word_lists])
        ids = word_ids(flat, self.vocab)
        known = _all_known(ids, self.n)
        hashes = ngram_hashes(ids, self.n)[known]
        idx = np.minimum(np.searchsorted(self.ngrams, hashes), len(self.ngrams) - 1)
        return np.unique(owner[: len(known)][known][self.ngrams[idx] == hashes]).tolist()

    def match(self, line: str) -> list[str]:
        """Names of the eval sets `line` overlaps (n-gram rule or a whole short unit)."""
        return self.names_of(self.match_mask(line))


_PROCESS_CACHE: dict[tuple[str, str, tuple[str, ...] | None, int, int, float], EvalNgramIndex] = {}


class Decontaminate(BaseFilter):
    """Remove lines that overlap an evaluation set; drop the document (reason `contaminated`) when more than
    `max_contaminated_fraction` of its characters, or all of its lines, are contaminated. The evaluation
    sets are those of the packaged registry plus `extra_registry` (the run's user YAML, whose eval entries
    count like the packaged ones).

    Stats: `decontam_lines_<set>` (lines removed, per set they matched), `decontam_docs_<set>` (documents
    touched). Metadata: `decontam_lines` (lines removed) and `decontam_sets` ({set: lines}) on every
    touched document, kept or dropped.
    """

    name = "🧪 Decontaminate"

    def __init__(
        self,
        data_dir: str | Path | None = None,
        sets: list[str] | None = None,
        n: int = 8,
        max_contaminated_fraction: float = 0.5,
        min_shared: int = 3,
        min_coverage: float = 0.5,
        index: EvalNgramIndex | None = None,
        exclusion_writer: DiskWriter | None = None,
        extra_registry: str | Path | None = None,
    ):
        super().__init__(exclusion_writer)
        if index is None and data_dir is None:
            raise FidelError("Decontaminate needs a data_dir with the evaluation sets (or a prebuilt index)")
        if not 0.0 <= max_contaminated_fraction <= 1.0:
            raise FidelError(f"max_contaminated_fraction must lie in [0, 1], got {max_contaminated_fraction}")
        self.data_dir = str(data_dir) if data_dir is not None else None
        self.sets = list(sets) if sets is not None else None
        self.extra_registry = str(extra_registry) if extra_registry is not None else None
        self.n = n
        self.min_shared = min_shared
        self.min_coverage = min_coverage
        self.max_contaminated_fraction = max_contaminated_fraction
        self._index = index

    @property
    def index(self) -> EvalNgramIndex:
        """The eval index, built on first use and shared by every step of this process with the same key."""
        if self._index is None:
            sets = tuple(self.sets) if self.sets is not None else None
            extra = self.extra_registry
            cache_key = (self.data_dir or "", extra or "", sets, self.n, self.min_shared, self.min_coverage)
            if cache_key not in _PROCESS_CACHE:
                _PROCESS_CACHE[cache_key] = EvalNgramIndex.from_data_dir(
                    self.data_dir,
                    self.sets,
                    self.n,
                    registry=load_registry(extra) if extra else None,
                    min_shared=self.min_shared,
                    min_coverage=self.min_coverage,
                )
                logger.info(_PROCESS_CACHE[cache_key].summary())
            self._index = _PROCESS_CACHE[cache_key]
        return self._index

    def __getstate__(self) -> dict:
        """Pickle without the index: each worker rebuilds (or reuses) it, cheaper than shipping it."""
        state = self.__dict__.copy()
        if self.data_dir is not None:
            state["_index"] = None
        return state

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        index = self.index
        lines = doc.text.split("\n")
        kept: list[str] = []
        per_set: Counter[str] = Counter()
        removed_lines = removed_chars = 0
        for line, mask in zip(lines, index.line_masks(lines), strict=True):
            if mask:
                removed_lines += 1
                removed_chars += len(line)
                per_set.update(index.names_of(mask))
            else:
                kept.append(line)
        if not removed_lines:
            return True
        doc.metadata["decontam_lines"] = removed_lines
        doc.metadata["decontam_sets"] = dict(sorted(per_set.items()))
        self.stat_update("decontam_lines", value=removed_lines)
        for name, count in per_set.items():
            self.stat_update(f"decontam_lines_{name}", value=count)
            self.stat_update(f"decontam_docs_{name}")
        too_much = removed_chars > self.max_contaminated_fraction * sum(len(line) for line in lines)
        if too_much or not any(line.strip() for line in kept):
            return False, "contaminated"
        doc.text = "\n".join(kept)
        return True
