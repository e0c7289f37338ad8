"""KV-cache decoding for a batch of prompts: the one generation engine the CLI, eval and server share.

Batches of prompts of different lengths are left-padded with the tokenizer's pad id and run with an
attention mask (`LlamaForCausalLM.forward(..., attention_mask=)`): padding keys are hidden and each
row's RoPE positions count only its real tokens, so every row gets the logits it would get alone.
Rows that finish keep being fed the pad id until the whole batch is done; their output is ignored.

H-Net (byte-level, `HNetForCausalLM`) takes right padding only: its prefill is right-padded with an
attention mask (each row's cache then ends at its own last byte, and its next-byte logits are read
there), after which every row advances one byte per step through the model's own cache. Padding,
prefill and steps differ; sampling, seeds, stops and streaming are the same code for both.

Randomness: row i draws from its own `torch.Generator` seeded with `seed + i`, so a batch row gives
the same text as that prompt generated alone with `seed + i`, and rows never share a random stream.

The rows themselves live in `fidellm.generate.batch`, which also lets the server merge and shrink
batches between steps (continuous batching); `BatchDecoder` is one fixed batch with one config.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from fidellm.errors import FidelError
from fidellm.generate.batch import DecodeBatch, new_rows, pad_batch
from fidellm.generate.config import FinishReason, GenerationConfig, GenerationResult, default_stop_ids
from fidellm.tokenizer.base import TextTokenizer

__all__ = [
    "BatchDecoder",
    "FinishReason",
    "GenerationConfig",
    "GenerationResult",
    "default_stop_ids",
    "generate",
    "left_pad",
    "right_pad",
    "stream_generate",
]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask), both (batch, longest), prompts right-aligned, mask 1 on real tokens."""
    return pad_batch(prompts, pad_id, device, left=True)


def right_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask), both (batch, longest), prompts left-aligned, mask 1 on real tokens."""
    return pad_batch(prompts, pad_id, device, left=False)


class BatchDecoder:
    """Step-by-step decoding of a batch: `step()` samples one token per row and returns each row's new
    text; `results` once `done`. `generate` and `stream_generate` are loops over it."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: TextTokenizer,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        config: GenerationConfig,
    ):
        if isinstance(prompts, str) or not prompts:
            raise FidelError("generation: prompts must be a non-empty list of strings or of token-id lists")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.prompt_ids = self._encode(prompts)
        self.batch = DecodeBatch(model, tokenizer, new_rows(model, tokenizer, self.prompt_ids, config))

    def _encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        encoded = []
        for row, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt, add_bos=self.config.add_bos)
            elif not isinstance(prompt, Sequence):
                raise FidelError(
                    f"generation: prompt {row} is {prompt!r}, not a string or a list of token ids"
                )
            else:
                ids = [int(i) for i in prompt]
                bad = [i for i in ids if not 0 <= i < self.model.config.vocab_size]
                if bad:
                    raise FidelError(f"generation: prompt {row} has ids outside the vocabulary: {bad[:5]}")
            encoded.append(ids)
        return encoded

    @property
    def done(self) -> bool:
        return self.batch.done

    @property
    def results(self) -> list[GenerationResult]:
        return [row.result for row in self.batch.rows]

    def step(self) -> list[str]:
        """Run the model on the pending input, choose one token per row; the new text of every row."""
        return self.batch.step()


def generate(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
) -> list[GenerationResult]:
    """Generate a continuation of every prompt (text, or token ids used as given), in one batch."""
    decoder = BatchDecoder(model, tokenizer, prompts, config or GenerationConfig())
    while not decoder.done:
        decoder.step()
    return decoder.results


def stream_generate(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
) -> Iterator[str]:
    """Text chunks of one prompt's continuation as they become safe to show (whole characters, no part
    of a stop string). Joined, they equal `generate(...)[0].text` with the same config."""
    decoder = BatchDecoder(model, tokenizer, [prompt], config or GenerationConfig())
    while not decoder.done:
        chunk = decoder.step()[0]
        if chunk:
            yield chunk
