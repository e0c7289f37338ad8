"""Log-likelihood of continuations under a causal LM, batched, computed exactly as lm-evaluation-harness does.

`continuation_logprobs` scores log P(continuation | context) with the model's own forward pass
(`model(ids, logits_to_keep=n).logits`: only the continuations' positions get logits). Tokenization
follows lm-eval 0.4.13's HF backend (`LM._encode_pair` for causal models, the `loglikelihood` rule for
an empty context, `HFLM._loglikelihood_tokens` for truncation), so figures computed here and by
`lm_eval --model hf` on the exported directory agree:

- whitespace at the end of the context moves to the start of the continuation;
- context ids = encode(context) with BOS; continuation ids = encode(context + continuation) with BOS,
  minus as many leading ids as the context has (the model sees context ids + continuation ids);
- an empty context becomes BOS alone;
- a sequence longer than the model's context (+1) loses tokens from the left.

`score_choices` turns that into multiple-choice classification: the argmax of the summed log-probability
(lm-eval's `acc`) and of the log-probability per character of the choice (lm-eval's `acc_norm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from fidellm.errors import FidelError
from fidellm.generate.batch import pad_batch
from fidellm.models.blocks import is_kv_cache
from fidellm.tokenizer.base import TextTokenizer


class ContinuationScore(NamedTuple):
    """Summed log-probability (nats) of a continuation's tokens, how many tokens and UTF-8 bytes it has,
    and whether greedy decoding from the context would have produced exactly those tokens."""

    logprob: float
    tokens: int
    bytes: int
    greedy: bool


Pair = tuple[list[int], list[int]]
"""(context ids, continuation ids) of one scored continuation."""


def encode_pair(tokenizer: TextTokenizer, context: str, continuation: str) -> Pair:
    """(context ids, continuation ids) as lm-eval's HF backend makes them for a causal model."""
    return encode_pairs(tokenizer, [context], [continuation])[0]


def encode_pairs(
    tokenizer: TextTokenizer, contexts: Sequence[str], continuations: Sequence[str]
) -> list[Pair]:
    """`encode_pair` of every (context, continuation), the same ids, with each distinct context encoded
    once and all texts in batched tokenizer calls: the labels of a k-shot prompt share its context, which
    was encoded once per label, one text per call."""
    moved = [
        None if context == "" else _move_spaces(context, continuation)
        for context, continuation in zip(contexts, continuations, strict=True)
    ]
    distinct = list(dict.fromkeys(split[0] for split in moved if split is not None))
    context_ids = dict(zip(distinct, _encode_all(tokenizer, distinct, True), strict=True))
    wholes = iter(_encode_all(tokenizer, [c + x for c, x in filter(None, moved)], True))
    bare = [continuation for continuation, split in zip(continuations, moved, strict=True) if split is None]
    alone = iter(_encode_all(tokenizer, bare, False))
    pairs: list[Pair] = []
    for split in moved:
        if split is None:  # an empty context: BOS alone conditions the continuation
            ids = next(alone)
            pairs.append(([tokenizer.bos_id], ids) if ids[:1] != [tokenizer.bos_id] else (ids[:1], ids[1:]))
        else:
            ids = context_ids[split[0]]
            pairs.append((list(ids), next(wholes)[len(ids) :]))
    return pairs


def _move_spaces(context: str, continuation: str) -> tuple[str, str]:
    """Whitespace at the end of the context moved to the start of the continuation (lm-eval's rule)."""
    spaces = len(context) - len(context.rstrip())
    return (context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation)


def _encode_all(tokenizer: TextTokenizer, texts: list[str], add_bos: bool) -> list[list[int]]:
    """Ids of every text, in one `encode_batch` call (no call for no texts)."""
    return tokenizer.encode_batch(texts, add_bos=add_bos) if texts else []


