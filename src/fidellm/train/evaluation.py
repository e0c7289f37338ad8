"""Validation during training: mean loss and bits per UTF-8 byte over fixed batches, on every rank, and
bits per byte of each source when the batches say where each target comes from."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fidellm.errors import FidelError
from fidellm.models.loss import IGNORE_INDEX
from fidellm.train.checkpoint import SINGLE, STATE_FILE, read_checkpoint, save_weights
from fidellm.train.data import ValidationSet
from fidellm.train.distributed import Distributed


@dataclass
class Validation:
    """One evaluation: loss in nats per target, bits per text byte, and (bits, bytes) per source."""

    loss: float
    bpb: float
    source_bits: dict[str, tuple[float, float]] = field(default_factory=dict)

    def source_bpb(self) -> dict[str, float]:
        """Bits per byte of every source with text in the validation batches."""
        return {name: bits / nbytes for name, (bits, nbytes) in self.source_bits.items() if nbytes}

    def bpb_of(self, sources: Sequence[str]) -> float:
        """Bits per byte over the text of `sources` together (byte-weighted)."""
        bits = sum(self.source_bits[name][0] for name in sources)
        return bits / sum(self.source_bits[name][1] for name in sources)


def check_selected_sources(selected: Sequence[str], val_set: ValidationSet) -> None:
    """A FidelError unless every selected source has text in the validation batches."""
    present = set()
    for batch in val_set.batches:
        if len(batch) == 3:
            present.update(int(i) for i in batch[2].unique())
    names = [val_set.source_names[i] for i in sorted(present)]
    missing = [name for name in selected if name not in names]
    if missing:
        raise FidelError(
            f"best_by_sources: {', '.join(missing)} not in the validation batches (sources there:"
            f" {', '.join(names) or 'none: chat data has no sources'})"
        )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    val_set: ValidationSet,
    byte_lengths: torch.Tensor,
    device: torch.device,
    autocast: Any,
    ctx: Distributed = SINGLE,
) -> Validation:
    """Mean loss in nats per token over all targets, bits per UTF-8 byte over text targets, and the
    bits and bytes of each source's text targets.

    In a multi-process run each rank scores every world_size-th batch and the sums are all-reduced;
    every rank runs the same number of forward passes (a rank out of batches repeats one and drops
    it), since an FSDP2 forward is collective.
    """
    was_training = model.training
    model.eval()
    batches, n_sources = val_set.batches, len(val_set.source_names)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nll, targets, text bits, text bytes
    per_source = torch.zeros(2, n_sources, dtype=torch.float64, device=device)  # text bits, text bytes
    for first in range(0, len(batches), ctx.world_size):
        index = first + ctx.rank
        inputs, targets, *sources = (t.to(device) for t in batches[min(index, len(batches) - 1)])
        with autocast():  # per-token losses, chunked: the full logits never exist
            token_nll = model(inputs, targets, reduction="none").loss
        if index >= len(batches):
            continue
        kept = targets.flatten() != IGNORE_INDEX  # SFT: only assistant targets count
        nll = token_nll.flatten()[kept].double()
        nbytes = byte_lengths[targets.flatten()[kept]]
        text = nbytes > 0
        sums += torch.stack(
            [nll.sum(), torch.tensor(nll.numel()), nll[text].sum() / math.log(2), nbytes.sum()]
        ).to(sums)
        if sources and n_sources:
            source = sources[0].flatten()[kept][text]
            per_source[0].index_add_(0, source, nll[text] / math.log(2))
            per_source[1].index_add_(0, source, nbytes[text].double())
    model.train(was_training)
    totals = ctx.mean(torch.cat([sums, per_source.flatten()])) * ctx.world_size
    nll_sum, count, text_bits, text_bytes = totals[:4].tolist()
    bits, nbytes = totals[4:].view(2, n_sources).tolist()
    return Validation(
        nll_sum / count,
        text_bits / max(1.0, text_bytes),
        {name: (bits[i], nbytes[i]) for i, name in enumerate(val_set.source_names) if nbytes[i]},
    )


class BestWeights:
    """RUN/train/best: the weights of the evaluation with the lowest validation loss or, with `sources`,
    the lowest bits per byte over those sources' text; a resumed run goes on from its state.json when
    it was chosen by the same rule."""

    def __init__(self, directory: Path, sources: Sequence[str], resumed: bool):
        self.directory, self.sources = directory, list(sources)
        self.step, self.score, self.values = 0, math.inf, {}
        if resumed and (directory / STATE_FILE).is_file():
            kept = read_checkpoint(directory)
            if kept.state.get("best_by_sources", []) == self.sources:
                self.step, self.values = (
                    kept.step,
                    {"val_loss": kept.field("val_loss"), "val_bpb": kept.field("val_bpb")},
                )
                self.score = kept.state.get("score", self.values["val_loss"])

    def score_of(self, result: Validation) -> float:
        """What the choice minimizes: bits per byte over the selected sources, else validation loss."""
        return result.bpb_of(self.sources) if self.sources else result.loss

    def offer(
        self,
        step: int,
        result: Validation,
        score: float,
        model: torch.nn.Module,
        state: dict[str, Any],
        ctx: Distributed,
    ) -> None:
        """Keep the model's weights when `score` (`self.score_of(result)`) beats the best so far."""
        if score < self.score:
            self.step, self.score = step, score
            self.values = {"val_loss": result.loss, "val_bpb": result.bpb}
            state = {**state, **self.values, "score": score, "best_by_sources": self.sources}
            save_weights(self.directory, step, model, state, ctx)

    def summary(self) -> dict[str, Any]:
        """Step, validation figures, the selection score and where the weights are."""
        return {"step": self.step, **self.values, "score": self.score, "path": str(self.directory)}
