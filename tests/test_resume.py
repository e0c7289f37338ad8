"""Resuming with other settings: refused where the data position or the saved state depends on them,
honored and reported where only the trajectory changes, and never past the run's last step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fidellm.cli import cli, main
from fidellm.errors import FidelError
from fidellm.models.llama import LlamaForCausalLM
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.shards import TokenShards
from fidellm.train import checkpoint as ckpt
from fidellm.train import config as train_config
from fidellm.train import loop
from fidellm.train.loop import train
from fidellm.train.optim import build_optimizer
from fidellm.train.resume import resume_changes
from fixtures.train.build_run import build_flores_run
from test_train import SMALL, fresh_run, small_config

STOPPED = small_config(max_steps=4, stop_at_step=2, save_every=0)


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped at step 2 of 4 (checkpoint step_00000002), copied by each test."""
    run = fresh_run(build_flores_run(tmp_path_factory.mktemp("flores")), tmp_path_factory.mktemp("stopped"))
    train(run, STOPPED)
    return run


@pytest.fixture
def run(stopped_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(stopped_run, copy)
    return copy


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seq_len": 32}, "seq_len 64 → 32"),
        ({"seed": 1}, "seed 0 → 1"),
        ({"batch_size": 2}, "batch_size × processes 4 × 1 = 4 → 2 × 1 = 2"),
        ({"max_samples": 10}, "max_samples null → 10"),
        ({"stage_lr_multipliers": [2.0]}, "stage_lr_multipliers [] → [2.0]"),
        ({"optimizer": "muon"}, 'optimizer "adamw" → "muon"'),
    ],
)
def test_changes_the_data_position_depends_on_are_refused(run: Path, change: dict, named: str) -> None:
    metrics = (run / "train/metrics.jsonl").read_text()
    with pytest.raises(FidelError) as raised:
        train(run, small_config(max_steps=4, **change))
    message = str(raised.value)
    assert "step_00000002: cannot resume with " + named in message and f"--base {run}" in message
    assert (run / "train/metrics.jsonl").read_text() == metrics  # refused before anything was written


def test_a_different_model_config_names_its_fields(run: Path) -> None:
    config = small_config(max_steps=4, model_overrides={**SMALL, "dropout": 0.1, "hidden_size": 32})
    with pytest.raises(FidelError, match=r"model config differs from this run's \(hidden_size 64 → 32\)"):
        train(run, config)


def test_the_same_rows_per_step_on_other_process_counts_resume() -> None:
    saved = {"batch_size": 4, "seq_len": 64}
    args = (Path("ckpt"), saved, 2)
    current = {"seq_len": 64, "optimizer": "adamw"}
    assert resume_changes(*args, {**current, "batch_size": 8}, 1, Path("run")) == {}
    with pytest.raises(FidelError, match=r"batch_size × processes 4 × 2 = 8 → 4 × 1 = 4"):
        resume_changes(*args, {**current, "batch_size": 4}, 1, Path("run"))
    assert resume_changes(Path("ckpt"), None, None, {"batch_size": 1}, 1, Path("run")) == {}  # unchecked


def test_a_checkpoint_from_before_the_optimizer_choice_was_adamw() -> None:
    legacy = {"batch_size": 4}  # no "optimizer" field
    assert (
        resume_changes(Path("ckpt"), legacy, 1, {"batch_size": 4, "optimizer": "adamw"}, 1, Path("r")) == {}
    )
    with pytest.raises(FidelError, match='cannot resume with optimizer "adamw" → "muon"'):
        resume_changes(Path("ckpt"), legacy, 1, {"batch_size": 4, "optimizer": "muon"}, 1, Path("r"))


def test_trajectory_changes_are_honored_and_reported(run: Path, capsys) -> None:
    config = small_config(max_steps=6, lr=1e-3, weight_decay=0.3, echo=True)
    summary = train(run, config)
    assert summary["resumed_from"] == 2 and summary["step"] == 6
    out = capsys.readouterr().out
    assert "resuming from " in out and "step_00000002 (step 2)" in out
    assert "max_steps 4 → 6, lr 0.003 → 0.001, weight_decay 0.1 → 0.3" in out  # and nothing else
    resumed = json.loads((run / "train/config.json").read_text())["resumed"]
    assert resumed["step"] == 2 and resumed["changed"]["weight_decay"] == [0.1, 0.3]


