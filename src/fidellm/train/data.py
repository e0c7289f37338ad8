"""Packed training batches from token shards, with a deterministic, resumable order.

The shards already hold every document back to back, each starting with BOS, so packing is the flat
token stream itself: window i covers tokens[i·seq_len : i·seq_len + seq_len + 1] (inputs are the first
seq_len tokens, targets the last seq_len; neighbouring windows share one token). Each epoch visits the
windows in a permutation drawn from (seed, epoch) alone, so the data position (epoch, step) fully
determines every later batch: resuming continues exactly, without saving any data RNG state.
`CurriculumWindows` draws the same windows easy to hard instead (fidellm.train.curriculum); its small
sampler state is saved in the checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fidellm.errors import FidelError
from fidellm.tokenizer.base import TextTokenizer
from fidellm.tokenizer.bpe import BYTE_OF_CHAR
from fidellm.tokenizer.shards import TokenShards
from fidellm.train.curriculum import (
    StagedBatches,
    StagedSampler,
    assign_stages,
    stage_boundaries,
    window_scores,
)


def window_count(n_tokens: int, seq_len: int) -> int:
    """Number of full windows of seq_len + 1 tokens starting at multiples of seq_len."""
    return max(0, (n_tokens - 1) // seq_len)


def windows_to_tensors(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int, shards: TokenShards | None = None
) -> tuple[Tensor, Tensor]:
    """(inputs, targets), both int64 (len(starts), seq_len), from windows starting at `starts`; with
    `shards` (those `tokens` are of) an id outside its vocabulary is an error naming tokens.bin."""
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    if shards is not None and rows.size and int(rows.max()) >= shards.meta.get("vocab_size", np.inf):
        row, column = np.unravel_index(int(rows.argmax()), rows.shape)
        raise FidelError(
            f"{shards.directory / 'tokens.bin'}: token {int(starts[row]) + int(column)} is id"
            f" {int(rows.max())}, outside the vocabulary of {shards.meta['vocab_size']} (damaged);"
            " rerun `fidellm data tokenize RUN`"
        )
    batch = torch.from_numpy(rows)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


@dataclass
class DataPosition:
    """Where the loader stands: `step` batches of epoch `epoch` have been consumed."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        if "epoch" not in data:
            raise FidelError(
                "the checkpoint's data position comes from a --curriculum run; resume it with --curriculum"
            )
        return cls(int(data["epoch"]), int(data["step"]))


class ShuffledBatches(ABC):
    """Batches of `n_rows` training rows visited in a per-epoch permutation drawn from (seed, epoch);
    `next_batch()` returns (inputs, targets) and advances. Subclasses say what a row is (`rows`).

    With several processes each step draws one global batch of batch_size × world_size rows and rank r
    takes [r·batch_size, (r+1)·batch_size): the ranks together see exactly the batches one process with
    batch_size × world_size would, which is what makes DDP equal to a single process. The last incomplete
    global batch of an epoch is skipped (those rows come earlier in another epoch's order).
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = n_rows // self.global_batch
        self.position = DataPosition()
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    @abstractmethod
    def rows(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        """(inputs, targets) of the rows at `indices`."""

    def order(self, epoch: int) -> np.ndarray:
        """The row permutation of `epoch` (a function of the seed and the epoch only)."""
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """This rank's rows of the batch at the current position; the position moves on."""
        if self.position.step >= self.steps_per_epoch:
            self.position = DataPosition(self.position.epoch + 1, 0)
        step = self.position.step
        first = step * self.global_batch + self.rank * self.batch_size
        indices = self.order(self.position.epoch)[first : first + self.batch_size]
        self.position = DataPosition(self.position.epoch, step + 1)
        return self.rows(indices)

    def state_dict(self) -> dict[str, int]:
        return self.position.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = DataPosition.from_dict(state)


