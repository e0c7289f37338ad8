"""Language-modelling scores comparable with published numbers (../shared/design/evaluation.md).

FLORES second-half bits (the Goldfish rule): for each line, score the line's tokens with a start token
prepended, surprisal in bits per predicted token; drop the first k predictions, where k is the number of
tokens of `line[:len(line)//2]` encoded alone; sum the rest; report the mean over lines. Alongside: bits
per byte and per character of the whole lines (tokenizer-independent, so BPE and byte models compare).
Lines and documents longer than the model's context are scored with a sliding window (`_pieces`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from fidellm.errors import FidelError
from fidellm.models.loss import IGNORE_INDEX
from fidellm.tokenizer.base import TextTokenizer


@dataclass
class LMScores:
    """FLORES-style scores of a set of lines."""

    lines: int  # lines scored (non-empty)
    second_half_bits: float  # mean over lines of the bits of the second half
    bits_per_byte: float  # whole lines: total bits / total UTF-8 bytes
    bits_per_char: float  # whole lines: total bits / total characters
    tokens: int
    empty_lines: int = 0  # skipped: nothing to predict
    windowed_lines: int = 0  # longer than the context: scored with a sliding window


@dataclass
class DocumentScores:
    """Whole-document bits per byte and per character (e.g. the held-out split of the corpus)."""

    documents: int
    bits_per_byte: float
    bits_per_char: float
    tokens: int
    bytes: int
    chars: int
    windowed_documents: int = 0
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)  # source -> documents, bytes, bpb


@dataclass
class _Piece:
    """One forward pass's worth of a sequence: `inputs` predict `targets`; only targets[keep_from:] count."""

    sequence: int
    start: int  # index in the sequence of targets[0]
    inputs: list[int]
    targets: list[int]
    keep_from: int


