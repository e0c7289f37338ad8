"""Turning the weight average (--ema-decay) on or off on resume is refused: RUN/train/best was scored on
one kind of weights (trained or averaged) and later candidates would be scored on the other, so the
best-validation comparison would mix them. Changing the decay of a kept average is honored."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from fidellm.errors import FidelError
from fidellm.train.config import TrainConfig
from fidellm.train.loop import train
from fidellm.train.resume import resume_changes

SMALL = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 1,
         "num_key_value_heads": 1, "head_dim": 32}  # fmt: skip


def resume(saved: dict, current: dict) -> dict:
    """resume_changes of a single-process run whose config differs from the saved one by `current`."""
    base = {"seq_len": 64, "batch_size": 2, "seed": 0, "optimizer": "adamw"}
    return resume_changes(Path("ckpt"), {**base, **saved}, 1, {**base, **current}, 1, Path("RUN"))


@pytest.mark.parametrize(
    ("saved", "current", "shown"),
    [
        ({"ema_decay": None}, {"ema_decay": 0.99}, "ema_decay null → 0.99"),
        ({"ema_decay": 0.99}, {"ema_decay": None}, "ema_decay 0.99 → null"),
        ({}, {"ema_decay": 0.99}, "ema_decay null → 0.99"),  # a checkpoint from before the average
    ],
)
def test_turning_the_average_on_or_off_is_refused(saved: dict, current: dict, shown: str) -> None:
    with pytest.raises(FidelError, match=f"cannot resume with {shown}"):
        resume(saved, current)


def test_another_decay_of_a_kept_average_is_honored() -> None:
    assert resume({"ema_decay": 0.99}, {"ema_decay": 0.999}) == {"ema_decay": (0.99, 0.999)}
    assert resume({}, {"ema_decay": None}) == {}


def test_a_run_resumed_with_an_average_stops_before_any_step(flores_run: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    run = tmp_path / "run"
    shutil.copytree(flores_run, run, ignore=lambda d, names: ["train"] if Path(d) == flores_run else [])
    config = TrainConfig(model_overrides=SMALL, seq_len=64, batch_size=2, max_steps=4, warmup_steps=1,
                         eval_every=2, eval_batches=1, save_every=2, echo=False)  # fmt: skip
    train(run, dataclasses.replace(config, stop_at_step=2))
    best = (run / "train/best/model.safetensors").read_bytes()
    with pytest.raises(FidelError, match=r"ema_decay null → 0.9 .* start a new run dir from its weights"):
        train(run, dataclasses.replace(config, ema_decay=0.9))
    assert sorted(p.name for p in (run / "train/checkpoints").iterdir()) == ["step_00000002"]
    assert (run / "train/best/model.safetensors").read_bytes() == best