class PackedBatches(ShuffledBatches):
    """Shuffled fixed-length windows of a split (the module docstring): a row is one window."""

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.shards = shards
        self.seq_len = seq_len
        self.n_windows = window_count(len(shards.tokens), seq_len)
        super().__init__(self.n_windows, batch_size, seed, rank, world_size)
        if self.steps_per_epoch == 0:
            raise FidelError(
                f"{shards.directory}: {len(shards.tokens)} tokens make {self.n_windows} windows of"
                f" {seq_len + 1} tokens, fewer than one batch of {self.global_batch}"
                f" ({batch_size} per process × {world_size}); lower --seq-len or --batch-size"
            )

    def rows(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        return windows_to_tensors(self.shards.tokens, indices * self.seq_len, self.seq_len, self.shards)


class CurriculumWindows(StagedBatches, PackedBatches):
    """The windows of PackedBatches drawn by the curriculum (fidellm.train.curriculum): each window scores
    the token-weighted mean complexity of the documents it covers (RUN/tokens/train/complexity.npy), the
    quintiles of those scores make the five stages, and `StagedSampler` draws from the unlocked ones.
    """

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(shards, seq_len, batch_size, seed, rank, world_size)
        scores = window_scores(shards.offsets, shards.complexity(), seq_len, self.n_windows)
        self.boundaries = stage_boundaries(scores)
        self.stages = assign_stages(scores, self.boundaries)
        self.sampler = StagedSampler(self.stages, self.global_batch, seed)


@dataclass
class ValidationSet:
    """Fixed validation batches, the same every evaluation: (inputs, targets) or, from token shards,
    (inputs, targets, the source index of each target) with the split's `source_names`."""

    batches: list[tuple[Tensor, ...]]
    source_names: list[str] = field(default_factory=list)


def validation_batches(shards: TokenShards, seq_len: int, batch_size: int, max_batches: int) -> ValidationSet:
    """Up to `max_batches` batches of windows of the val split: all of them when they fit, else that many
    spread evenly over the split (whose files run source by source), so every source keeps its share."""
    n_windows = window_count(len(shards.tokens), seq_len)
    if n_windows == 0:
        raise FidelError(f"{shards.directory}: {len(shards.tokens)} tokens are too few for one window")
    wanted = min(n_windows, batch_size * max_batches)
    starts = np.linspace(0, n_windows - 1, wanted).round().astype(np.int64) * seq_len
    positions = starts[:, None] + np.arange(1, seq_len + 1)  # of every target token
    documents = np.searchsorted(shards.offsets, positions, side="right") - 1
    doc_source = np.asarray(shards.doc_source, dtype=np.int64)
    n_names = len(shards.meta.get("source_names", []))
    in_range = not doc_source.size or 0 <= doc_source.min() <= doc_source.max() < n_names
    if doc_source.shape != (len(shards),) or not in_range:
        raise FidelError(
            f"{shards.directory / 'doc_source.npy'}: does not match meta.json ({len(shards)} documents,"
            f" {n_names} source_names); rerun `fidellm data tokenize RUN`"
        )
    sources = torch.from_numpy(doc_source[documents])
    return ValidationSet(
        [
            (
                *windows_to_tensors(shards.tokens, starts[i : i + batch_size], seq_len, shards),
                sources[i : i + batch_size],
            )
            for i in range(0, len(starts), batch_size)
        ],
        list(shards.meta.get("source_names", [])),
    )


def token_byte_lengths(tokenizer: TextTokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for (int64, one per id); control tokens (BOS, pad, chat markers) are 0.

    Bits per byte divides the NLL of text tokens by these lengths' sum; targets of length 0 are left
    out of both sums (they are not text). Byte-level BPE tokens are mapped back through GPT-2's byte
    alphabet, so a token holding part of an Ethiopic character counts its 1-2 bytes exactly.
    """
    if tokenizer.kind == "bytes":
        lengths = np.ones(tokenizer.vocab_size, dtype=np.int64)
        lengths[[tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]] = 0
        return lengths
    hf = tokenizer.hf  # type: ignore[attr-defined]
    added = hf.get_added_tokens_decoder()
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for index in range(tokenizer.vocab_size):
        if index in added:
            token = added[index]
            lengths[index] = 0 if token.special else len(token.content.encode("utf-8"))
            continue
        piece = hf.id_to_token(index)
        if piece is None or any(ch not in BYTE_OF_CHAR for ch in piece):
            raise FidelError(f"tokenizer id {index} ({piece!r}) is not a byte-level BPE token")
        lengths[index] = len(piece)
    return lengths


class DevicePrefetch:
    """Training batches already on the device: `prefetch()` assembles the next batch and starts its copy
    (from pinned memory, asynchronously, on CUDA) while the current step still runs on the GPU.

    `state_dict()` is the data position of the next batch not yet consumed, so a checkpoint taken with
    a batch in flight resumes at that batch: prefetching never changes what a run sees.
    """

    def __init__(self, batches: Any, device: torch.device):
        self.batches = batches
        self.device = device
        self._pending: tuple[dict[str, Any], tuple[Tensor, Tensor]] | None = None

    def prefetch(self) -> None:
        """Fetch the next batch now, unless one is already waiting."""
        if self._pending is None:
            state = self.batches.state_dict()
            pinned = self.device.type == "cuda"
            batch = tuple(
                (t.pin_memory() if pinned else t).to(self.device, non_blocking=True)
                for t in self.batches.next_batch()
            )
            self._pending = (state, batch)  # type: ignore[assignment]

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The waiting batch (fetched now if none is), on the device."""
        self.prefetch()
        assert self._pending is not None
        batch, self._pending = self._pending[1], None
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self._pending[0] if self._pending is not None else self.batches.state_dict()
