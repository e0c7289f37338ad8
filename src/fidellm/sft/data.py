"""SFT data: conversations -> token ids with an assistant-only loss mask, packed into training rows.

Masking: a conversation is rendered once with the chat template (`fidellm.chat.render_chat`, BOS
first) and encoded; reading a file for training renders it no other time (`tokenize_file`: the encoding
is its template check). For each assistant turn, the conversation up to that turn is rendered with the
generation prompt (`...<|im_start|>assistant\\n`) and up to and including the turn (for the last turn,
the whole chat: its encoding is reused); both encodings must be prefixes of the full one (else
FidelError naming the conversation: the template or tokenizer merges across a turn boundary and no mask
could be right). The mask is 1 from the end of the first
(the turn's content and its `<tool_call>` text) to the turn's closing `<|im_end|>` inclusive, and 0
elsewhere: system, user and tool turns, the `<|im_start|>assistant\\n` header, the "\\n" after
`<|im_end|>`. The model learns to answer and to stop, never to write the user's side. With a byte
tokenizer (H-Net) the markers are literal bytes (`fidellm.chat.template.encode_chat`) and the mask ends
at the last byte of the closing `<|im_end|>`.

Packing: a conversation of n tokens gives n - 1 positions (input ids[:-1], target ids[1:] where the
mask is 1, IGNORE_INDEX elsewhere); one longer than seq_len keeps its first seq_len positions
(counted as truncated) or is dropped when no assistant target survives. Conversations are packed once,
greedily in a seed-shuffled order: each goes into the current row if it fits, else starts a new row;
rows are right-padded with the pad id and IGNORE_INDEX targets. As in pretraining, packed
conversations share the causal attention window (each starts with BOS; no per-document mask).
Every epoch visits the rows in a permutation drawn from (seed, epoch), so the position (epoch, step)
determines every later batch and resume is exact, as with `fidellm.train.data.PackedBatches`.

Curriculum (`CurriculumConversations`, `fidellm sft --curriculum`): every conversation gets its
complexity score (`fidellm.train.curriculum.conversation_complexity`), the token-weighted quintiles of
the scores make five stages, each stage is packed on its own (a row holds one stage), and the rows are
drawn by the curriculum schedule instead of the per-epoch permutation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fidellm.chat.schema import Conversation, conversation_error
from fidellm.chat.template import encode_chat, end_of_turn_ids, render_chat
from fidellm.data.compressed import decode_line
from fidellm.data.readers import lone_surrogate
from fidellm.errors import FidelError
from fidellm.models.loss import IGNORE_INDEX
from fidellm.tokenizer.base import TextTokenizer
from fidellm.train.curriculum import (
    STAGES,
    StagedBatches,
    StagedSampler,
    assign_stages,
    conversation_complexity,
    stage_boundaries,
)
from fidellm.train.data import ShuffledBatches, ValidationSet


@dataclass
class Example:
    """One tokenised conversation: inputs and targets of equal length (targets IGNORE_INDEX off the mask)."""

    inputs: np.ndarray
    targets: np.ndarray
    complexity: float = 0.0
    """The conversation's curriculum score (set when tokenised with `score`)."""


@dataclass
class ChatStats:
    """What tokenising a conversation file did."""

    conversations: int = 0
    truncated: int = 0
    dropped: int = 0
    target_tokens: int = 0


