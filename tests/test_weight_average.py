"""The weight average (EMA): its arithmetic, that it never changes training, what a run keeps and loads,
exact resume, and the sync-free loop's stop on a bad step."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fidellm.cli import main
from fidellm.errors import FidelError
from fidellm.models.load import load_model
from fidellm.train import loop
from fidellm.train.average import WeightAverage
from fidellm.train.checkpoint import AVERAGE_FILE, latest_checkpoint, read_checkpoint
from fidellm.train.loop import train
from fidellm.train.optim import build_optimizer
from test_train import fresh_run, poison_fourth_step, small_config

DECAY = 0.9


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


def test_average_follows_its_formula_and_swaps_back_exactly() -> None:
    layer = nn.Linear(3, 2)
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    layer.register_parameter("frozen", frozen)
    average = WeightAverage(layer, DECAY)
    assert len(average.shadow) == 2  # weight and bias: what trains
    assert average.rate(1) == 1.0 and average.rate(2) == pytest.approx(0.1 / 0.19)
    assert average.rate(1000) == pytest.approx(0.1)
    seen = []  # the weights after each step: the average weighs step s by DECAY ** (t - s), normalized
    for step in range(1, 6):
        with torch.no_grad():
            layer.weight.add_(torch.randn_like(layer.weight))
        average.update(step)
        seen.append(layer.weight.detach().clone())
    factors = [DECAY ** (len(seen) - s) for s in range(1, len(seen) + 1)]
    expected = sum(f * w for f, w in zip(factors, seen, strict=True)) / sum(factors)
    assert torch.allclose(average.shadow[0], expected, atol=1e-6)
    trained = [p.detach().clone() for p in layer.parameters()]
    with average.applied():
        assert torch.equal(layer.weight, average.shadow[0]) and torch.equal(layer.bias, average.shadow[1])
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), trained, strict=True))
    state = average.full_state()
    assert torch.equal(state["weight"], average.shadow[0]) and torch.equal(state["frozen"], frozen)
    other = WeightAverage(layer, DECAY)
    other.load_full_state(state)
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, average.shadow, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), trained, strict=True))


@pytest.fixture(scope="module")
def runs(flores_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """The same small run without and with an average."""
    out = {}
    for name, decay in (("plain", None), ("averaged", DECAY)):
        run = fresh_run(flores_run, tmp_path_factory.mktemp(name))
        out[name] = run, train(run, small_config(ema_decay=decay))
    return out


def _weights(checkpoint: Path, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(checkpoint / file)


def _equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_average_never_changes_training(runs: dict[str, tuple[Path, dict]]) -> None:
    (plain_run, plain), (run, averaged) = runs["plain"], runs["averaged"]
    assert averaged["losses"] == plain["losses"]
    final, plain_final = Path(averaged["checkpoint"]), Path(plain["checkpoint"])
    assert _equal(_weights(final), _weights(plain_final))  # the trained weights: the same
    assert not (plain_final / AVERAGE_FILE).exists()
    average = _weights(final, AVERAGE_FILE)
    assert average.keys() == _weights(final).keys() and not _equal(average, _weights(final))
    val = [json.loads(line) for line in (run / "train/metrics.jsonl").read_text().splitlines()]
    plain_val = [json.loads(line) for line in (plain_run / "train/metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["kind"] == "val"]
    plain_val = [r for r in plain_val if r["kind"] == "val"]
    assert [r["val_loss_trained"] for r in val] == [r["val_loss"] for r in plain_val]
    assert [r["val_bpb_trained"] for r in val] == [r["val_bpb"] for r in plain_val]
    assert all(r["val_loss"] != r["val_loss_trained"] for r in val)
    assert averaged["val_loss"] == val[-1]["val_loss"]  # the run's figure is the average's


def test_what_is_evaluated_kept_and_loaded_is_the_average(runs: dict[str, tuple[Path, dict]]) -> None:
    run, summary = runs["averaged"]
    final = Path(summary["checkpoint"])
    model, _ = load_model(run)  # a run dir: its latest checkpoint, averaged
    loaded = {k: v for k, v in model.state_dict().items()}
    average = _weights(final, AVERAGE_FILE)
    assert all(torch.equal(loaded[name], average[name]) for name in average)
    best = read_checkpoint(run / "train/best")
    assert best.state["val_loss"] == summary["best"]["val_loss"]
    if best.step == summary["step"]:  # the best evaluation was the last: its weights are the average
        assert _equal(_weights(run / "train/best"), average)


def test_resume_continues_the_average_bit_for_bit(
    flores_run: Path, tmp_path: Path, runs: dict[str, tuple[Path, dict]]
) -> None:
    straight = Path(runs["averaged"][1]["checkpoint"])
    run = fresh_run(flores_run, tmp_path)
    train(run, small_config(ema_decay=DECAY, stop_at_step=5))
    resumed = train(run, small_config(ema_decay=DECAY))
    assert resumed["resumed_from"] == 5
    final = Path(resumed["checkpoint"])
    assert _equal(_weights(final, AVERAGE_FILE), _weights(straight, AVERAGE_FILE))
    assert _equal(_weights(final), _weights(straight))


def test_a_checkpoint_missing_its_average_is_refused_on_resume(flores_run: Path, tmp_path: Path) -> None:
    """A run that keeps an average resumes from it; a checkpoint that lost the file is an error, not an
    average silently restarted from the checkpoint's weights."""
    run = fresh_run(flores_run, tmp_path)
    train(run, small_config(ema_decay=DECAY, stop_at_step=5))
    (run / "train/checkpoints/step_00000005" / AVERAGE_FILE).unlink()
    missing = rf"step_00000005: the run keeps a weight average but {AVERAGE_FILE} is missing"
    with pytest.raises(FidelError, match=missing):
        train(run, small_config(ema_decay=DECAY, stop_at_step=6))


def test_sync_free_stop_on_a_bad_step_saves_the_average_before_it(
    flores_run: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(loop, "SYNC_FREE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(loop, "build_optimizer", functools.partial(build_optimizer, fused=True))
    clean = fresh_run(flores_run, tmp_path / "clean")
    train(clean, small_config(save_every=0, stop_at_step=3, ema_decay=DECAY))
    run = fresh_run(flores_run, tmp_path / "poisoned")
    poison_fourth_step(monkeypatch)
    with pytest.raises(FidelError, match=r"non-finite loss .* at step 4"):
        train(run, small_config(save_every=0, ema_decay=DECAY))
    saved = latest_checkpoint(run / "train/checkpoints")
    reference = clean / "train/checkpoints/step_00000003"
    assert _equal(_weights(saved, AVERAGE_FILE), _weights(reference, AVERAGE_FILE))


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_a_decay_outside_zero_one_is_refused(tmp_path: Path, decay: float, capsys) -> None:
    with pytest.raises(FidelError, match=r"ema_decay must lie in \(0, 1\)"):
        train(tmp_path, small_config(ema_decay=decay))
    with pytest.raises(SystemExit) as exited:
        main(["train", str(tmp_path), "--ema-decay", str(decay)])
    assert exited.value.code == 2
    assert (
        capsys.readouterr().err
        == f"error: train config: ema_decay must lie in (0, 1) (e.g. 0.99), got {decay}\n"
    )