def _pieces(index: int, seq: list[int], bos_id: int, context: int) -> list[_Piece]:
    """Windows over BOS + seq of at most `context` inputs. The first window predicts seq[:context]; each
    next one moves by context // 2 and keeps only its last context // 2 predictions, so every token is
    scored once and, past the first window, with at least context - context // 2 tokens before it."""
    stream = [bos_id, *seq]
    if len(seq) <= context:
        return [_Piece(index, 0, stream[:-1], seq, 0)]
    stride = max(1, context // 2)
    pieces = [_Piece(index, 0, stream[:context], seq[:context], 0)]
    scored = context
    start = stride
    while scored < len(seq):
        end = min(start + context, len(seq))
        start = end - context  # the last window ends exactly at the sequence's end
        pieces.append(_Piece(index, start, stream[start:end], seq[start:end], scored - start))
        scored = end
        start += stride
    return pieces


def model_context(model: nn.Module) -> int | None:
    """The model's context length (max_position_embeddings), or None when it does not say."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@torch.inference_mode()
def token_bits(
    model: nn.Module,
    sequences: list[list[int]],
    bos_id: int,
    device: torch.device | str,
    batch_size: int = 32,
    context: int | None = None,
) -> list[np.ndarray]:
    """Surprisal in bits of every token of every sequence, each predicted from BOS + the tokens before it.

    Sequences longer than `context` (default: the model's) are scored with a sliding window (see
    `_pieces`): a token far into a long line then sees the previous context // 2 or more tokens only.
    """
    context = context or model_context(model) or max((len(s) for s in sequences), default=1)
    model.eval()
    out = [np.zeros(len(seq)) for seq in sequences]
    pieces = [p for i, seq in enumerate(sequences) if seq for p in _pieces(i, seq, bos_id, context)]
    pieces.sort(key=lambda p: len(p.inputs))
    for first in range(0, len(pieces), batch_size):
        chunk = pieces[first : first + batch_size]
        # right padding: a causal model's earlier positions ignore it; a window's first keep_from targets
        # were scored by the window before: ignored, so not projected again
        inputs = pad_sequence([torch.tensor(p.inputs) for p in chunk], batch_first=True, padding_value=bos_id)
        targets = pad_sequence(
            [torch.tensor([IGNORE_INDEX] * p.keep_from + p.targets[p.keep_from :]) for p in chunk],
            batch_first=True,
            padding_value=IGNORE_INDEX,
        )
        nats = model(inputs.to(device), targets.to(device), reduction="none").loss  # no full logits
        bits = (nats / math.log(2)).double().cpu().numpy()
        for row, piece in enumerate(chunk):
            kept = slice(piece.start + piece.keep_from, piece.start + len(piece.targets))
            out[piece.sequence][kept] = bits[row, piece.keep_from : len(piece.targets)]
    return out


def score_lines(
    model: nn.Module,
    tokenizer: TextTokenizer,
    lines: list[str],
    device: torch.device | str,
    batch_size: int = 32,
) -> LMScores:
    """Second-half bits (Goldfish rule) and whole-line bits/byte and bits/char of `lines`.

    Empty lines have nothing to predict: they are skipped and counted in `empty_lines`. The rule is the
    same for token and byte models: the cut is the token count of `line[:len(line)//2]` encoded alone,
    which for a byte tokenizer is its UTF-8 byte count.
    """
    kept = [line for line in lines if line]
    if not kept:
        raise FidelError("no lines to score" if not lines else "every line is empty; nothing to score")
    sequences = tokenizer.encode_batch(kept)
    cuts = [len(ids) for ids in tokenizer.encode_batch([line[: len(line) // 2] for line in kept])]
    bits = token_bits(model, sequences, tokenizer.bos_id, device, batch_size)
    second = [float(b[k:].sum()) for b, k in zip(bits, cuts, strict=True)]
    total = float(sum(b.sum() for b in bits))
    context = model_context(model)
    return LMScores(
        lines=len(kept),
        second_half_bits=float(np.mean(second)),
        bits_per_byte=total / sum(len(line.encode("utf-8")) for line in kept),
        bits_per_char=total / sum(len(line) for line in kept),
        tokens=sum(len(s) for s in sequences),
        empty_lines=len(lines) - len(kept),
        windowed_lines=0 if context is None else sum(len(s) > context for s in sequences),
    )


def score_documents(
    model: nn.Module,
    tokenizer: TextTokenizer,
    texts: list[str],
    device: torch.device | str,
    batch_size: int = 8,
    sources: Sequence[str] | None = None,
) -> DocumentScores:
    """Bits per byte and per character of whole documents (BOS + text, sliding window past the context);
    with `sources` (one per text) also the bits per byte of each source's documents."""
    if sources is not None and len(sources) != len(texts):
        raise FidelError(f"{len(sources)} sources for {len(texts)} documents")
    labels = list(sources) if sources is not None else [None] * len(texts)
    kept = [(text, label) for text, label in zip(texts, labels, strict=True) if text]
    if not kept:
        raise FidelError("no documents to score")
    sequences = tokenizer.encode_batch([text for text, _ in kept])
    bits = [float(b.sum()) for b in token_bits(model, sequences, tokenizer.bos_id, device, batch_size)]
    doc_bytes = [len(text.encode("utf-8")) for text, _ in kept]
    by_source: dict[str, dict[str, float]] = {}
    for (_, label), doc_bits, n_bytes in zip(kept, bits, doc_bytes, strict=True):
        if label is not None:
            entry = by_source.setdefault(label, {"documents": 0, "bytes": 0, "bits": 0.0})
            entry["documents"] += 1
            entry["bytes"] += n_bytes
            entry["bits"] += doc_bits
    n_bytes, n_chars = sum(doc_bytes), sum(len(text) for text, _ in kept)
    context = model_context(model)
    return DocumentScores(
        documents=len(kept),
        bits_per_byte=sum(bits) / n_bytes,
        bits_per_char=sum(bits) / n_chars,
        tokens=sum(len(s) for s in sequences),
        bytes=n_bytes,
        chars=n_chars,
        windowed_documents=0 if context is None else sum(len(s) > context for s in sequences),
        by_source={
            label: {"documents": e["documents"], "bytes": e["bytes"], "bits_per_byte": e["bits"] / e["bytes"]}
            for label, e in sorted(by_source.items())
        },
    )
