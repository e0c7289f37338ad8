"""Inputs of the chat evaluations (`fidellm.eval.chat`), read through the source registry.

- Translation test sets (`TRANSLATION_SETS`): FLORES-200 devtest, NTREX-128 and MAFAND-MT test, each an
  Amharic registry source and its English twin (`<name>_eng`), aligned line by line.
- MT-bench and Vicuna-bench questions (`chat_eval_en/*/question.jsonl`) and, where the file is there,
  their GPT-4 reference answers (shown beside the model's answers; nothing is scored against them).
- The chat eval split: `eval.jsonl` of a `fidellm data chat` directory. By default it is the directory the
  model was fine-tuned on (`chat_dir` in the SFT run's train/config.json), else RUN/chat of `--run`.

Evaluation data must be intact: a line that is not UTF-8 or empty, sides of different lengths, a question
without turns or an invalid conversation is a FidelError naming the file (and line or id), never skipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fidellm.data.compressed import decode_line, iter_raw_lines
from fidellm.data.registry import SourceSpec, load_registry
from fidellm.data.sources import locate, resolve_files
from fidellm.errors import FidelError
from fidellm.hashing import file_sha256
from fidellm.jsonfile import read_json_object
from fidellm.sft.data import read_conversations

TRANSLATION_SETS: dict[str, tuple[str, str, str]] = {
    "flores": ("flores200", "flores200_eng", "devtest"),
    "ntrex": ("ntrex128", "ntrex128_eng", "test"),
    "mafand": ("mafand_mt_en_amh", "mafand_mt_en_amh_eng", "test"),
}
"""Short name -> (Amharic registry source, English registry source, split)."""
BENCHES = ("mt_bench", "vicuna_bench")
AMHARIC_INSTRUCTION_SOURCES = ("amharicir_instr",)
"""Registry sources of Amharic instructions (AmharicIR-Instr, the only one in the shared data)."""


@dataclass(frozen=True)
class ParallelLine:
    """One test line in both languages; `id` is `<Amharic source>/<split>:<line number>`."""

    id: str
    amharic: str
    english: str


@dataclass(frozen=True)
class BenchQuestion:
    """One MT-bench or Vicuna-bench question: its user turns and, when published, reference answers."""

    bench: str
    question_id: int
    category: str
    turns: tuple[str, ...]
    references: tuple[str, ...] | None = None

    def reference(self, turn: int) -> str | None:
        """The reference answer of turn `turn` (0-based), or None when there is none."""
        return self.references[turn] if self.references and turn < len(self.references) else None


def _split_file(spec: SourceSpec, data_dir: Path, split: str) -> Path:
    found = [resolved.path for resolved in resolve_files(spec, data_dir) if resolved.split == split]
    if not found:
        raise FidelError(f"source {spec.name!r} has no {split!r} split in the registry")
    return found[0]


def _lines(path: Path) -> list[str]:
    """The stripped lines of a test file; a line that is not UTF-8 or is empty is an error."""
    lines = []
    for number, raw in enumerate(iter_raw_lines(path), start=1):
        text = decode_line(raw)
        if text is None:
            raise FidelError(f"{path}:{number}: not UTF-8")
        if not text.strip():
            raise FidelError(f"{path}:{number}: empty line in a translation test set")
        lines.append(text.strip())
    return lines


def _spec(registry: Mapping[str, SourceSpec], name: str) -> SourceSpec:
    if name not in registry:
        raise FidelError(f"the source registry has no {name!r} entry")
    return registry[name]


def read_parallel(
    set_name: str,
    data_dir: Path,
    registry: Mapping[str, SourceSpec] | None = None,
    files_read: dict[str, str] | None = None,
) -> list[ParallelLine]:
    """The aligned lines of one of TRANSLATION_SETS (sha256 of both files put into `files_read`)."""
    if set_name not in TRANSLATION_SETS:
        raise FidelError(f"unknown translation set {set_name!r}; known: {', '.join(TRANSLATION_SETS)}")
    registry = registry if registry is not None else load_registry()
    amharic_name, english_name, split = TRANSLATION_SETS[set_name]
    amharic_path = _split_file(_spec(registry, amharic_name), data_dir, split)
    english_path = _split_file(_spec(registry, english_name), data_dir, split)
    amharic, english = _lines(amharic_path), _lines(english_path)
    if len(amharic) != len(english):
        raise FidelError(
            f"{amharic_path} has {len(amharic)} lines but {english_path} has {len(english)}: not aligned"
        )
    if files_read is not None:
        for path in (amharic_path, english_path):
            files_read[str(path)] = file_sha256(path)
    return [
        ParallelLine(f"{amharic_name}/{split}:{number}", am, en)
        for number, (am, en) in enumerate(zip(amharic, english, strict=True), start=1)
    ]


def _jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, raw in enumerate(iter_raw_lines(path), start=1):
        text = decode_line(raw)
        if text is None:
            raise FidelError(f"{path}:{number}: not UTF-8")
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise FidelError(f"{path}:{number}: not JSON: {error}") from error
        if not isinstance(record, dict):
            raise FidelError(f"{path}:{number}: not a JSON object")
        rows.append((number, record))
    return rows


def _references(spec: SourceSpec, data_dir: Path, files_read: dict[str, str] | None) -> dict[int, list[str]]:
    """question_id -> GPT-4 reference turns, from the bench's reference_answer file when it is there."""
    names = [item.path for item in spec.files if "reference_answer" in item.path]
    try:
        paths = [path for name in names for path in locate(spec, name, data_dir)]
    except FidelError:  # the reference file is optional: the answers are saved without it
        return {}
    references = {}
    for path in paths:
        if files_read is not None:
            files_read[str(path)] = file_sha256(path)
        for number, record in _jsonl(path):
            try:
                references[int(record["question_id"])] = [str(t) for t in record["choices"][0]["turns"]]
            except (KeyError, IndexError, TypeError, ValueError) as error:
                raise FidelError(f"{path}:{number}: not a reference answer ({error!r})") from error
    return references


