"""`fidellm data chat`: instruction/chat sets and parallel text -> one conversation JSONL for SFT.

Stages, in order, with every removal counted per source and reason (`report.json`):
1. read: each registry source's records are converted by shape (`fidellm.chat.formats`; parallel
   sources by `fidellm.chat.translation`) and validated (`fidellm.chat.schema`); a bad record is
   rejected with its file:line, reason and the field at fault (all listed in `rejected.jsonl`).
2. MT decontamination (parallel sources): both conversations of a pair whose either side overlaps an
   MT test set are dropped (`mt_eval_overlap`; pairs counted per test set).
3. exact dedup over all sources: conversations with the same normalized text, the smallest id kept
   (`duplicate`).
4. chat decontamination: a conversation any of whose texts overlaps a chat evaluation prompt
   (MT-bench, Vicuna-bench, self-instruct user-oriented, AlpacaEval; word 8-grams as in
   `fidellm.data.decontam`) is dropped (`chat_eval_overlap`).
5. `max_samples`: at most N conversations per source, those with the smallest hash of their id
   (`over_max_samples`).
6. split: a conversation goes to eval when a hash of its id (of the pair id for translations, so both
   directions share a split) falls under `eval_split`.

Counts add up per source: records_read = records_accepted + rejected, and the accepted records'
conversations = kept + dropped (one conversation per record, except seed tasks with several instances
and translation pairs, which give two).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fidellm.chat.formats import RecordError, convert_record
from fidellm.chat.schema import Conversation, conversation_error, dedup_key, message_texts
from fidellm.chat.translation import MT_EVAL_SETS, Pair, iter_pairs, pair_conversations, pair_overlap
from fidellm.data.decontam import EvalNgramIndex
from fidellm.data.readers import Rejection, read_records
from fidellm.data.registry import SourceSpec, load_registry
from fidellm.data.sources import iter_eval_units, resolve_files
from fidellm.errors import FidelError
from fidellm.hashing import stable_hash64, unit_interval
from fidellm.paths import staged_output_dir

CHAT_EVAL_SETS = ("mt_bench", "vicuna_bench", "self_instruct_user_oriented", "alpaca_eval")
DEFAULT_PARALLEL = ("marspanther_am_en_parallel",)
"""Parallel sources converted by default (Gezmu is an MT test set, so it is not trained on)."""
MAX_EXAMPLES = 5


@dataclass
class SourceStats:
    """What happened to one source's records and conversations."""

    spec: SourceSpec
    records_read: int = 0
    conversations: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    overlap_sets: Counter[str] = field(default_factory=Counter)
    kept: int = 0
    split: Counter[str] = field(default_factory=Counter)

    def reject(self, rejection: Rejection) -> None:
        self.rejected[rejection.reason] += 1
        examples = self.examples.setdefault(rejection.reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(str(rejection))

    def as_dict(self) -> dict[str, Any]:
        rejected = sum(self.rejected.values())
        return {
            "license": self.spec.license,
            "license_family": self.spec.license_family,
            "records_read": self.records_read,
            "records_accepted": self.records_read - rejected,
            "rejected": dict(sorted(self.rejected.items())),
            "conversations": self.conversations,
            "dropped": dict(sorted(self.dropped.items())),
            "kept": self.kept,
            "train": self.split["train"],
            "eval": self.split["eval"],
            "overlap_by_set": dict(sorted(self.overlap_sets.items())),
            "rejected_examples": self.examples,
        }


def _record_conversations(spec: SourceSpec, data_dir: Path, stats: SourceStats, out: list[Conversation]):
    """Read, convert and validate an instruction/chat source into `out`; yields every rejection."""
    for resolved in resolve_files(spec, data_dir):
        for record in read_records(
            resolved.path, spec.format, spec.name, lambda: True, spec.options, spec.unit
        ):
            stats.records_read += 1
            if isinstance(record, Rejection):
                yield record
                continue
            where = (spec.name, str(resolved.path), record.line)
            at = f"record {record.key}"
            orig = record.fields.get(spec.id_field) if spec.id_field else None
            orig = str(orig) if orig is not None else f"{resolved.label}:{record.key}"
            try:
                converted = convert_record(record.fields)
                conversations = [
                    Conversation(f"{spec.name}/{orig}{suffix}", spec.name, messages, tools)
                    for suffix, messages, tools in converted
                ]
                for conversation in conversations:
                    problem = conversation_error(conversation)
                    if problem:
                        raise RecordError("invalid_conversation", problem)
            except RecordError as error:
                yield Rejection(*where, error.reason, f"{at} ({orig}): {error.detail}")
                continue
            stats.conversations += len(conversations)
            out.extend(conversations)


def _pair_conversations(
    spec: SourceSpec, data_dir: Path, stats: SourceStats, out: list[Conversation], pairs: dict[str, Pair]
):
    """Read a parallel source's pairs into `out` as translation conversations (and `pairs`, by id);
    yields every rejection."""
    for item in iter_pairs(spec, data_dir):
        stats.records_read += 1
        if isinstance(item, Rejection):
            yield item
            continue
        conversations = pair_conversations(spec.name, item)
        stats.conversations += len(conversations)
        pairs[item.id] = item
        out.extend(conversations)


def select_chat_sources(names: list[str] | None, registry: dict[str, SourceSpec]) -> list[SourceSpec]:
    """The named sft/parallel sources, each once (default: every default-on sft source plus
    DEFAULT_PARALLEL)."""
    if names is None:
        return [s for s in registry.values() if s.section == "sft" and s.default] + [
            registry[n] for n in DEFAULT_PARALLEL
        ]
    usable = [n for n, s in registry.items() if s.section in ("sft", "parallel")]
    unknown = [n for n in names if n not in usable]
    if unknown:
        raise FidelError(
            f"--sources: {', '.join(unknown)} is not an sft/parallel source; known: {', '.join(usable)}"
        )
    return [registry[n] for n in dict.fromkeys(names)]


def _dedup(conversations: list[Conversation], stats: dict[str, SourceStats]) -> list[Conversation]:
    seen: set[str] = set()
    kept = []
    for conversation in sorted(conversations, key=lambda c: c.id):
        key = dedup_key(conversation)
        if key in seen:
            stats[conversation.source].dropped["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(conversation)
    return kept


@dataclass
class _Cleaner:
    """Stages 2, 4 and 5: the overlap checks, run lazily in the `max_samples` order so a capped run only
    checks the conversations it may keep (those past the cap count as `over_max_samples`)."""

    chat_index: EvalNgramIndex
    mt_index: EvalNgramIndex | None
    pairs: dict[str, Pair]
    stats: dict[str, SourceStats]
    pair_overlaps: dict[str, list[str]] = field(default_factory=dict)

    def drop_reason(self, conversation: Conversation) -> str | None:
        stats = self.stats[conversation.source]
        pair = self.pairs.get(conversation.group or "")
        if pair is not None and self.mt_index is not None:
            if pair.id not in self.pair_overlaps:
                self.pair_overlaps[pair.id] = pair_overlap(self.mt_index, pair)
                stats.overlap_sets.update(self.pair_overlaps[pair.id])
            if self.pair_overlaps[pair.id]:
                return "mt_eval_overlap"
        mask = 0
        for text in message_texts(conversation):
            mask |= self.chat_index.match_mask(text)
        if mask:
            stats.overlap_sets.update(self.chat_index.names_of(mask))
            return "chat_eval_overlap"
        return None

    def clean(self, conversations: list[Conversation], max_samples: int | None) -> list[Conversation]:
        if max_samples is not None:
            conversations = sorted(conversations, key=lambda c: stable_hash64(c.id, person=b"cap"))
        kept: list[Conversation] = []
        per_source: Counter[str] = Counter()
        for conversation in conversations:
            stats = self.stats[conversation.source]
            reason = (
                "over_max_samples" if max_samples and per_source[conversation.source] >= max_samples else None
            )
            reason = reason or self.drop_reason(conversation)
            if reason:
                stats.dropped[reason] += 1
            else:
                per_source[conversation.source] += 1
                kept.append(conversation)
        return sorted(kept, key=lambda c: c.id)


def build_chat_data(
    run_dir: Path,
    data_dir: Path,
    sources: list[str] | None = None,
    max_samples: int | None = None,
    eval_split: float = 0.05,
    registry: dict[str, SourceSpec] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write RUN/chat/{train,eval}.jsonl, rejected.jsonl and report.json; return the report. An existing
    RUN/chat is replaced only with `overwrite`, and only once the new one is complete."""
    if not 0.0 <= eval_split < 1.0:
        raise FidelError(f"--eval-split must lie in [0, 1), got {eval_split}")
    if max_samples is not None and max_samples < 1:
        raise FidelError(f"--max-samples must be >= 1, got {max_samples}")
    registry = registry if registry is not None else load_registry()
    specs = select_chat_sources(sources, registry)
    with staged_output_dir(Path(run_dir) / "chat", overwrite) as out_dir:
        return _write_chat_data(out_dir, data_dir, specs, registry, max_samples, eval_split)


def _write_chat_data(
    out_dir: Path,
    data_dir: Path,
    specs: list[SourceSpec],
    registry: dict[str, SourceSpec],
    max_samples: int | None,
    eval_split: float,
) -> dict[str, Any]:
    """`build_chat_data`'s files, written into `out_dir`."""
    stats = {spec.name: SourceStats(spec) for spec in specs}
    conversations: list[Conversation] = []
    mt_index = None
    pairs: dict[str, Pair] = {}
    with (out_dir / "rejected.jsonl").open("w", encoding="utf-8") as rejected_file:
        for spec in specs:
            if spec.section == "parallel":
                if mt_index is None:
                    mt_index = EvalNgramIndex.build(iter_eval_units(data_dir, list(MT_EVAL_SETS), registry))
                items: Iterator[Rejection] = _pair_conversations(
                    spec, data_dir, stats[spec.name], conversations, pairs
                )
            else:
                items = _record_conversations(spec, data_dir, stats[spec.name], conversations)
            for rejection in items:
                stats[spec.name].reject(rejection)
                rejected_file.write(json.dumps(rejection.__dict__, ensure_ascii=False) + "\n")
    chat_index = EvalNgramIndex.build(iter_eval_units(data_dir, list(CHAT_EVAL_SETS), registry))
    cleaner = _Cleaner(chat_index, mt_index, pairs, stats)
    conversations = cleaner.clean(_dedup(conversations, stats), max_samples)
    handles = {name: (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") for name in ("train", "eval")}
    with handles["train"], handles["eval"]:
        for conversation in conversations:
            split = (
                "eval"
                if unit_interval(f"chat-split:{conversation.group or conversation.id}") < eval_split
                else "train"
            )
            handles[split].write(json.dumps(conversation.to_json(), ensure_ascii=False) + "\n")
            stats[conversation.source].kept += 1
            stats[conversation.source].split[split] += 1
    per_source = {name: s.as_dict() for name, s in stats.items()}
    report = {
        "settings": {
            "sources": [s.name for s in specs],
            "max_samples": max_samples,
            "eval_split": eval_split,
        },
        "totals": {
            key: sum(s[key] for s in per_source.values())
            for key in ("records_read", "records_accepted", "conversations", "kept", "train", "eval")
        },
        "sources": per_source,
        "decontamination": {
            "chat_eval": chat_index.summary(),
            "mt_eval": mt_index.summary() if mt_index else None,
        },
    }
    (out_dir / "report.json").write_text(
        json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return report
