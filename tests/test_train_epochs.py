"""--epochs counts passes over the data: with gradient accumulation each optimizer step draws grad_accum
batches, so one epoch is fewer optimizer steps (it was grad_accum passes). Also: options that only
modify another one are refused without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fidellm.tokenizer.shards import TokenShards
from fidellm.train.config import TrainConfig
from fidellm.train.loop import train

SMALL = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 1,
         "num_key_value_heads": 1, "head_dim": 32}  # fmt: skip


def test_one_epoch_with_gradient_accumulation_is_one_pass(flores_run: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    run = tmp_path / "run"
    shutil.copytree(flores_run, run, ignore=lambda d, names: ["train"] if Path(d) == flores_run else [])
    windows = (len(TokenShards.from_run(run, "train").tokens) - 1) // 512
    batches = windows // 16  # of one epoch
    config = TrainConfig(
        model_overrides=SMALL, seq_len=512, batch_size=16, grad_accum=2, epochs=1, warmup_steps=1,
        eval_batches=1, save_every=0, echo=False,
    )  # fmt: skip
    summary = train(run, config)
    assert summary["step"] == batches // 2 and summary["step"] >= 2
    state = json.loads((Path(summary["checkpoint"]) / "state.json").read_text())
    assert state["data"] == {"epoch": 0, "step": batches // 2 * 2}  # not into a second pass


def test_a_compile_mode_without_compile_is_refused(tmp_path: Path, capsys) -> None:
    """--compile-mode max-autotune without --compile trained uncompiled, saying nothing."""
    from fidellm.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["train", str(tmp_path), "--compile-mode", "max-autotune"])
    err = "error: train config: compile_mode 'max-autotune' needs compile (--compile)\n"
    assert exited.value.code == 2 and capsys.readouterr().err == err