def encode_conversation(
    tokenizer: TextTokenizer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    conversation_id: str = "?",
) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one conversation; the mask is 1 exactly on assistant tokens (see module).
    Messages the chat template refuses are a FidelError naming the conversation."""
    try:
        ids = encode_chat(tokenizer, render_chat(messages, tools))
    except FidelError as error:
        raise FidelError(f"conversation {conversation_id}: {error}") from None
    if not ids or ids[0] != tokenizer.bos_id:
        raise FidelError(f"conversation {conversation_id}: the rendered chat does not start with BOS")
    mask, marker = [0] * len(ids), end_of_turn_ids(tokenizer)

    def prefix(length: int, generation_prompt: bool) -> list[int]:
        part = encode_chat(tokenizer, render_chat(messages[:length], tools, generation_prompt))
        if part != ids[: len(part)]:
            raise FidelError(
                f"conversation {conversation_id}: tokenisation is not prefix-stable at message {length}"
                " (the text up to that turn encodes differently inside the whole chat)"
            )
        return part

    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if index == 0:
            raise FidelError(f"conversation {conversation_id}: starts with an assistant turn")
        start = len(prefix(index, True))
        turn = ids if index + 1 == len(messages) else prefix(index + 1, False)  # the whole chat: known
        closes = [i + len(marker) - 1 for i in range(start, len(turn)) if turn[i : i + len(marker)] == marker]
        end = max(closes, default=None)
        if end is None:
            raise FidelError(f"conversation {conversation_id}: assistant turn {index} has no <|im_end|>")
        mask[start : end + 1] = [1] * (end + 1 - start)
    return ids, mask


def example_from(ids: Sequence[int], mask: Sequence[int], seq_len: int) -> tuple[Example | None, bool]:
    """(the example's first seq_len positions or None when no target survives, whether it was cut)."""
    inputs = np.asarray(ids[:-1], dtype=np.int64)
    targets = np.where(np.asarray(mask[1:], dtype=bool), np.asarray(ids[1:], dtype=np.int64), IGNORE_INDEX)
    truncated = len(inputs) > seq_len
    inputs, targets = inputs[:seq_len], targets[:seq_len]
    if not (targets != IGNORE_INDEX).any():
        return None, truncated
    return Example(inputs, targets), truncated


def join_text_parts(messages: Any) -> str | None:
    """Replace each list of OpenAI content parts (`[{"type": "text", "text": ...}, ...]`) in `messages`
    by its texts joined with "\n", the text the chat template renders for it, so the schema, the masks
    and the template all see one string; what is wrong with a part (naming its field), else None.
    Only text parts are accepted, as the template refuses any other."""
    for index, message in enumerate(messages if isinstance(messages, list) else []):
        parts = message.get("content") if isinstance(message, dict) else None
        if not isinstance(parts, list):
            continue
        texts = []
        for number, part in enumerate(parts):
            where = f"messages[{index}].content[{number}]"
            if not isinstance(part, Mapping):
                return f"{where} is {type(part).__name__}, not a content part object"
            if part.get("type") != "text":
                return f"{where}.type is {part.get('type')!r}: only text content parts are supported"
            if not isinstance(part.get("text"), str):
                return f"{where}.text is {type(part.get('text')).__name__}, not a string"
            texts.append(part["text"])
        message["content"] = "\n".join(texts)
    return None


def _read(path: Path, max_samples: int | None, render: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, conversation) of each conversation in a JSONL file (`read_conversations`);
    `render=False` leaves the chat template's check to the caller, which renders each one next."""
    if not path.is_file():
        raise FidelError(f"{path}: no conversation file (run `fidellm data chat RUN` first)")
    count = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if max_samples is not None and count >= max_samples:
                break
            line = decode_line(raw)
            if line is None:
                raise FidelError(f"{path}:{number}: not UTF-8")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise FidelError(f"{path}:{number}: not JSON: {error}") from error
            if not isinstance(record, dict):
                raise FidelError(f"{path}:{number}: not a JSON object")
            surrogate = lone_surrogate(record)  # JSON can escape one; the tokenizer cannot take it
            if surrogate:
                raise FidelError(f"{path}:{number}: {surrogate}, which UTF-8 cannot encode")
            record.setdefault("id", f"{path.name}:{number}")
            conversation = Conversation(
                str(record["id"]), str(record.get("source")), record.get("messages"), record.get("tools")
            )
            problem = join_text_parts(conversation.messages) or conversation_error(conversation, render)
            if problem:
                raise FidelError(f"{path}:{number}: conversation {record['id']}: {problem}")
            count += 1
            yield number, record


def read_conversations(path: Path, max_samples: int | None = None) -> list[dict[str, Any]]:
    """The conversations of a `fidellm data chat` JSONL file (the first `max_samples` when given).

    A `content` given as OpenAI content parts becomes the text the template renders for it
    (`join_text_parts`). Each conversation is checked against the conversation schema
    (`fidellm.chat.schema.conversation_error`, which also renders it), so a line that is not UTF-8, not
    JSON or not a valid conversation is a FidelError naming the file and line here, not a crash inside
    the chat template later."""
    return [record for _, record in _read(path, max_samples, render=True)]


def tokenize_conversations(
    conversations: Sequence[Mapping[str, Any]],
    tokenizer: TextTokenizer,
    seq_len: int,
    score: bool = False,
    where: Sequence[str] | None = None,
) -> tuple[list[Example], ChatStats]:
    """Examples of every conversation that keeps an assistant target within seq_len, with counts; with
    `score` each example carries its conversation's complexity. `where` (one per conversation, e.g.
    "FILE:LINE") goes in front of an error's message."""
    stats = ChatStats()
    examples = []
    for index, record in enumerate(conversations):
        stats.conversations += 1
        try:
            ids, mask = encode_conversation(
                tokenizer, record["messages"], record.get("tools"), str(record["id"])
            )
        except FidelError as error:
            raise (FidelError(f"{where[index]}: {error}") if where else error) from None
        example, truncated = example_from(ids, mask, seq_len)
        if example is None:
            stats.dropped += 1
            continue
        stats.truncated += truncated
        stats.target_tokens += int((example.targets != IGNORE_INDEX).sum())
        if score:
            example.complexity = conversation_complexity(record["messages"], record.get("tools"))
        examples.append(example)
    return examples, stats


def tokenize_file(
    path: Path, tokenizer: TextTokenizer, seq_len: int, max_samples: int | None = None, score: bool = False
) -> tuple[list[Example], ChatStats]:
    """`tokenize_conversations` of `read_conversations(path, max_samples)`, rendering each conversation
    once: its tokenisation is also its chat-template check (errors name the file and line)."""
    located = list(_read(path, max_samples, render=False))
    where = [f"{path}:{number}" for number, _ in located]
    return tokenize_conversations([record for _, record in located], tokenizer, seq_len, score, where)


def pack(examples: Sequence[Example], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy next-fit packing of `examples` (in the given order) into right-padded rows:
    (inputs, targets), each int64 (rows, seq_len)."""
    rows: list[list[Example]] = []
    used = seq_len
    for example in examples:
        if used + len(example.inputs) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += len(example.inputs)
    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example.inputs)
            inputs[r, at : at + n], targets[r, at : at + n] = example.inputs, example.targets
            at += n
    return inputs, targets


class ConversationBatches(ShuffledBatches):
    """Packed conversation rows in a per-epoch shuffled order (`fidellm.train.data.ShuffledBatches`,
    the interface of PackedBatches). Rows are packed once from the examples in a (seed)-shuffled order.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        seq_len: int,
        batch_size: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        source: str = "conversations",
        dropped: int = 0,
    ):
        self.inputs, self.targets = self._pack(examples, seq_len, pad_id, seed)
        super().__init__(len(self.inputs), batch_size, seed, rank, world_size)
        if self.steps_per_epoch == 0:
            packed = (
                f"{len(examples)} conversations pack into {len(self.inputs)} rows of {seq_len} tokens, fewer"
                f" than one batch of {self.global_batch}"
            )
            if dropped:  # `dropped` conversations kept no assistant token within seq_len
                raise FidelError(
                    f"{source}: {dropped} of {dropped + len(examples)} conversations are longer than"
                    f" --seq-len {seq_len} (no assistant token within it) and were dropped; the other"
                    f" {packed}; raise --seq-len (or lower --batch-size)"
                )
            raise FidelError(f"{source}: {packed}; lower --batch-size or add data")

    def _pack(
        self, examples: Sequence[Example], seq_len: int, pad_id: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The training rows: `examples` packed in a seed-shuffled order."""
        order = np.random.default_rng([seed, 1 << 20]).permutation(len(examples))
        return pack([examples[i] for i in order], seq_len, pad_id)

    def rows(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(self.inputs[indices]), torch.from_numpy(self.targets[indices])


class CurriculumConversations(StagedBatches, ConversationBatches):
    """ConversationBatches whose rows are drawn by the curriculum (module docstring); the examples must
    carry their complexity (`tokenize_conversations(..., score=True)`)."""

    def __init__(
        self,
        examples: Sequence[Example],
        seq_len: int,
        batch_size: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        source: str = "conversations",
        dropped: int = 0,
    ):
        super().__init__(examples, seq_len, batch_size, seed, pad_id, rank, world_size, source, dropped)
        self.sampler = StagedSampler(self.row_stages, self.global_batch, seed)

    def _pack(
        self, examples: Sequence[Example], seq_len: int, pad_id: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of one stage each, stage by stage, each stage's examples in a seed-shuffled order."""
        if not examples:  # ConversationBatches reports the empty data set
            self.row_stages = np.zeros(0, dtype=np.int64)
            return pack(examples, seq_len, pad_id)
        scores = np.array([example.complexity for example in examples], dtype=np.float64)
        tokens = np.array([len(example.inputs) for example in examples], dtype=np.float64)
        self.boundaries = stage_boundaries(scores, tokens)
        stages = assign_stages(scores, self.boundaries)
        inputs, targets, row_stages = [], [], []
        for stage in range(len(STAGES)):
            members = np.flatnonzero(stages == stage)
            order = np.random.default_rng([seed, 1 << 20, stage]).permutation(members)
            stage_inputs, stage_targets = pack([examples[i] for i in order], seq_len, pad_id)
            inputs.append(stage_inputs)
            targets.append(stage_targets)
            row_stages.append(np.full(len(stage_inputs), stage, dtype=np.int64))
        self.row_stages = np.concatenate(row_stages)
        return np.concatenate(inputs), np.concatenate(targets)


def chat_validation_batches(
    examples: Sequence[Example], seq_len: int, batch_size: int, max_batches: int, pad_id: int
) -> ValidationSet:
    """The first `max_batches` batches of eval rows packed in file order (the same every evaluation)."""
    inputs, targets = pack(examples, seq_len, pad_id)
    if len(inputs) == 0:
        raise FidelError(
            f"chat eval set: no conversation keeps an assistant token within seq_len {seq_len};"
            " raise --seq-len or add conversations"
        )
    inputs, targets = inputs[: batch_size * max_batches], targets[: batch_size * max_batches]
    return ValidationSet(
        [
            (torch.from_numpy(inputs[i : i + batch_size]), torch.from_numpy(targets[i : i + batch_size]))
            for i in range(0, len(inputs), batch_size)
        ]
    )


def chat_data(
    chat_dir: Path,
    tokenizer: TextTokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    eval_batches: int,
    max_samples: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    curriculum: bool = False,
) -> tuple[ConversationBatches, ValidationSet, dict[str, Any]]:
    """(training batches of chat_dir/train.jsonl, validation batches of chat_dir/eval.jsonl, counts);
    with `curriculum` the training rows are CurriculumConversations."""
    train_path, eval_path = chat_dir / "train.jsonl", chat_dir / "eval.jsonl"
    train_examples, train_stats = tokenize_file(train_path, tokenizer, seq_len, max_samples, curriculum)
    eval_examples, eval_stats = tokenize_file(eval_path, tokenizer, seq_len)
    if eval_stats.conversations == 0:
        raise FidelError(
            f"{eval_path}: no conversations to validate on; make the chat data again with a larger"
            " `fidellm data chat --eval-split` (0 puts none there)"
        )
    batches = (CurriculumConversations if curriculum else ConversationBatches)(
        train_examples,
        seq_len,
        batch_size,
        seed,
        tokenizer.pad_id,
        rank,
        world_size,
        str(train_path),
        train_stats.dropped,
    )
    val = chat_validation_batches(eval_examples, seq_len, batch_size, eval_batches, tokenizer.pad_id)
    counts = {"train": vars(train_stats), "eval": vars(eval_stats), "train_rows": len(batches.inputs)}
    return batches, val, counts
