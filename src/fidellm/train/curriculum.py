"""Curriculum learning: a 0–100 complexity score per example, five stages, a schedule that unlocks them,
and the sampler that draws training items from the unlocked stages (docs/curriculum.md has the rationale).

Score of a text (`text_complexity`): the casefolded text is cut into words = maximal runs of letters
(Unicode letters of any script; digits, punctuation and symbols separate words; Ethiopic syllables are
letters, so an Amharic word's length counts its syllables). Five terms, each in [0, 1]:
  length        log2(1 + words) / log2(1 + 1024), capped at 1 (1 word 0.10, 100 words 0.67, 1024+ 1)
  sentences     mean words per sentence / 30, capped at 1; sentences are the pieces between . ! ? ። ፧ ፨
                and line breaks that hold a word
  word length   (mean letters per word - 3) / 3, clipped to [0, 1] (3 letters 0, 6+ letters 1)
  diversity     (MSTTR - 0.6) / 0.4 clipped to [0, 1], times min(1, words / 50): MSTTR is the mean
                type-token ratio of the consecutive 50-word segments (the TTR of all words when there are
                fewer than 50); the factor keeps a 5-word text, whose TTR is trivially 1, from counting as
                lexically rich
  noise         (script mix + min(1, symbol share / 0.2)) / 2: script mix = 2·min(E, O) / (E + O) with E
                Ethiopic letters and O other letters (0 for one script, 1 for an even mix); symbol share =
                non-letter share of the non-space characters (digits, punctuation, symbols, emoji)
score = 100 × the mean of the five terms. A conversation (`conversation_complexity`) scores
100 × (0.7 × text terms' mean + 0.15 × turns + 0.15 × tool use): the text is every message content and
tool-call argument joined by line breaks; turns = min(1, max(0, non-system messages - 2) / 8) (one
question and answer 0, ten messages 1); tool use = min(1, (tool calls + [tools are defined]) / 3).
Every score is a pure function of the text (no corpus statistics, no randomness), in [0, 100].

Stages: `STAGES` from beginner to expert. The cut points are the weighted quintiles of the training
items' scores (`stage_boundaries`, weights = tokens), so each stage holds about a fifth of the training
tokens; an item at a cut point goes to the upper stage. Schedule (`unlocked_stages`): over the first
`span` of the draws the stages join one by one, stage k (0-based) at draw k/4 × span × total, and earlier
stages stay in the mix: beginner alone first, expert joining at the end of the span, from where all
data is drawn. `StagedSampler` draws each global batch uniformly without
replacement from the not yet drawn items of the unlocked stages (each stage walks through its own
seeded permutation), so over whole passes every item is seen as often as in a shuffled run — only the
order differs. When the unlocked stages run out they start new passes (new permutations).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fidellm.errors import FidelError

if TYPE_CHECKING:  # the curriculum's scoring runs in torch-free commands (data tokenize)
    from torch import Tensor

SCORE_VERSION = 1
STAGES = ("beginner", "elementary", "intermediate", "advanced", "expert")
DEFAULT_SPAN = 0.5
"""Share of training over which the stages are unlocked; everything is drawn after it."""

_WORD = re.compile(r"[^\W\d_]+")
_ETHIOPIC = re.compile(r"[\u1200-\u135A\u1380-\u138F\u2D80-\u2DDE\uAB01-\uAB2E]+")
_SENTENCE = re.compile(r"[^\W\d_][^.!?።፧፨\n]*")  # from a sentence's first letter to its end
_SEGMENT = 50
_SAMPLER_TAG = 0x5C0E  # keeps the sampler's random streams apart from the shuffled order's


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))


def text_terms(text: str) -> dict[str, float]:
    """The five terms of the score of `text` (module docstring), each in [0, 1]."""
    folded = text.casefold()
    words = _WORD.findall(folded)
    n_words = len(words)
    letters = sum(map(len, words))
    ethiopic = len(folded) - len(_ETHIOPIC.sub("", folded))
    non_space = sum(map(len, folded.split()))
    sentences = len(_SENTENCE.findall(folded))
    if n_words >= _SEGMENT:
        segments = range(0, n_words - _SEGMENT + 1, _SEGMENT)
        msttr = sum(len(set(words[i : i + _SEGMENT])) for i in segments) / (_SEGMENT * len(segments))
    else:
        msttr = len(set(words)) / n_words if n_words else 0.0
    other = max(0, letters - ethiopic)
    mix = 2 * min(ethiopic, other) / (ethiopic + other) if letters else 0.0
    symbols = (non_space - letters) / non_space if non_space else 0.0
    return {
        "length": min(1.0, math.log2(1 + n_words) / math.log2(1 + 1024)),
        "sentences": min(1.0, n_words / max(1, sentences) / 30),
        "word_length": _clip((letters / n_words - 3) / 3) if n_words else 0.0,
        "diversity": _clip((msttr - 0.6) / 0.4) * min(1.0, n_words / _SEGMENT),
        "noise": (mix + min(1.0, symbols / 0.2)) / 2,
    }


def text_complexity(text: str) -> float:
    """Complexity of a pretraining document, 0 (simplest) to 100 (module docstring)."""
    terms = text_terms(text)
    return 100 * sum(terms.values()) / len(terms)


def _content_text(content: Any) -> str:
    """A message content as text: a string, None, or OpenAI content parts (their "text" fields)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))


