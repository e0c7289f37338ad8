"""Chat evaluations of a fine-tuned assistant, as tasks of `fidellm eval` (issue 6).

Tasks; the group name `chat` runs all five. They are not in the default task list of a base model;
`fidellm eval` adds `chat` to the defaults when MODEL is a chat fine-tune (its nearest train/config.json
has data "chat", as `fidellm sft` writes), otherwise ask for them with `--tasks chat` (or by name).
- sft-heldout: mean loss in nats per assistant token over the chat eval split (`eval.jsonl` of the
  `fidellm data chat` directory the model was tuned on, or `--chat-dir`), with the assistant-only masks
  of SFT (`fidellm.sft.data.encode_conversation`). Each conversation is scored alone, cut to the model's
  context, so the figure does not depend on how SFT packed its rows (its logged val_loss is packed).
- tool-calls: every assistant turn of the eval split that calls tools is asked for: the conversation up
  to that turn, with its tools. An answer is valid when `fidellm.serve.tools.parse_tool_calls` finds at
  least one call and every call names one of the defined tools with a JSON object as arguments (stricter
  than "one good call": a client would run every call). valid/total, with the reasons for the rest.
- translation: FLORES-200 devtest, NTREX-128 and MAFAND-MT test, en→am and am→en. Each line is asked
  exactly as the SFT data asks (`fidellm.chat.translation.translation_request`), with no system prompt;
  the answer's whitespace is collapsed. chrF++ (sacrebleu `CHRF(word_order=2)`) and BLEU (sacrebleu
  defaults, 13a tokenisation: Ethiopic text splits on spaces and ASCII punctuation only, so Amharic BLEU
  is coarse and chrF++ is the headline), corpus-level, each with sacrebleu's signature.
- instructions-am: answers to the Amharic instructions of the eval split (AmharicIR-Instr) with their
  reference answers; chrF++ against the reference, share of Ethiopic characters, share finished.
- chat-bench: answers to MT-bench (both turns, the second asked after the model's own first answer)
  and Vicuna-bench, saved for reading; the figure is the share of answers that ended by themselves.
Decoding is greedy up to `<|im_end|>` (the stop settings of `fidellm chat`), batched through
`fidellm.generate.engine.generate`. Every answer goes to OUT/generations/<task>[-<set>].jsonl with its
prompt, reference (if any) and finish reason. `--limit N` keeps a seeded sample of N items per set
(and per direction), in file order.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sacrebleu.metrics import BLEU, CHRF
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from fidellm.chat.session import chat_generation_config
from fidellm.chat.template import encode_chat, render_chat
from fidellm.chat.translation import translation_request
from fidellm.data.registry import load_registry
from fidellm.errors import FidelError
from fidellm.eval.chat_data import (
    AMHARIC_INSTRUCTION_SOURCES,
    BENCHES,
    TRANSLATION_SETS,
    BenchQuestion,
    ParallelLine,
    read_bench,
    read_eval_split,
    read_parallel,
)
from fidellm.eval.probes import ethiopic_share
from fidellm.eval.results import TaskResult
from fidellm.eval.sampling import limited
from fidellm.generate.engine import GenerationConfig, generate
from fidellm.models.loss import IGNORE_INDEX
from fidellm.serve.tools import parse_tool_calls
from fidellm.sft.data import Example, encode_conversation, example_from
from fidellm.tokenizer.base import TextTokenizer
from fidellm.tokenizer.special import TOOL_CALL_START

if TYPE_CHECKING:
    from fidellm.eval.suite import EvalContext

DIRECTIONS = ("en-am", "am-en")
TRANSLATION_MAX_NEW_TOKENS = 256
INSTRUCTION_MAX_NEW_TOKENS = 512
ANSWER_MAX_NEW_TOKENS = 1024
TOOL_MAX_NEW_TOKENS = 256
GENERATION_BATCH = 16
LOSS_BATCH_TOKENS = 8192
"""Rows × longest row per held-out loss batch (bounds the float32 logits held at once)."""
GENERATIONS_DIR = "generations"


@dataclass(frozen=True)
class ChatPrompt:
    """A chat to answer: its messages (ending with a user or tool turn) and the tools it may call."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Answer:
    """A generated assistant turn; finish_reason is "stop" (it ended itself), "length" (max tokens) or
    "prompt_too_long" (the prompt filled the context; text is empty)."""

    text: str
    finish_reason: str