def model_context(model: nn.Module) -> int:
    """The longest sequence the model takes (`config.max_position_embeddings`)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        raise FidelError("the model has no config.max_position_embeddings; pass max_length")
    return limit


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.inference_mode()
def continuation_logprobs(
    model: nn.Module,
    tokenizer: TextTokenizer,
    contexts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[ContinuationScore]:
    """Score every continuation after its context (module docstring); one `ContinuationScore` per pair,
    in input order. Rows are batched longest first and right-padded (a causal model ignores the padding).

    Pairs that share their context ids (the choices of one item) and fit the context untruncated are
    scored from one pass over the context when the model keeps a KV cache (the Llama): each choice
    continues from a copy of the context's cache, so a k-shot prompt runs once, not once per choice.
    The log-probabilities are the same up to float rounding; `batch_size` then counts contexts.
    """
    if len(contexts) != len(continuations):
        raise FidelError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if batch_size < 1:
        raise FidelError(f"batch size must be at least 1, got {batch_size}")
    limit = max_length if max_length is not None else model_context(model)
    pairs = encode_pairs(tokenizer, contexts, continuations)
    for number, (_, continuation_ids) in enumerate(pairs):
        if not continuation_ids:
            raise FidelError(f"continuation {number} ({continuations[number]!r}) has no tokens of its own")
        if len(continuation_ids) > limit:
            raise FidelError(
                f"continuation {number} has {len(continuation_ids)} tokens, more than the context of {limit}"
            )
    model.eval()
    groups: dict[tuple[int, ...], list[int]] = {}
    if hasattr(model, "new_cache") and is_kv_cache(model.new_cache()):
        for i, (context_ids, continuation_ids) in enumerate(pairs):
            if len(context_ids) + len(continuation_ids) <= limit + 1:
                groups.setdefault(tuple(context_ids), []).append(i)
    shared = [(list(ids), members) for ids, members in groups.items() if len(members) > 1]
    alone = sorted(set(range(len(pairs))) - {i for _, members in shared for i in members})
    scored = _score_shared(model, pairs, shared, tokenizer.pad_id, batch_size)
    scored.update(_score_alone(model, pairs, alone, tokenizer.pad_id, batch_size, limit))
    return [
        ContinuationScore(
            logprob=scored[i][0],
            tokens=len(pairs[i][1]),
            bytes=len(continuations[i].encode("utf-8")),
            greedy=scored[i][1],
        )
        for i in range(len(pairs))
    ]


def _logprob_and_greedy(logprobs: Tensor, target: list[int]) -> tuple[float, bool]:
    """Summed log-probability of `target` under per-position log-probabilities (len(target), vocab), and
    whether each target token is the argmax."""
    ids = torch.tensor(target, dtype=torch.long, device=logprobs.device)
    return float(logprobs.gather(1, ids[:, None]).sum()), bool((logprobs.argmax(-1) == ids).all())


def _score_alone(
    model: nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    indices: list[int],
    pad_id: int,
    batch_size: int,
    limit: int,
) -> dict[int, tuple[float, bool]]:
    """{pair index: (logprob, greedy)} of the pairs at `indices`, each a row of context + continuation
    (truncated from the left to the model's context), batched longest first."""
    device = _device(model)
    rows = {i: (pairs[i][0] + pairs[i][1])[-(limit + 1) :][:-1] for i in indices}
    order = sorted(indices, key=lambda i: -len(rows[i]))
    scores: dict[int, tuple[float, bool]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(rows[chunk[0]])
        padded = [torch.tensor(rows[i], dtype=torch.long) for i in chunk]
        ids = pad_sequence(padded, batch_first=True, padding_value=pad_id)
        # only the columns holding some row's continuation get logits (the rest is context)
        keep = max(width - len(rows[i]) + len(pairs[i][1]) for i in chunk)
        logits = model(ids.to(device), logits_to_keep=keep).logits
        for row, i in enumerate(chunk):
            end = len(rows[i]) - width + keep  # the row's last position, counted in the kept columns
            target = pairs[i][1]
            logprobs = F.log_softmax(logits[row, end - len(target) : end].float(), dim=-1)
            scores[i] = _logprob_and_greedy(logprobs, target)
    return scores


def _score_shared(
    model: nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    groups: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
) -> dict[int, tuple[float, bool]]:
    """{pair index: (logprob, greedy)} of the pairs of `groups` ((context ids, the pair indices sharing
    them)): `batch_size` contexts left-padded per pass, whose last position predicts each continuation's
    first token; then every continuation's other tokens, right-padded after a copy of its context's cache."""
    device = _device(model)
    groups = sorted(groups, key=lambda group: -len(group[0]))
    scores: dict[int, tuple[float, bool]] = {}
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        ids, mask = pad_batch([context for context, _ in chunk], pad_id, device, left=True)
        cache = model.new_cache()
        last = model(ids, cache=cache, attention_mask=mask, logits_to_keep=1).logits[:, -1]
        first = F.log_softmax(last.float(), dim=-1)
        members = [(owner, i) for owner, (_, indices) in enumerate(chunk) for i in indices]
        rest = None
        if any(len(pairs[i][1]) > 1 for _, i in members):
            owners = torch.tensor([owner for owner, _ in members], device=device)
            inputs, new_mask = pad_batch([pairs[i][1][:-1] for _, i in members], pad_id, device, left=False)
            copies = [layer.select(owners) for layer in cache]
            logits = model(inputs, cache=copies, attention_mask=torch.cat((mask[owners], new_mask), 1)).logits
            rest = F.log_softmax(logits.float(), dim=-1)
        for row, (owner, i) in enumerate(members):
            target = pairs[i][1]
            logprobs = first[owner, None]
            if rest is not None and len(target) > 1:
                logprobs = torch.cat((logprobs, rest[row, : len(target) - 1]))
            scores[i] = _logprob_and_greedy(logprobs, target)
    return scores


@dataclass
class ChoiceScores:
    """Per item, the log-likelihood of each choice, and the predicted choice index by raw log-likelihood
    (`raw`, lm-eval's acc) and by log-likelihood per character of the choice (`norm`, lm-eval's acc_norm)."""

    logprobs: list[list[float]]
    raw: list[int]
    norm: list[int]


def score_choices(
    model: nn.Module,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    choices: Sequence[str],
    target_delimiter: str = " ",
    batch_size: int = 8,
) -> ChoiceScores:
    """Score `target_delimiter + choice` after every prompt; ties go to the first choice (numpy argmax)."""
    if not prompts or not choices:
        raise FidelError("nothing to score: no prompts or no choices")
    contexts = [prompt for prompt in prompts for _ in choices]
    continuations = [target_delimiter + choice for _ in prompts for choice in choices]
    scores = continuation_logprobs(model, tokenizer, contexts, continuations, batch_size)
    table = np.array([score.logprob for score in scores]).reshape(len(prompts), len(choices))
    lengths = np.array([len(choice) for choice in choices], dtype=np.float64)
    return ChoiceScores(
        logprobs=table.tolist(),
        raw=[int(i) for i in table.argmax(axis=1)],
        norm=[int(i) for i in (table / lengths).argmax(axis=1)],
    )
