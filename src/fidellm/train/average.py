"""An exponential moving average (EMA) of the weights: what a run with `ema_decay` evaluates and keeps.

The last updates of a run move the weights around a minimum by the noise of their batches; an average
of the weights over the last few hundred steps sits nearer to it, without another step of training.
The average after step t weighs the weights after step s by decay^(t - s), normalized (Adam's bias
correction): it moves toward the weights by (1 - decay) / (1 - decay^t), so it starts as the weights
after step 1, not the random initial ones, and decay 0.99 averages over about the last 100 steps, 0.999
the last 1,000 (choose it well under the run's length: every step so far counts in a shorter run). The
average never feeds back into training (a run's losses are the same with it or without), it holds one
copy of the trained parameters on their device, and it is updated on the host's word that the step was
finite, so a stopped run saves the average of the steps before the bad one. A resumed run keeps the
average it started with (turning it on or off on resume is refused: train/best would compare trained
weights with averaged ones); its decay may change.

With an average, the validation loss, RUN/train/best and each checkpoint's `average.safetensors` are
the averaged weights, and `fidellm.models.load` reads a checkpoint's average when it has one: what is
evaluated, generated from and exported is the average. `model.safetensors` keeps the trained weights
an exact resume needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from fidellm.errors import FidelError
from fidellm.train.distributed import full_model_state, load_full_states, reshard


def check_decay(decay: float | None) -> None:
    """A FidelError unless `decay` is None (no average) or lies in (0, 1)."""
    if decay is not None and not 0 < decay < 1:
        raise FidelError(f"train config: ema_decay must lie in (0, 1) (e.g. 0.99), got {decay}")


class WeightAverage:
    """The EMA of `model`'s trainable parameters (those with requires_grad when it is made)."""

    def __init__(self, model: nn.Module, decay: float):
        check_decay(decay)
        self.model, self.decay = model, decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in self.params]

    def rate(self, step: int) -> float:
        """How far the average moves toward the weights after `step` (1-based): 1 at step 1."""
        return (1.0 - self.decay) / (1.0 - self.decay**step)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after `step`."""
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], self.rate(step))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; after it, its own again, bit for bit."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            reshard(self.model)  # FSDP2: the next forward gathers the shards written here
            for param, averaged in zip(self.params, self.shadow, strict=True):
                param.copy_(averaged)
        try:
            yield
        finally:
            with torch.no_grad():
                reshard(self.model)
                for param, kept in zip(self.params, trained, strict=True):
                    param.copy_(kept)

    def full_state(self) -> dict[str, Tensor]:
        """The averaged weights by name on CPU, complete (collective when the model is sharded)."""
        with self.applied():  # copies: on a CPU the state's tensors are the parameters themselves
            return {name: t.clone() for name, t in full_model_state(self.model).items()}

    def load_full_state(self, weights: dict[str, Tensor]) -> None:
        """Take the average from complete weights (`full_state`'s form), sharded like the model."""
        with self.applied():  # the model's own weights come back after the block
            load_full_states(self.model, None, weights, None)
            with torch.no_grad():
                for averaged, param in zip(self.shadow, self.params, strict=True):
                    averaged.copy_(param)
