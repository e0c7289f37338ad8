"""Rows decoded together: each with its own settings, and (KV-cache models) batches that merge and
shrink between steps, the mechanism behind the server's continuous batching.

A `DecodeBatch` starts with its rows' prompts; its first `step()` is their prefill (of what is left
of them after any `prefill_part`: Llama prompts may be fed a few columns at a time). After any step
every row has exactly one pending token, so two stepped batches can `merge` and a batch can `keep`
a subset of its rows, between two decode steps:
- Llama batches are left-padded. Merging pads the shorter cache on the left with masked zeros;
  keeping drops rows and then the leading cache columns no remaining row uses. Positions come from
  the attention mask, so a row's logits never depend on its neighbours (up to float rounding of a
  different batch shape), and the padded cache is never longer than its longest row.
- H-Net batches (right-padded prefill, per-level routing caches) neither merge nor shrink: a finished
  row is fed padding until its whole batch is done.

Rows with equal sampling settings share one call of the sampler; every row draws from its own
generator, so a row's text does not depend on the batch it happens to share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fidellm.errors import FidelError
from fidellm.generate.config import (
    FinishReason,
    GenerationConfig,
    GenerationResult,
    check_seed,
    default_stop_ids,
)
from fidellm.generate.sampling import choose_tokens
from fidellm.generate.stream import TokenStream
from fidellm.models.blocks import KVCache, is_kv_cache
from fidellm.models.hnet import HNetConfig
from fidellm.tokenizer.base import TextTokenizer


@dataclass(eq=False)
class DecodeRow:
    """One sequence being decoded: its prompt, settings, random stream, text stream and result.
    `owner` is whoever asked for it (the server's request), untouched here. Rows compare by identity."""

    prompt_ids: list[int]
    config: GenerationConfig
    generator: torch.Generator
    stream: TokenStream
    stop_ids: frozenset[int]
    result: GenerationResult = field(init=False)
    finished: bool = False
    owner: Any = None

    def __post_init__(self) -> None:
        self.result = GenerationResult(prompt_ids=list(self.prompt_ids))

    @property
    def sampling(self) -> tuple[float, int, float, float]:
        """The settings the sampler needs; rows with equal ones are sampled in one call."""
        c = self.config
        return (c.temperature, c.top_k, c.top_p, c.repetition_penalty)


def new_rows(
    model: nn.Module,
    tokenizer: TextTokenizer,
    prompt_ids: Sequence[list[int]],
    config: GenerationConfig,
    owner: Any = None,
) -> list[DecodeRow]:
    """Rows for already-encoded prompts, row i drawing from a generator seeded `seed + i` (the seed
    drawn from torch's global RNG when the config has none). Checks the tokenizer's vocabulary against
    the model's, stop ids, context length and seeds."""
    if tokenizer.vocab_size > model.config.vocab_size:  # its ids would index past the embedding
        raise FidelError(
            f"generation: the tokenizer has {tokenizer.vocab_size:,} ids and the model only"
            f" {model.config.vocab_size:,}: it is not the tokenizer this model was trained with"
        )
    stop_ids = frozenset(config.stop_token_ids or default_stop_ids(model, tokenizer))
    bad = sorted(i for i in stop_ids if not 0 <= i < model.config.vocab_size)
    if bad:
        raise FidelError(f"generation: stop token ids {bad} are outside the model's vocabulary")
    context = model.config.max_position_embeddings
    for row, ids in enumerate(prompt_ids):
        if not ids:
            raise FidelError(f"generation: prompt {row} is empty (no tokens to condition on)")
    for row, ids in enumerate(prompt_ids):
        if len(ids) + config.max_new_tokens > context:
            fits, room = context - config.max_new_tokens, context - len(ids)
            ways = [f"shorten it to at most {fits} tokens"] if fits > 0 else []
            ways += [f"ask for at most {room} new tokens"] if room > 0 else []
            raise FidelError(
                f"generation: prompt {row} has {len(ids)} tokens; with max_new_tokens"
                f" {config.max_new_tokens} it exceeds the model's context of {context}"
                f" (max_position_embeddings); {' or '.join(ways) or 'shorten it and ask for fewer'}"
            )
    device = next(model.parameters()).device
    base = config.seed if config.seed is not None else int(torch.randint(0, 2**62, ()).item())
    check_seed(base, len(prompt_ids))
    return [
        DecodeRow(
            prompt_ids=list(ids),
            config=config,
            generator=torch.Generator(device=device).manual_seed(base + row),
            stream=TokenStream(tokenizer, config.stop_strings, config.skip_special_tokens),
            stop_ids=stop_ids,
            owner=owner,
        )
        for row, ids in enumerate(prompt_ids)
    ]


def pad_batch(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device, left: bool
) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (batch, longest), mask 1 on real tokens; prompts right-aligned
    when `left` (Llama), left-aligned otherwise (H-Net)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        if prompt:
            span = slice(longest - len(prompt), longest) if left else slice(0, len(prompt))
            ids[row, span] = torch.tensor(list(prompt), dtype=torch.long, device=device)
            mask[row, span] = 1
    return ids, mask


class DecodeBatch:
    """Rows stepped together through one model cache; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer: TextTokenizer, rows: list[DecodeRow]):
        if not rows:
            raise FidelError("generation: a batch needs at least one row")
        self.model, self.tokenizer, self.rows = model, tokenizer, rows
        self.device = next(model.parameters()).device
        self.vocab = min(tokenizer.vocab_size, model.config.vocab_size)
        self.right_padded = isinstance(getattr(model, "config", None), HNetConfig)
        self.cache = model.new_cache()
        self.seen = torch.zeros((len(rows), model.config.vocab_size), dtype=torch.bool, device=self.device)
        for index, row in enumerate(rows):
            self.seen[index, row.prompt_ids] = True
        prompts = [row.prompt_ids for row in rows]
        self._input, self.mask = pad_batch(prompts, tokenizer.pad_id, self.device, left=not self.right_padded)
        self.prefilled = False

    @property
    def done(self) -> bool:
        return all(row.finished for row in self.rows)

    @property
    def prompt_left(self) -> int:
        """Prompt columns (of the padded batch) not yet fed to the model; 0 once stepped."""
        return 0 if self.prefilled else self._input.shape[1]

    @property
    def chunkable(self) -> bool:
        """Whether `prefill_part` applies: a batch not yet stepped, of a model with a per-layer KV cache."""
        return not self.prefilled and not self.right_padded and is_kv_cache(self.cache)

    @torch.inference_mode()
    def prefill_part(self, columns: int) -> None:
        """Feed the next `columns` prompt columns into the cache, always leaving the last one to `step()`
        (chunked prefill: a long prompt spread over several engine iterations). The cache then holds
        what a whole-prompt prefill would have put there, so the rows' logits do not change."""
        if not self.chunkable:
            raise FidelError("generation: only a batch of a KV-cache model not yet stepped prefills in parts")
        columns = min(columns, self._input.shape[1] - 1)
        if columns < 1:
            return
        end = self.cache[0].length + columns
        part, self._input = self._input[:, :columns], self._input[:, columns:]
        mask = None if bool(self.mask[:, :end].all()) else self.mask[:, :end]
        self.model(part, cache=self.cache, attention_mask=mask, logits_to_keep=1)

    @property
    def reshapable(self) -> bool:
        """Whether `merge` and `keep` apply: a stepped batch of a model with a per-layer KV cache."""
        return self.prefilled and not self.right_padded and is_kv_cache(self.cache)

    @torch.inference_mode()
    def step(self) -> list[str]:
        """Run the model on the pending input, choose one token per row; the new text of every row
        ('' for rows already finished)."""
        logits = self._next_logits()
        logits[:, self.vocab :] = float("-inf")  # padded embedding rows are not tokens
        chosen = self._choose(logits).tolist()
        chunks = [""] * len(chosen)
        for index, (row, token) in enumerate(zip(self.rows, chosen, strict=True)):
            if row.finished:
                continue
            row.result.token_ids.append(token)
            self.seen[index, token] = True
            if token in row.stop_ids:
                chunks[index] = self._finish(row, "stop", token)
                continue
            chunks[index] = row.stream.push(token)
            if row.stream.stopped is not None:
                chunks[index] += self._finish(row, "stop", row.stream.stopped)
            elif len(row.result.token_ids) >= row.config.max_new_tokens:
                chunks[index] += self._finish(row, "length", None)
        pad = self.tokenizer.pad_id
        self._input = torch.tensor(
            [[pad if row.finished else token] for token, row in zip(chosen, self.rows, strict=True)],
            device=self.device,
        )
        if not self.right_padded:
            self.mask = torch.cat((self.mask, torch.ones_like(self.mask[:, :1])), dim=1)
        return chunks

    def merge(self, other: DecodeBatch) -> None:
        """Append `other`'s rows (both stepped, same model) to this batch, padding the shorter cache."""
        if not (self.reshapable and other.reshapable):
            raise FidelError("generation: only stepped batches of a KV-cache model can merge")
        ours, theirs = self.mask.shape[1], other.mask.shape[1]
        width = max(ours, theirs)
        self.cache = [
            KVCache(
                torch.cat((_left_pad(a.k, width - ours), _left_pad(b.k, width - theirs))),
                torch.cat((_left_pad(a.v, width - ours), _left_pad(b.v, width - theirs))),
            )
            for a, b in zip(self.cache, other.cache, strict=True)
        ]
        self.mask = torch.cat((F.pad(self.mask, (width - ours, 0)), F.pad(other.mask, (width - theirs, 0))))
        self._input = torch.cat((self._input, other._input))
        self.seen = torch.cat((self.seen, other.seen))
        self.rows = self.rows + other.rows

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the rows at `indices` (in that order), then drop cache columns none of them uses."""
        if not self.reshapable:
            raise FidelError("generation: only stepped batches of a KV-cache model can drop rows")
        if not indices:
            raise FidelError("generation: a batch must keep at least one row")
        select = torch.tensor(list(indices), device=self.device)
        used = self.mask[select].any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        self.cache = [layer.select(select, first) for layer in self.cache]
        self.mask = self.mask[select, first:]
        self._input, self.seen = self._input[select], self.seen[select]
        self.rows = [self.rows[i] for i in indices]

    def _choose(self, logits: Tensor) -> Tensor:
        """One token per row; rows with equal sampling settings share one sampler call."""
        groups: dict[tuple[float, int, float, float], list[int]] = {}
        for index, row in enumerate(self.rows):
            groups.setdefault(row.sampling, []).append(index)
        if len(groups) == 1:
            return choose_tokens(
                logits, self.seen, [row.generator for row in self.rows], *self.rows[0].sampling
            )
        chosen = torch.empty(len(self.rows), dtype=torch.long, device=self.device)
        for settings, indices in groups.items():
            select = torch.tensor(indices, device=self.device)
            generators = [self.rows[i].generator for i in indices]
            chosen[select] = choose_tokens(logits[select], self.seen[select], generators, *settings)
        return chosen

    def _next_logits(self) -> Tensor:
        """Each row's next-token logits (batch, vocab), fp32, after feeding the pending input."""
        first = not self.prefilled
        self.prefilled = True
        if not self.right_padded:  # without padding the mask changes nothing: skip building it
            mask = None if bool(self.mask.all()) else self.mask
            output = self.model(self._input, cache=self.cache, attention_mask=mask, logits_to_keep=1)
            return output.logits[:, -1].float()
        if not first:  # H-Net steps: every row advances by one byte, no mask
            return self.model(self._input, cache=self.cache, logits_to_keep=1).logits[:, -1].float()
        logits = self.model(self._input, cache=self.cache, attention_mask=self.mask).logits
        last = self.mask.sum(dim=1) - 1  # each right-padded row's last real position
        return logits[torch.arange(logits.shape[0], device=self.device), last].float()

    def _finish(self, row: DecodeRow, reason: FinishReason, stop: str | int | None) -> str:
        """Mark `row` done; its held-back text. A row cut by its length limit mid-character leaves the
        partial character out instead of ending in U+FFFD (`TokenStream.finish`)."""
        tail = row.stream.finish(drop_incomplete=reason == "length")
        row.result.text, row.result.finish_reason, row.result.stop = row.stream.text, reason, stop
        row.finished = True
        return tail


def _left_pad(x: Tensor, columns: int) -> Tensor:
    """(batch, heads, length, dim) with `columns` zero positions added before the first."""
    return F.pad(x, (0, 0, columns, 0)) if columns else x
