"""--epochs counts passes over the data: with gradient accumulation each optimizer step draws grad_accum
batches, so one epoch is fewer optimizer steps (it was grad_accum passes). Also: options that only
modify another one are refused without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fidellm.errors import FidelError
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


@pytest.mark.parametrize(
    ("args", "message"),
    [  # the default values, given explicitly, are refused too: they would be ignored all the same
        (["train", "--curriculum-span", "0.5"], "--curriculum-span applies with --curriculum only"),
        (["train", "--curriculum-span", "0.8"], "--curriculum-span applies with --curriculum only"),
        (["train", "--decay-fraction", "0.2"], "--decay-fraction applies to --schedule wsd only (the cosine"),
        (
            ["train", "--schedule", "cosine", "--decay-fraction", "0"],
            "--decay-fraction applies to --schedule",
        ),
        (
            ["sft", "--base", "BASE", "--curriculum-span", "0.5"],
            "--curriculum-span applies with --curriculum",
        ),
    ],
)
def test_an_option_of_an_option_left_off_is_refused(
    tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    """--curriculum-span without --curriculum and --decay-fraction with the cosine schedule were ignored."""
    from fidellm.cli import main

    with pytest.raises(SystemExit) as exited:
        main([args[0], str(tmp_path), *args[1:]])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1


def test_an_option_with_its_option_reaches_the_config(tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from fidellm.cli import cli
    from fidellm.train import loop

    seen: list[TrainConfig] = []
    summary = {"step": 0, "parameters": 1, "checkpoint": "x"}
    monkeypatch.setattr(loop, "train", lambda run, config: seen.append(config) or summary)
    args = ["--schedule", "wsd", "--decay-fraction", "0.3", "--curriculum", "--curriculum-span", "0.8"]
    result = CliRunner().invoke(cli, ["train", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    assert (seen[0].decay_fraction, seen[0].curriculum_span) == (0.3, 0.8)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"curriculum_span": 0.8}, "curriculum_span 0.8 needs curriculum"),
        ({"decay_fraction": 0.3}, "decay_fraction 0.3 needs schedule wsd"),
    ],
)
def test_the_config_refuses_them_too(changes: dict, message: str) -> None:
    """For code that builds a TrainConfig itself (the benchmarks): a value other than the default."""
    with pytest.raises(FidelError, match=message):
        TrainConfig(**changes).validate()
    TrainConfig(curriculum=True, schedule="wsd", decay_fraction=0.3, curriculum_span=0.8).validate()