def test_the_optimizer_keeps_this_runs_hyperparameters(run: Path) -> None:
    """Loading an optimizer state restores its moments, not the saved weight decay or betas."""
    path = run / "train/checkpoints/step_00000002"
    model = LlamaForCausalLM(train_config.model_config(STOPPED, load_tokenizer(run / "tokenizer").vocab_size))
    optimizer = build_optimizer(model, 1e-3, weight_decay=0.3, betas=(0.8, 0.9))
    ckpt.restore_checkpoint(ckpt.read_checkpoint(path), model, optimizer)
    decayed, undecayed = optimizer.param_groups
    assert (decayed["weight_decay"], undecayed["weight_decay"]) == (0.3, 0.0)
    assert decayed["betas"] == (0.8, 0.9)
    saved = torch.load(path / "optimizer.pt", weights_only=True)["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(optimizer.state[decayed["params"][0]]["exp_avg"], saved)


def test_a_checkpoint_past_the_last_step_is_refused(run: Path) -> None:
    with pytest.raises(
        FidelError, match=r"step_00000002 is at step 2, past this run's last step 1 \(--steps 4"
    ):
        train(run, small_config(max_steps=4, stop_at_step=1))
    with pytest.raises(FidelError, match=r"past this run's last step 1 \(--steps 1\): raise them"):
        train(run, small_config(max_steps=1))


def test_a_run_already_at_its_last_step_says_so(run: Path, capsys) -> None:
    summary = train(run, small_config(max_steps=4, stop_at_step=2, echo=True))
    assert summary["step"] == 2 and summary["losses"] == []
    out = capsys.readouterr().out
    assert "step 2 is already this run's last: nothing to train" in out and "changed" not in out


def test_train_cli_passes_the_optimizer_options(tmp_path: Path, monkeypatch) -> None:
    seen: list[train_config.TrainConfig] = []
    summary = {"step": 0, "parameters": 1, "checkpoint": "x"}
    monkeypatch.setattr(loop, "train", lambda run, config: seen.append(config) or summary)
    args = ["--epochs", "2", "--min-lr-ratio", "0", "--schedule", "wsd", "--decay-fraction", "0.3",
            "--beta1", "0.8", "--beta2", "0.99", "--grad-clip", "0.5", "--keep-last", "0",
            "--eval-batches", "4"]  # fmt: skip
    result = CliRunner().invoke(cli, ["train", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    config = seen[0]
    assert (config.epochs, config.min_lr_ratio, config.decay_fraction, config.beta1, config.beta2) == (
        2, 0.0, 0.3, 0.8, 0.99
    )  # fmt: skip
    assert (config.grad_clip, config.keep_last, config.eval_batches) == (0.5, 0, 4)
    for bad in (["--beta2", "1"], ["--grad-clip", "-1"], ["--epochs", "0"], ["--keep-last", "-1"]):
        result = CliRunner().invoke(cli, ["train", str(tmp_path), *bad])
        assert result.exit_code == 2 and bad[0] in result.output


def test_pretraining_for_whole_epochs(stopped_run: Path, tmp_path: Path) -> None:
    run = fresh_run(stopped_run, tmp_path)
    windows = (len(TokenShards.from_run(run, "train").tokens) - 1) // 512
    summary = train(run, small_config(epochs=1, seq_len=512, batch_size=32, grad_accum=1, save_every=0))
    assert summary["step"] == windows // 32 and summary["step"] >= 2
    saved = json.loads((run / "train/config.json").read_text())["train"]
    assert saved["epochs"] == 1 and saved["max_steps"] == windows // 32


def test_a_metrics_line_cut_by_a_kill_does_not_stop_the_resume(run: Path) -> None:
    metrics = run / "train/metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"kind": "train", "step": 3, "lo')  # killed mid-write
    assert train(run, small_config(max_steps=4))["resumed_from"] == 2
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]
    metrics.write_text('{"kind": "train", "st\n' + whole)  # damage elsewhere is named, not skipped
    with pytest.raises(FidelError, match=r"metrics.jsonl:1: not JSON \(damaged\); remove that line"):
        train(run, small_config(max_steps=5))


def test_train_continues_pretraining_from_a_base(run: Path, tmp_path: Path, capsys) -> None:
    target = fresh_run(run, tmp_path / "continued")
    options = ["--steps", "1", "--seq-len", "64", "--batch-size", "4", "--warmup", "0", "--device", "cpu"]
    main(["train", str(target), "--base", str(run), "--lr", "1e-12", *options])
    base = load_file(run / "train/checkpoints/step_00000002/model.safetensors")  # the run's latest
    after = load_file(target / "train/checkpoints/step_00000001/model.safetensors")
    assert base.keys() == after.keys() and all(torch.allclose(base[k], after[k], atol=1e-6) for k in base)
    assert json.loads((target / "train/config.json").read_text())["train"]["base"] == str(run.resolve())
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", str(target), "--base", str(run), "--preset", "tiny", *options])
    assert capsys.readouterr().err == (
        "error: --base trains the base model's own config; leave out --preset and --dropout\n"
    )


def test_no_validation_batches_is_refused(run: Path) -> None:
    with pytest.raises(FidelError, match="eval_batches must be positive, got 0"):
        train(run, small_config(max_steps=4, eval_batches=0))