ChatGenerator = Callable[[Sequence[ChatPrompt], int], list[Answer]]
"""(prompts, max_new_tokens) -> one answer per prompt, in order."""


class ModelGenerator:
    """Greedy answers of a model: each chat rendered with the chat template and the generation prompt,
    batched by prompt length, stopped at `<|im_end|>` or after max_new_tokens (fewer where the context
    is shorter)."""

    def __init__(self, model: nn.Module, tokenizer: TextTokenizer, batch_size: int = GENERATION_BATCH):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def __call__(self, prompts: Sequence[ChatPrompt], max_new_tokens: int) -> list[Answer]:
        base = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        config = chat_generation_config(self.model, self.tokenizer, base)
        ids = [
            encode_chat(self.tokenizer, render_chat(p.messages, p.tools, add_generation_prompt=True))
            for p in prompts
        ]
        context = int(self.model.config.max_position_embeddings)
        answers = [Answer("", "prompt_too_long")] * len(prompts)
        fitting = sorted((i for i in range(len(ids)) if len(ids[i]) < context), key=lambda i: len(ids[i]))
        for start in range(0, len(fitting), self.batch_size):
            batch = fitting[start : start + self.batch_size]
            room = context - max(len(ids[i]) for i in batch)
            batch_config = replace(config, max_new_tokens=min(max_new_tokens, room))
            results = generate(self.model, self.tokenizer, [ids[i] for i in batch], batch_config)
            for index, result in zip(batch, results, strict=True):
                answers[index] = Answer(result.text, result.finish_reason)
        return answers


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, tuple[float, str]]:
    """{"chrF++": (score, sacrebleu signature), "BLEU": (score, signature)} of one reference per line."""
    if len(hypotheses) != len(references):
        raise FidelError(f"{len(hypotheses)} translations for {len(references)} references")
    if not references:
        raise FidelError("no translations to score")
    scores = {}
    for name, metric in (("chrF++", CHRF(word_order=2)), ("BLEU", BLEU())):
        score = metric.corpus_score(list(hypotheses), [list(references)]).score
        scores[name] = (float(score), str(metric.get_signature()))
    return scores


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _finished(answers: Sequence[Answer]) -> float:
    """Share of answers that ended by themselves (at `<|im_end|>`)."""
    return sum(a.finish_reason == "stop" for a in answers) / len(answers)


def _finish_reasons(answers: Sequence[Answer]) -> dict[str, int]:
    return dict(sorted(Counter(a.finish_reason for a in answers).items()))