def read_bench(
    bench: str,
    data_dir: Path,
    registry: Mapping[str, SourceSpec] | None = None,
    files_read: dict[str, str] | None = None,
) -> list[BenchQuestion]:
    """The questions of MT-bench or Vicuna-bench, in file order, with references where published."""
    if bench not in BENCHES:
        raise FidelError(f"unknown chat benchmark {bench!r}; known: {', '.join(BENCHES)}")
    registry = registry if registry is not None else load_registry()
    spec = _spec(registry, bench)
    path = _split_file(spec, data_dir, "test")
    if files_read is not None:
        files_read[str(path)] = file_sha256(path)
    references = _references(spec, data_dir, files_read)
    questions = []
    for number, record in _jsonl(path):
        turns = record.get("turns")
        if (
            not isinstance(turns, list)
            or not turns
            or not all(isinstance(t, str) and t.strip() for t in turns)
        ):
            raise FidelError(f"{path}:{number}: field 'turns' must be a non-empty list of non-empty strings")
        if not isinstance(record.get("question_id"), int):
            raise FidelError(f"{path}:{number}: field 'question_id' must be an integer")
        reference = references.get(record["question_id"])
        questions.append(
            BenchQuestion(
                bench,
                record["question_id"],
                str(record.get("category", "")),
                tuple(turns),
                tuple(reference) if reference else None,
            )
        )
    if not questions:
        raise FidelError(f"{path}: no questions")
    return questions


def sft_chat_dir(model_path: Path) -> Path | None:
    """The chat directory the model at `model_path` was fine-tuned on: `chat_dir` of the train/config.json
    of the SFT run holding it (RUN/chat when unset, as `fidellm sft` does), or None when the nearest
    training config is not a chat fine-tune (or there is none: an exported model from elsewhere)."""
    for candidate in (model_path, *model_path.parents):
        config_path = candidate / "train" / "config.json"
        if config_path.is_file():
            train = read_json_object(config_path, "not a training config").get("train")
            if not isinstance(train, dict):
                raise FidelError(f"{config_path}: not a training config (no 'train' object)")
            if train.get("data") != "chat":
                return None
            return Path(train["chat_dir"]) if train.get("chat_dir") else candidate / "chat"
    return None


def read_eval_split(chat_dir: Path, files_read: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The conversations of CHAT_DIR/eval.jsonl, each checked against the conversation schema (by
    `read_conversations`)."""
    path = chat_dir / "eval.jsonl"
    if not path.is_file():
        raise FidelError(
            f"{path}: no chat eval split (run `fidellm data chat RUN --eval-split F`, or pass --chat-dir)"
        )
    conversations = read_conversations(path)
    if not conversations:
        raise FidelError(f"{path}: no conversations")
    if files_read is not None:
        files_read[str(path)] = file_sha256(path)
    return conversations
