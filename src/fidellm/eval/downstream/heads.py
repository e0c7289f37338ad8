"""Task heads on our decoder's final hidden states: sequence classification (MasakhaNEWS, AfriSenti) and
token classification (MasakhaNER), as a linear probe or a full fine-tune (evaluation.md, "Downstream").
This module holds the parts (encoding, features, probe, fine-tuning loop); finetuned.py runs the tasks.

Features are `model.model(ids)`, the final (normed) hidden states. Batches are right-padded without an
attention mask: attention is causal, so a real token never sees the padding after it and its state equals
the unpadded one (and the fast causal attention kernel stays usable).

- Sequence classification mean-pools the states of the real tokens (BOS included), then a linear layer.
  Mean rather than last token: only the last position has seen the whole text, but in a small causal LM
  its state is mostly about the next token; the mean carries every position's content and is the more
  robust probe of small decoders. Texts longer than the context are cut (the counts are recorded).
- Token classification encodes each word alone (a space before every word but the first, which gives the
  ids of the joined sentence: BPE pre-tokenization attaches a space to the word after it) and puts the
  word's tag on one of its subwords; the others are ignored. Default `subword="last"`: in a causal model
  the first subword has not seen the rest of its word, the last has seen all of it (and with a small
  vocabulary the first piece of a rare word is often a bare space); `"first"` (the encoder convention)
  is an option. A word cut off by the context is predicted "O".
- `probe`: backbone frozen, features computed once, an L2-regularised multinomial logistic regression on
  standardised features fitted by full-batch LBFGS from zero (convex, so deterministic); the L2 strength
  is chosen on dev from `l2_grid`.
- `finetune`: a copy of the backbone (the caller's model is untouched) plus the head, AdamW with linear
  warm-up and decay, gradient clipping 1.0; the epoch with the best dev score is kept. bf16 autocast on
  CUDA; CPU runs are bit-reproducible for a seed.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from fidellm.errors import FidelError
from fidellm.tokenizer.base import TextTokenizer

MODES = ("probe", "finetune")
SUBWORDS = ("first", "last")


@dataclass(frozen=True)
class HeadSettings:
    """Training knobs. Defaults are CPU-sized (few epochs, small batches); raise them on a GPU."""

    epochs: int = 3
    batch_size: int = 16
    lr: float = 5e-5
    """finetune: backbone learning rate"""
    head_lr: float = 1e-3
    """finetune: head learning rate"""
    weight_decay: float = 0.01
    warmup: float = 0.1
    """finetune: share of the steps spent warming the learning rate up"""
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    """probe: L2 strengths tried, the best on dev kept"""
    max_length: int | None = None
    """tokens per text, BOS included; None = the model's context"""
    seed: int = 0
    subword: str = "last"
    """token classification: the subword of a word that carries its tag (first or last)"""

    def check(self, mode: str) -> None:
        """FidelError for a mode or setting out of range."""
        if mode not in MODES:
            raise FidelError(f"head mode {mode!r} is not one of {', '.join(MODES)}")
        if self.subword not in SUBWORDS:
            raise FidelError(f"subword {self.subword!r} is not one of {', '.join(SUBWORDS)}")
        if self.epochs < 1 or self.batch_size < 1 or not self.l2_grid:
            raise FidelError("epochs and batch_size must be positive and l2_grid non-empty")
        if self.max_length is not None and self.max_length < 2:
            raise FidelError(f"max_length must be at least 2 (BOS and one token), got {self.max_length}")


# ---------------------------------------------------------------------------------------------- encoding


def context_length(model: nn.Module, settings: HeadSettings) -> int:
    """Tokens per sequence: the model's context, or `settings.max_length` when smaller."""
    limit = model.config.max_position_embeddings
    return min(limit, settings.max_length) if settings.max_length else limit