def evaluate_translation(
    lines: Sequence[ParallelLine], set_name: str, split: str, generator: ChatGenerator, out_dir: Path
) -> list[TaskResult]:
    """chrF++ and BLEU of both directions over `lines`; answers to OUT/generations/translation-*.jsonl."""
    if not lines:
        raise FidelError(f"translation set {set_name}: no lines to translate")
    results = []
    for direction in DIRECTIONS:
        started = time.perf_counter()
        sources = [line.english if direction == "en-am" else line.amharic for line in lines]
        references = [line.amharic if direction == "en-am" else line.english for line in lines]
        requests = [
            translation_request(direction, s, line.id) for s, line in zip(sources, lines, strict=True)
        ]
        answers = generator([ChatPrompt([r]) for r in requests], TRANSLATION_MAX_NEW_TOKENS)
        hypotheses = [" ".join(a.text.split()) for a in answers]
        path = out_dir / GENERATIONS_DIR / f"translation-{set_name}-{direction}.jsonl"
        write_jsonl(path, [
            {"id": line.id, "direction": direction, "prompt": r["content"], "reference": ref,
             "answer": a.text, "finish_reason": a.finish_reason}
            for line, r, ref, a in zip(lines, requests, references, answers, strict=True)
        ])  # fmt: skip
        details = {"generations": str(path), "finished": _finished(answers),
                   "finish_reasons": _finish_reasons(answers), "max_new_tokens": TRANSLATION_MAX_NEW_TOKENS,
                   "decoding": "greedy"}  # fmt: skip
        seconds = round(time.perf_counter() - started, 2)
        for metric, (value, signature) in corpus_scores(hypotheses, references).items():
            results.append(TaskResult(
                f"translation/{set_name}/{direction}", metric, value, len(lines), split,
                details={**details, "signature": signature}, seconds=seconds,
            ))  # fmt: skip
    return results


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    tokenizer: TextTokenizer,
    conversations: Sequence[Mapping[str, Any]],
    device: torch.device | str,
    seq_len: int,
) -> TaskResult:
    """Mean nats per assistant token over `conversations`, each scored alone in its first seq_len
    positions (a conversation with no assistant token there is dropped and counted); per source too."""
    rows, truncated, dropped = [], 0, 0
    for record in conversations:
        ids, mask = encode_conversation(tokenizer, record["messages"], record.get("tools"), str(record["id"]))
        example, cut = example_from(ids, mask, seq_len)
        if example is None:
            dropped += 1
            continue
        truncated += cut
        rows.append((example, str(record.get("source", "?"))))
    if not rows:
        raise FidelError(f"sft-heldout: no conversation keeps an assistant token within {seq_len} tokens")
    sums: dict[str, list[float]] = {}
    for batch in _length_batches(rows):
        inputs = pad_sequence(
            [torch.from_numpy(e.inputs) for e, _ in batch], batch_first=True, padding_value=tokenizer.pad_id
        )
        targets = pad_sequence(
            [torch.from_numpy(e.targets) for e, _ in batch], batch_first=True, padding_value=IGNORE_INDEX
        ).to(device)
        nll = model(inputs.to(device), targets, reduction="none").loss  # per token, 0 where ignored
        for row, (_, source) in enumerate(batch):
            total = sums.setdefault(source, [0.0, 0.0])
            total[0] += nll[row].sum().item()
            total[1] += (targets[row] != IGNORE_INDEX).sum().item()
    nats, tokens = (sum(total[k] for total in sums.values()) for k in (0, 1))
    details = {
        "target_tokens": int(tokens), "truncated": truncated, "dropped": dropped, "seq_len": seq_len,
        "by_source": {s: {"loss": n / t, "target_tokens": int(t)} for s, (n, t) in sorted(sums.items())},
    }  # fmt: skip
    return TaskResult("sft-heldout", "loss", nats / tokens, len(rows), "eval", False, details)


def _length_batches(rows: list[tuple[Example, str]]) -> list[list[tuple[Example, str]]]:
    """`rows` by increasing length, in batches of at most LOSS_BATCH_TOKENS padded tokens (or one row)."""
    batches: list[list[tuple[Example, str]]] = []
    for row in sorted(rows, key=lambda r: len(r[0].inputs)):
        if batches and (len(batches[-1]) + 1) * len(row[0].inputs) <= LOSS_BATCH_TOKENS:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


@dataclass(frozen=True)
class ToolTurn:
    """An assistant turn of the eval split that calls tools: the chat before it and what it called."""

    id: str
    prompt: ChatPrompt
    reference_names: tuple[str, ...]


def tool_turns(conversations: Sequence[Mapping[str, Any]]) -> list[ToolTurn]:
    """Every assistant turn with tool calls in conversations that define tools, in file order."""
    turns = []
    for record in conversations:
        tools = record.get("tools")
        for index, message in enumerate(record["messages"]):
            if tools and message["role"] == "assistant" and message.get("tool_calls"):
                names = tuple(call["function"]["name"] for call in message["tool_calls"])
                prompt = ChatPrompt(list(record["messages"][:index]), list(tools))
                turns.append(ToolTurn(f"{record['id']}#{index}", prompt, names))
    return turns


def tool_call_verdict(text: str, tool_names: set[str]) -> tuple[str, list[str]]:
    """("valid" | "no_call" | "malformed_call" | "unknown_tool" | "arguments_not_object", names called)."""
    _, calls = parse_tool_calls(text)
    if not calls:
        return ("malformed_call" if TOOL_CALL_START in text else "no_call"), []
    names = [call.name for call in calls]
    if any(name not in tool_names for name in names):
        return "unknown_tool", names
    if any(not isinstance(json.loads(call.arguments), dict) for call in calls):
        return "arguments_not_object", names
    return "valid", names