def conversation_complexity(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
) -> float:
    """Complexity of a chat example, 0 to 100: text, number of turns and tool use (module docstring)."""
    texts = [_content_text(message.get("content")) for message in messages]
    calls = [call for message in messages for call in message.get("tool_calls") or []]
    for call in calls:
        arguments = call.get("function", call).get("arguments", "")
        texts.append(arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))
    text = text_terms("\n".join(t for t in texts if t))
    turns = sum(1 for message in messages if message.get("role") != "system")
    turn_term = min(1.0, max(0, turns - 2) / 8)
    tool_term = min(1.0, (len(calls) + (1 if tools else 0)) / 3)
    return 100 * (0.7 * sum(text.values()) / len(text) + 0.15 * turn_term + 0.15 * tool_term)


def stage_boundaries(scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The four cut points between the five stages: the weighted quintiles of `scores`.

    Cut point j is the score of the first item (in score order) at which the cumulative weight exceeds
    j/5 of the total, so stage j+1 starts there; ties can leave a stage empty.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise FidelError("curriculum: no items to split into stages")
    weights = np.ones_like(scores) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    cumulative = np.cumsum(weights[order])
    targets = cumulative[-1] * np.arange(1, len(STAGES)) / len(STAGES)
    first = np.minimum(np.searchsorted(cumulative, targets, side="right"), len(scores) - 1)
    return scores[order][first]


def assign_stages(scores: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Stage (0 = beginner … 4 = expert) of each score; a score equal to a cut point goes up."""
    return np.searchsorted(boundaries, np.asarray(scores, dtype=np.float64), side="right").astype(np.int64)


def unlocked_stages(draw: int, total_draws: int, span: float) -> int:
    """How many stages (1 to 5, easiest first) may be drawn at draw `draw` (0-based) of `total_draws`:
    stage k from draw k/4 × span × total_draws on."""
    span_draws = span * total_draws
    if draw >= span_draws:
        return len(STAGES)
    return 1 + math.floor((len(STAGES) - 1) * draw / span_draws)


def unlock_draws(total_draws: int, span: float) -> list[int]:
    """The first draw at which each stage is unlocked (stage 0 at draw 0)."""
    firsts = []
    for stage in range(len(STAGES)):
        draw = max(0, math.ceil(stage / (len(STAGES) - 1) * span * total_draws) - 1)
        while unlocked_stages(draw, total_draws, span) <= stage:
            draw += 1
        firsts.append(draw)
    return firsts


def window_scores(offsets: np.ndarray, doc_scores: np.ndarray, seq_len: int, n_windows: int) -> np.ndarray:
    """Score of each training window tokens[i·seq_len : i·seq_len + seq_len + 1]: the token-weighted mean
    of the scores of the documents it overlaps (a window usually spans several short documents)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    doc_scores = np.asarray(doc_scores, dtype=np.float64)
    if len(doc_scores) != len(offsets) - 1:
        raise FidelError(f"curriculum: {len(doc_scores)} scores for {len(offsets) - 1} documents")
    mass = np.concatenate([[0.0], np.cumsum(doc_scores * np.diff(offsets))])  # score mass before doc i

    def mass_before(token: np.ndarray) -> np.ndarray:
        doc = np.clip(np.searchsorted(offsets, token, side="right") - 1, 0, len(doc_scores) - 1)
        return mass[doc] + doc_scores[doc] * (token - offsets[doc])

    starts = np.arange(n_windows, dtype=np.int64) * seq_len
    return (mass_before(starts + seq_len + 1) - mass_before(starts)) / (seq_len + 1)


class StagedSampler:
    """Global batches of item indices drawn by the curriculum schedule (module docstring).

    The draw at position d uses a generator seeded by (seed, d); the state — draws made, and per stage
    its pass number and how far that pass's permutation is used — is small and saved in checkpoints,
    so a resumed run draws exactly what an uninterrupted one would.
    """

    def __init__(self, stages: np.ndarray, global_batch: int, seed: int):
        stages = np.asarray(stages, dtype=np.int64)
        self.members = [np.flatnonzero(stages == stage) for stage in range(len(STAGES))]
        self.global_batch = global_batch
        self.seed = seed
        self.total_draws = 0
        self.span = DEFAULT_SPAN
        self.draws = 0
        self.passes = [0] * len(STAGES)
        self.used = [0] * len(STAGES)
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}

    def start_schedule(self, total_draws: int, span: float) -> None:
        """Spread the unlocking over the first `span` of `total_draws` draws (call before drawing)."""
        self.total_draws, self.span = total_draws, span

    def sizes(self) -> list[int]:
        return [len(members) for members in self.members]

    def unlocked(self) -> int:
        """Stages open at the current draw; at least up to the first non-empty stage."""
        if self.total_draws <= 0:
            raise FidelError("curriculum: start_schedule must be called before the first batch")
        first_nonempty = next(k for k, size in enumerate(self.sizes()) if size)
        return max(unlocked_stages(self.draws, self.total_draws, self.span), first_nonempty + 1)

    def _permutation(self, stage: int) -> np.ndarray:
        cached = self._permutations.get(stage)
        if cached is None or cached[0] != self.passes[stage]:
            rng = np.random.default_rng([self.seed, _SAMPLER_TAG, stage, self.passes[stage]])
            cached = (self.passes[stage], rng.permutation(len(self.members[stage])))
            self._permutations[stage] = cached
        return cached[1]

    def next_indices(self) -> np.ndarray:
        """The next global batch: `global_batch` item indices from the unlocked stages, shuffled."""
        open_stages = self.unlocked()
        rng = np.random.default_rng([self.seed, _SAMPLER_TAG, self.draws])
        picked: list[np.ndarray] = []
        needed = self.global_batch
        while needed:
            remaining = np.array([len(self.members[k]) - self.used[k] for k in range(open_stages)])
            if remaining.sum() == 0:  # every open stage is used up: each starts a new pass
                for stage in range(open_stages):
                    self.passes[stage] += 1
                    self.used[stage] = 0
                continue
            take = int(min(needed, remaining.sum()))
            counts = rng.multivariate_hypergeometric(remaining, take)
            for stage, count in enumerate(counts.tolist()):
                if count:
                    at = self.used[stage]
                    picked.append(self.members[stage][self._permutation(stage)[at : at + count]])
                    self.used[stage] += count
            needed -= take
        self.draws += 1
        return rng.permutation(np.concatenate(picked))

    def state_dict(self) -> dict[str, Any]:
        return {"curriculum_draws": self.draws, "passes": list(self.passes), "used": list(self.used)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "curriculum_draws" not in state:
            raise FidelError(
                "the checkpoint's data position comes from a run without --curriculum; resume it without"
                " the flag or start a new run directory"
            )
        self.draws = int(state["curriculum_draws"])
        self.passes = [int(x) for x in state["passes"]]
        self.used = [int(x) for x in state["used"]]

    def describe(self, boundaries: np.ndarray, per_draw: int = 1) -> str:
        """One line: cut points, items per stage and the step at which each stage joins."""
        firsts = unlock_draws(self.total_draws, self.span)
        parts = [
            f"{name} ({size:,} items) from step {first // per_draw}"
            for name, size, first in zip(STAGES, self.sizes(), firsts, strict=True)
        ]
        cuts = "/".join(f"{cut:.1f}" for cut in boundaries)
        return f"curriculum: cut points {cuts}; " + ", ".join(parts) + " (then all data)"


class StagedBatches:
    """What the curriculum batch classes share (mixed in before PackedBatches / ConversationBatches,
    whose `rows` say what a row is): they set `sampler` and `boundaries`; the sampler draws each batch,
    and the checkpointed data state is the sampler's."""

    sampler: StagedSampler
    boundaries: np.ndarray
    rank: int
    batch_size: int
    rows: Callable[[np.ndarray], tuple[Tensor, Tensor]]  # from the batch class mixed in after this one

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """This rank's rows of the next curriculum batch."""
        first = self.rank * self.batch_size
        return self.rows(self.sampler.next_indices()[first : first + self.batch_size])

    def start_schedule(self, total_batches: int, span: float) -> None:
        """Unlock the stages over the first `span` of the `total_batches` calls of next_batch."""
        self.sampler.start_schedule(total_batches, span)

    def describe(self, batches_per_step: int = 1) -> str:
        return self.sampler.describe(self.boundaries, batches_per_step)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)