def encode_texts(tokenizer: TextTokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """BOS + ids of each text, cut to `max_length`; and how many texts were cut."""
    encoded = tokenizer.encode_batch(texts, add_bos=True)
    return [ids[:max_length] for ids in encoded], sum(len(ids) > max_length for ids in encoded)


@dataclass
class WordEncoding:
    """BOS + the subwords of a sentence, and per word the index of the subword carrying its tag (-1 when
    the context cut it off)."""

    ids: list[int]
    positions: list[int]
    truncated: bool


def encode_words(
    tokenizer: TextTokenizer, words: tuple[str, ...] | list[str], max_length: int, subword: str = "last"
) -> WordEncoding:
    """Encode words one by one (" " + word after the first) and mark each word's first or last subword."""
    pieces = tokenizer.encode_batch([w if i == 0 else " " + w for i, w in enumerate(words)])
    ids, positions = [tokenizer.bos_id], []
    for word, word_ids in zip(words, pieces, strict=True):
        if not word_ids:
            raise FidelError(f"word {word!r} encodes to no tokens")
        position = len(ids) if subword == "first" else len(ids) + len(word_ids) - 1
        ids.extend(word_ids)
        positions.append(position if position < max_length else -1)
    return WordEncoding(ids[:max_length], positions, len(ids) > max_length)


# ---------------------------------------------------------------------------------------------- forward


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing elsewhere (CPU runs stay fp32 and reproducible)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def padded(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded ids (batch, longest) and the lengths (batch,)."""
    rows = [torch.tensor(s, dtype=torch.long) for s in seqs]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    return ids.to(device), torch.tensor([len(s) for s in seqs], device=device)


def mean_pool(hidden: Tensor, lengths: Tensor) -> Tensor:
    """Mean of each row's first `length` states: (batch, seq, hidden) -> (batch, hidden)."""
    mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
    return (hidden * mask[..., None].to(hidden.dtype)).sum(1) / lengths[:, None].to(hidden.dtype)


@torch.no_grad()
def per_example(
    backbone: nn.Module,
    seqs: list[list[int]],
    reduce: Callable[[Tensor, int], Tensor],
    pad_id: int,
    batch_size: int,
) -> list[Tensor]:
    """`reduce(states of example i (len_i, hidden) in fp32, i)` for every sequence, run in batches of
    similar length (less padding), returned in the input order."""
    device = next(backbone.parameters()).device
    out: list[Tensor] = [torch.empty(0)] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, _ = padded([seqs[i] for i in chunk], pad_id, device)
        with autocast_for(device):
            hidden = backbone(ids).float()
        for row, i in enumerate(chunk):
            out[i] = reduce(hidden[row, : len(seqs[i])], i).float().cpu()
    return out


# ---------------------------------------------------------------------------------------------- probe


class LinearProbe(nn.Module):
    """Standardise features with the training mean and spread, then a linear layer."""

    def __init__(self, mean: Tensor, std: Tensor, n_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), n_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear((features - self.mean) / self.std)


def fit_probe(
    features: Tensor, labels: Tensor, n_classes: int, l2: float, max_iter: int = 200
) -> LinearProbe:
    """Multinomial logistic regression: mean cross-entropy + l2·|W|², full-batch LBFGS from zero."""
    probe = LinearProbe(features.mean(0), features.std(0, correction=0).clamp_min(1e-6), n_classes)
    optimizer = torch.optim.LBFGS(
        probe.linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(features), labels) + l2 * probe.linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe.eval()


def select_probe(
    train: tuple[Tensor, Tensor], dev: Tensor, n_classes: int, score: Callable[[Tensor], float], grid: tuple
) -> tuple[LinearProbe, dict[str, Any]]:
    """The probe of the L2 strength whose dev predictions score best (ties: the stronger L2)."""
    scores: dict[float, float] = {}
    best_l2, best_probe = 0.0, None
    for l2 in sorted(grid, reverse=True):
        probe = fit_probe(*train, n_classes, l2)
        with torch.no_grad():
            scores[l2] = score(probe(dev).argmax(-1))
        if best_probe is None or scores[l2] > scores[best_l2]:
            best_l2, best_probe = l2, probe
    if best_probe is None:
        raise FidelError("l2_grid is empty: give at least one L2 strength for the probe")
    by_l2 = {f"{l2:g}": value for l2, value in scores.items()}
    return best_probe, {"probe_l2": best_l2, "dev_score": scores[best_l2], "dev_score_by_l2": by_l2}


# ---------------------------------------------------------------------------------------------- finetune


class SequenceClassifier(nn.Module):
    """Backbone, mean pooling over the real tokens, linear head."""

    def __init__(self, backbone: nn.Module, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_tokens.embedding_dim, n_classes)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        return self.head(mean_pool(self.backbone(ids), lengths))


class TokenClassifier(nn.Module):
    """Backbone and a linear head on every position."""

    def __init__(self, backbone: nn.Module, n_tags: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_tokens.embedding_dim, n_tags)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.backbone(ids))


def features_of(model: nn.Module) -> nn.Module:
    """The module giving final hidden states: the Llama's `model.model`, the H-Net's `features()`."""
    return model.features() if hasattr(model, "features") else model.model


def fresh_backbone(model: nn.Module, seed: int) -> nn.Module:
    """An fp32 copy of the model's backbone to train (the caller's model stays as it was)."""
    torch.manual_seed(seed)
    return copy.deepcopy(features_of(model)).float().train()


def finetune(
    module: SequenceClassifier | TokenClassifier,
    n_train: int,
    loss_of: Callable[[list[int]], Tensor],
    dev_score: Callable[[], float],
    settings: HeadSettings,
) -> dict[str, Any]:
    """Train `module` on shuffled batches of example indices; after each epoch
    score dev and keep the best epoch's weights. Returns the best epoch, its dev score and the history."""
    steps = settings.epochs * math.ceil(n_train / settings.batch_size)
    warm = max(1, round(settings.warmup * steps))
    optimizer = torch.optim.AdamW(
        [
            {"params": module.backbone.parameters(), "lr": settings.lr},
            {"params": module.head.parameters(), "lr": settings.head_lr},
        ],
        weight_decay=settings.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    generator = torch.Generator().manual_seed(settings.seed)
    history: list[float] = []
    best_state: dict[str, Tensor] = {}
    for _ in range(settings.epochs):
        module.train()
        order = torch.randperm(n_train, generator=generator).tolist()
        for start in range(0, n_train, settings.batch_size):
            loss = loss_of(order[start : start + settings.batch_size])
            loss.backward()
            nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        module.eval()
        history.append(dev_score())
        if history[-1] >= max(history):
            best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(best_state)
    best = max(range(len(history)), key=lambda e: (history[e], e))
    return {"best_epoch": best + 1, "dev_score": history[best], "dev_history": history}