def tool_call_validity(turns: Sequence[ToolTurn], generator: ChatGenerator, out_dir: Path) -> TaskResult:
    """Share of tool turns answered with valid calls; answers to OUT/generations/tool-calls.jsonl."""
    if not turns:
        raise FidelError("tool-calls: the chat eval split has no assistant turn that calls a tool")
    answers = generator([turn.prompt for turn in turns], TOOL_MAX_NEW_TOKENS)
    records, reasons, same = [], Counter(), 0
    for turn, answer in zip(turns, answers, strict=True):
        defined = {tool["function"]["name"] for tool in turn.prompt.tools or []}
        verdict, names = tool_call_verdict(answer.text, defined)
        reasons[verdict] += 1
        same += verdict == "valid" and sorted(names) == sorted(turn.reference_names)
        records.append({"id": turn.id, "prompt": turn.prompt.messages, "tools": sorted(defined),
                        "reference": list(turn.reference_names), "answer": answer.text,
                        "finish_reason": answer.finish_reason, "verdict": verdict})  # fmt: skip
    path = write_jsonl(out_dir / GENERATIONS_DIR / "tool-calls.jsonl", records)
    details = {"valid": reasons["valid"], "total": len(turns), "reasons": dict(sorted(reasons.items())),
               "same_tools_as_reference": same, "finish_reasons": _finish_reasons(answers),
               "generations": str(path)}  # fmt: skip
    return TaskResult(
        "tool-calls", "validity", reasons["valid"] / len(turns), len(turns), "eval", True, details
    )


def instruction_answers(
    conversations: Sequence[Mapping[str, Any]], generator: ChatGenerator, out_dir: Path
) -> list[TaskResult]:
    """Answers to the Amharic instructions (the last assistant turn is the reference), saved with it."""
    chosen = [c for c in conversations if c.get("source") in AMHARIC_INSTRUCTION_SOURCES]
    if not chosen:
        sources = ", ".join(AMHARIC_INSTRUCTION_SOURCES)
        raise FidelError(f"instructions-am: the chat eval split has no conversation from {sources}")
    prompts = [ChatPrompt(list(c["messages"][:-1]), c.get("tools")) for c in chosen]
    references = [c["messages"][-1].get("content") or "" for c in chosen]
    answers = generator(prompts, INSTRUCTION_MAX_NEW_TOKENS)
    path = write_jsonl(out_dir / GENERATIONS_DIR / "instructions-am.jsonl", [
        {"id": c["id"], "prompt": p.messages, "reference": ref, "answer": a.text,
         "finish_reason": a.finish_reason}
        for c, p, ref, a in zip(chosen, prompts, references, answers, strict=True)
    ])  # fmt: skip
    texts = [a.text for a in answers]
    value, signature = corpus_scores([" ".join(t.split()) for t in texts], references)["chrF++"]
    details = {"generations": str(path), "finish_reasons": _finish_reasons(answers),
               "max_new_tokens": INSTRUCTION_MAX_NEW_TOKENS}  # fmt: skip
    task, n = "instructions-am", len(chosen)
    return [
        TaskResult(task, "chrF++", value, n, "eval", details={**details, "signature": signature}),
        TaskResult(task, "ethiopic_share", ethiopic_share(texts), n, "eval", details=details),
        TaskResult(task, "finished", _finished(answers), n, "eval", details=details),
    ]


