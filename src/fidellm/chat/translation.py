"""Parallel Amharic-English lines -> translation instructions in both directions.

A parallel source's registry paths name its Amharic files (`.../amharic.txt`); the English file of each
lies beside it with `amharic` replaced by `english` in its name, aligned line by line. A pair is
rejected when a side is empty, not UTF-8 or has no partner line (`unaligned`), and dropped
(`mt_eval_overlap`) when either side overlaps an MT test set (NTREX-128, MAFAND-MT, FLORES-200 and
Gezmu dev/test, both languages; the 8-gram/whole-line rule of `fidellm.data.decontam`). Each kept pair
gives an en->am and an am->en conversation; the instruction is chosen from Amharic and English
variants by a hash of the pair id, so the choice is fixed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from fidellm.chat.schema import Conversation
from fidellm.data.compressed import decode_line, iter_raw_lines, logical_name
from fidellm.data.decontam import EvalNgramIndex
from fidellm.data.readers import Rejection
from fidellm.data.registry import SourceSpec
from fidellm.data.sources import locate, resolve_files
from fidellm.errors import FidelError
from fidellm.hashing import stable_hash64

MT_EVAL_SETS = (
    "flores200", "flores200_eng", "ntrex128", "ntrex128_eng",
    "mafand_mt_en_amh", "mafand_mt_en_amh_eng", "gezmu_am_en_eval", "gezmu_am_en_eval_eng",
)  # fmt: skip
"""Registry eval sets (Amharic and English sides) a translation pair must not overlap."""

INSTRUCTIONS = {
    "en-am": (
        "Translate the following English text into Amharic.",
        "Translate this into Amharic:",
        "የሚከተለውን የእንግሊዝኛ ጽሑፍ ወደ አማርኛ ተርጉም።",
        "ይህን ወደ አማርኛ ተርጉመው፦",
    ),
    "am-en": (
        "Translate the following Amharic text into English.",
        "Translate this into English:",
        "የሚከተለውን የአማርኛ ጽሑፍ ወደ እንግሊዝኛ ተርጉም።",
        "ይህን ወደ እንግሊዝኛ ተርጉመው፦",
    ),
}


@dataclass(frozen=True)
class Pair:
    """One aligned line pair: id `<source>/<Amharic file directory>:<line>`, where it is, both sides."""

    id: str
    path: str
    line: int
    amharic: str
    english: str


def _english_file(spec: SourceSpec, amharic: Path, data_dir: Path) -> Path:
    """The English file beside an Amharic one (plain, .zst or .gz)."""
    name = logical_name(amharic)
    if "amharic" not in name:
        raise FidelError(
            f"source {spec.name!r}: {amharic} has no 'amharic' in its name to find its English file"
        )
    return locate(spec, str(amharic.parent / name.replace("amharic", "english")), data_dir)[0]


def iter_pairs(spec: SourceSpec, data_dir: Path) -> Iterator[Pair | Rejection]:
    """Every line pair of a parallel source, or a Rejection naming file:line and the problem."""
    for resolved in resolve_files(spec, data_dir):
        english_path = _english_file(spec, resolved.path, data_dir)
        label = resolved.path.parent.name
        lines = zip_longest(iter_raw_lines(resolved.path), iter_raw_lines(english_path))
        for number, (am_raw, en_raw) in enumerate(lines, start=1):
            where = (spec.name, str(resolved.path), number)
            if am_raw is None or en_raw is None:
                shorter = english_path if en_raw is None else resolved.path
                yield Rejection(*where, "unaligned", f"{shorter} has no line {number}")
                continue
            amharic, english = decode_line(am_raw), decode_line(en_raw)
            if amharic is None or english is None:
                yield Rejection(*where, "invalid_utf8", f"line {number} of a side is not UTF-8")
            elif not amharic.strip() or not english.strip():
                side = "Amharic" if not amharic.strip() else "English"
                yield Rejection(*where, "empty", f"the {side} side of line {number} is empty")
            else:
                yield Pair(
                    f"{spec.name}/{label}:{number}",
                    str(resolved.path),
                    number,
                    amharic.strip(),
                    english.strip(),
                )


def pair_overlap(index: EvalNgramIndex, pair: Pair) -> list[str]:
    """The MT test sets either side of the pair overlaps (empty when clean)."""
    return index.names_of(index.match_mask(pair.amharic) | index.match_mask(pair.english))


def translation_request(direction: str, text: str, pair_id: str) -> dict[str, str]:
    """The user message asking to translate `text` in `direction` ("en-am" or "am-en"): an instruction
    chosen by a hash of direction and `pair_id`, a blank line, the text. Training data and the
    translation evaluation (`fidellm.eval.chat`) both ask this way."""
    if direction not in INSTRUCTIONS:
        raise FidelError(f"translation direction {direction!r} is not one of {', '.join(INSTRUCTIONS)}")
    options = INSTRUCTIONS[direction]
    instruction = options[stable_hash64(f"{direction}:{pair_id}", person=b"instr") % len(options)]
    return {"role": "user", "content": f"{instruction}\n\n{text}"}


def pair_conversations(source: str, pair: Pair) -> list[Conversation]:
    """The en->am and am->en instruction conversations of one pair (same split group: the pair id)."""
    out = []
    for direction, prompt, answer in (
        ("en-am", pair.english, pair.amharic),
        ("am-en", pair.amharic, pair.english),
    ):
        messages = [translation_request(direction, prompt, pair.id), {"role": "assistant", "content": answer}]
        out.append(Conversation(f"{pair.id}/{direction}", source, messages, group=pair.id))
    return out
