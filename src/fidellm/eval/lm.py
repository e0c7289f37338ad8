"""Language-modelling scores comparable with published numbers (../shared/design/evaluation.md).

FLORES second-half bits (the Goldfish rule): for each line, score the line's tokens with a start token
prepended, surprisal in bits per predicted token; drop the first k predictions, where k is the number of
tokens of `line[:len(line)//2]` encoded alone; sum the rest; report the mean over lines. Alongside: bits
per byte and per character of the whole lines (tokenizer-independent, so BPE and byte models compare).
Lines longer than the model's context are an error here (a sliding window comes with the eval suite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fidellm.errors import FidelError
from fidellm.tokenizer.base import TextTokenizer


@dataclass
class LMScores:
    """FLORES-style scores of a set of lines."""

    lines: int
    second_half_bits: float  # mean over lines of the bits of the second half
    bits_per_byte: float  # whole lines: total bits / total UTF-8 bytes
    bits_per_char: float  # whole lines: total bits / total characters
    tokens: int


@torch.no_grad()
def token_bits(
    model: nn.Module,
    sequences: list[list[int]],
    bos_id: int,
    device: torch.device | str,
    batch_size: int = 32,
) -> list[np.ndarray]:
    """Surprisal in bits of every token of every sequence, each predicted from BOS + the tokens before it."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max((len(seq) for seq in sequences), default=0)
    if limit is not None and longest > limit:
        raise FidelError(f"a line has {longest} tokens, more than the model's context of {limit}")
    model.eval()
    out: list[np.ndarray] = [np.zeros(0)] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        chunk = [i for i in order[start : start + batch_size] if sequences[i]]
        if not chunk:
            continue
        width = max(len(sequences[i]) for i in chunk)
        inputs = torch.full((len(chunk), width), bos_id, dtype=torch.long)
        targets = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, i in enumerate(chunk):
            seq = torch.tensor(sequences[i], dtype=torch.long)
            inputs[row, 1 : len(seq)] = seq[
                :-1
            ]  # right padding: a causal model's earlier positions ignore it
            targets[row, : len(seq)] = seq
        logits = model(inputs.to(device)).logits.float()
        nats = F.cross_entropy(
            logits.flatten(0, 1), targets.to(device).flatten(), ignore_index=-100, reduction="none"
        ).view(len(chunk), width)
        bits = (nats / math.log(2)).double().cpu().numpy()
        for row, i in enumerate(chunk):
            out[i] = bits[row, : len(sequences[i])]
    return out


def score_lines(
    model: nn.Module,
    tokenizer: TextTokenizer,
    lines: list[str],
    device: torch.device | str,
    batch_size: int = 32,
) -> LMScores:
    """Second-half bits (Goldfish rule) and whole-line bits/byte and bits/char of `lines`."""
    if not lines:
        raise FidelError("no lines to score")
    sequences = [tokenizer.encode(line) for line in lines]
    cuts = [len(tokenizer.encode(line[: len(line) // 2])) for line in lines]
    bits = token_bits(model, sequences, tokenizer.bos_id, device, batch_size)
    second = [float(b[k:].sum()) for b, k in zip(bits, cuts, strict=True)]
    total = float(sum(b.sum() for b in bits))
    return LMScores(
        lines=len(lines),
        second_half_bits=float(np.mean(second)),
        bits_per_byte=total / sum(len(line.encode("utf-8")) for line in lines),
        bits_per_char=total / sum(len(line) for line in lines),
        tokens=sum(len(s) for s in sequences),
    )