def bench_answers(questions: Sequence[BenchQuestion], generator: ChatGenerator, out_dir: Path) -> TaskResult:
    """Answers to every turn of every question (turn k asked after the model's own earlier answers);
    the share that ended by themselves; all saved to OUT/generations/<bench>.jsonl."""
    if not questions:
        raise FidelError("chat-bench: no questions")
    bench = questions[0].bench
    answers: list[list[Answer]] = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        asked = [i for i, q in enumerate(questions) if len(q.turns) > turn]
        prompts = []
        for i in asked:
            messages: list[dict[str, Any]] = []
            for question, answer in zip(questions[i].turns[:turn], answers[i], strict=True):
                messages += [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer.text},
                ]
            prompts.append(ChatPrompt([*messages, {"role": "user", "content": questions[i].turns[turn]}]))
        for i, answer in zip(asked, generator(prompts, ANSWER_MAX_NEW_TOKENS), strict=True):
            answers[i].append(answer)
    records = [
        {"id": f"{bench}/{q.question_id}", "category": q.category, "turns": [
            {"prompt": prompt, "reference": q.reference(k),
             "answer": a.text, "finish_reason": a.finish_reason}
            for k, (prompt, a) in enumerate(zip(q.turns, answers[i], strict=True))
        ]}
        for i, q in enumerate(questions)
    ]  # fmt: skip
    path = write_jsonl(out_dir / GENERATIONS_DIR / f"{bench}.jsonl", records)
    flat = [a for row in answers for a in row]
    details = {"questions": len(questions), "answers": len(flat), "generations": str(path),
               "mean_answer_chars": sum(len(a.text) for a in flat) / len(flat),
               "finish_reasons": _finish_reasons(flat),
               "max_new_tokens": ANSWER_MAX_NEW_TOKENS}  # fmt: skip
    return TaskResult(f"chat/{bench}", "finished", _finished(flat), len(flat), "test", True, details)


# ---------------------------------------------------------------------------------------------- tasks


def _out_dir(ctx: EvalContext) -> Path:
    if ctx.out_dir is None:
        raise FidelError("the chat evaluations need an output directory for their generations")
    return ctx.out_dir


def _eval_split(ctx: EvalContext) -> list[dict[str, Any]]:
    if ctx.chat_dir is None:
        raise FidelError(
            "no chat eval split: MODEL is not a `fidellm sft` run and no --run RUN has a chat/ directory;"
            " pass --chat-dir DIR (the `fidellm data chat` output holding eval.jsonl)"
        )
    return read_eval_split(ctx.chat_dir, ctx.files_read)


def task_sft_heldout(ctx: EvalContext) -> list[TaskResult]:
    conversations = limited(_eval_split(ctx), ctx.limit, ctx.seed)
    seq_len = int(ctx.model.config.max_position_embeddings)
    return [heldout_loss(ctx.model, ctx.tokenizer, conversations, ctx.device, seq_len)]


def task_tool_calls(ctx: EvalContext) -> list[TaskResult]:
    turns = limited(tool_turns(_eval_split(ctx)), ctx.limit, ctx.seed)
    return [tool_call_validity(turns, ModelGenerator(ctx.model, ctx.tokenizer), _out_dir(ctx))]


def task_translation(ctx: EvalContext) -> list[TaskResult]:
    registry, generator, results = load_registry(), ModelGenerator(ctx.model, ctx.tokenizer), []
    for set_name, (_, _, split) in TRANSLATION_SETS.items():
        lines = read_parallel(set_name, ctx.data_dir, registry, ctx.files_read)
        results += evaluate_translation(limited(lines, ctx.limit, ctx.seed), set_name, split, generator,
                                        _out_dir(ctx))  # fmt: skip
    return results


def task_instructions(ctx: EvalContext) -> list[TaskResult]:
    chosen = [c for c in _eval_split(ctx) if c.get("source") in AMHARIC_INSTRUCTION_SOURCES]
    generator = ModelGenerator(ctx.model, ctx.tokenizer)
    return instruction_answers(limited(chosen, ctx.limit, ctx.seed), generator, _out_dir(ctx))


def task_bench(ctx: EvalContext) -> list[TaskResult]:
    registry, generator = load_registry(), ModelGenerator(ctx.model, ctx.tokenizer)
    return [
        bench_answers(
            limited(read_bench(bench, ctx.data_dir, registry, ctx.files_read), ctx.limit, ctx.seed),
            generator,
            _out_dir(ctx),
        )
        for bench in BENCHES
    ]


CHAT_TASKS: dict[str, Callable[[EvalContext], list[TaskResult]]] = {
    "sft-heldout": task_sft_heldout,
    "tool-calls": task_tool_calls,
    "translation": task_translation,
    "instructions-am": task_instructions,
    "chat-bench": task_bench,
}
"""The chat tasks in the order the `chat` group runs them (quick ones first)."""
TASK_GROUPS: dict[str, tuple[str, ...]] = {"chat": tuple(CHAT_TASKS)}
