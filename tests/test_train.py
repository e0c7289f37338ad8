"""Training engine: exact resume, schedules, decay groups, atomic saves, failure modes, learning."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fidellm.errors import FidelError
from fidellm.models.llama import LlamaForCausalLM, preset
from fidellm.tokenizer.base import load_tokenizer
from fidellm.train import checkpoint as ckpt
from fidellm.train import config as train_config
from fidellm.train import loop
from fidellm.train import monitor as monitor_module
from fidellm.train.config import TrainConfig
from fidellm.train.data import PackedBatches, token_byte_lengths
from fidellm.train.evaluation import Validation
from fidellm.train.loop import train
from fidellm.train.monitor import Monitor
from fidellm.train.optim import build_optimizer, cosine_lr, learning_rate, param_groups, wsd_lr
from fixtures.train.build_run import flores_lines

SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 32}  # fmt: skip


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


def fresh_run(source: Path, tmp_path: Path) -> Path:
    """A copy of the prepared run without any training output."""
    run = tmp_path / "run"
    shutil.copytree(source, run, ignore=lambda d, names: ["train"] if Path(d) == source else [])
    return run


def small_config(**changes) -> TrainConfig:
    base = TrainConfig(
        model_overrides={**SMALL, "dropout": 0.1}, seq_len=64, batch_size=4, grad_accum=2, max_steps=8,
        lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2, log_every=2, save_every=3, keep_last=2,
        echo=False,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def test_resume_is_bit_exact(flores_run: Path, tmp_path: Path) -> None:
    straight = train(fresh_run(flores_run, tmp_path / "a"), small_config())
    run = fresh_run(flores_run, tmp_path / "b")
    first = train(run, small_config(stop_at_step=5))
    assert first["step"] == 5 and (run / "train/checkpoints/step_00000005").is_dir()
    second = train(run, small_config())  # everything rebuilt from the checkpoint
    assert second["resumed_from"] == 5
    assert first["losses"] == straight["losses"][:5]
    assert second["losses"] == straight["losses"][5:]  # float equality: bit for bit
    assert second["val_bpb"] == straight["val_bpb"]
    assert [p.name for p in ckpt.list_checkpoints(run / "train/checkpoints")] == [
        "step_00000006",
        "step_00000008",
    ]
    steps = [json.loads(line)["step"] for line in (run / "train/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and (run / "train/curves.png").stat().st_size > 0


def test_schedules_at_hand_checked_steps() -> None:
    assert cosine_lr(0, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert cosine_lr(9, 1.0, 10, 110, 0.1) == pytest.approx(1.0)
    assert cosine_lr(10, 1.0, 10, 110, 0.1) == pytest.approx(1.0)
    assert cosine_lr(60, 1.0, 10, 110, 0.1) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert cosine_lr(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert cosine_lr(500, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    # WSD over 100 steps, last 20 decaying linearly to 0
    assert wsd_lr(4, 2.0, 5, 100, 0.0, 0.2) == pytest.approx(2.0)
    assert wsd_lr(79, 2.0, 5, 100, 0.0, 0.2) == pytest.approx(2.0)
    assert wsd_lr(90, 2.0, 5, 100, 0.0, 0.2) == pytest.approx(1.0)
    assert wsd_lr(100, 2.0, 5, 100, 0.0, 0.2) == pytest.approx(0.0)
    with pytest.raises(FidelError, match="schedule"):
        learning_rate("linear", 0, 1.0, 1, 10)


def test_weight_decay_only_on_non_embedding_matrices() -> None:
    model = LlamaForCausalLM(dataclasses.replace(preset("tiny", 512), num_hidden_layers=2))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("_proj.weight") for n in decayed) and len(decayed) == 2 * 7
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in undecayed and all(
        n.endswith("norm.weight") for n in undecayed - {"model.embed_tokens.weight"}
    )
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied: once


def test_crash_mid_save_keeps_previous_checkpoint(flores_run: Path, tmp_path: Path, monkeypatch) -> None:
    run = fresh_run(flores_run, tmp_path)
    train(run, small_config(max_steps=3, save_every=0))
    directory = run / "train/checkpoints"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt.os, "replace", crash)  # every file of the new checkpoint is already written
    with pytest.raises(KeyboardInterrupt):
        train(run, small_config(max_steps=4, save_every=0))
    monkeypatch.undo()
    assert [p.name for p in directory.iterdir()] == ["step_00000003"]
    vocab = load_tokenizer(run / "tokenizer").vocab_size
    model = LlamaForCausalLM(train_config.model_config(small_config(), vocab))
    ckpt.restore_checkpoint(ckpt.read_checkpoint(directory / "step_00000003"), model)
    assert train(run, small_config(max_steps=4))["resumed_from"] == 3


@pytest.fixture
def sync_free(monkeypatch) -> None:
    """The loop as it runs on CUDA: fused AdamW, updates skipped on the device, losses read a step late."""
    monkeypatch.setattr(loop, "SYNC_FREE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(loop, "build_optimizer", functools.partial(build_optimizer, fused=True))


def poison_fourth_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the training loss of the 4th optimizer step (of `small_config`) NaN, and no other."""
    calls = {"n": 0}
    original = LlamaForCausalLM.forward

    def poisoned(self, input_ids, targets=None, cache=None, **options):
        output = original(self, input_ids, targets, cache, **options)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] in (7, 8):  # grad_accum 2: the 4th optimizer step only
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(LlamaForCausalLM, "forward", poisoned)


@pytest.mark.parametrize("late", [False, True], ids=["checked-each-step", "sync-free"])
def test_non_finite_loss_stops_with_step_and_checkpoint(
    flores_run: Path, tmp_path: Path, monkeypatch, request, late: bool
) -> None:
    if late:
        request.getfixturevalue("sync_free")
    clean = fresh_run(flores_run, tmp_path / "clean")
    train(clean, small_config(save_every=0, stop_at_step=3))
    run = fresh_run(flores_run, tmp_path / "poisoned")
    poison_fourth_step(monkeypatch)
    with pytest.raises(FidelError, match=r"non-finite loss .* at step 4"):
        train(run, small_config(save_every=0))
    saved = ckpt.latest_checkpoint(run / "train/checkpoints")
    assert saved is not None and ckpt.read_checkpoint(saved).step == 3
    # the bad step changed nothing and no later step slipped in: the weights of a clean stop at 3
    assert_same_weights(saved, clean / "train/checkpoints/step_00000003")


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_sync_free_loop_trains_exactly_like_the_checked_one(
    flores_run: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(loop, "build_optimizer", functools.partial(build_optimizer, fused=True))
    checked = train(fresh_run(flores_run, tmp_path / "checked"), small_config())
    monkeypatch.setattr(loop, "SYNC_FREE_DEVICES", ("cuda", "cpu"))
    late = train(fresh_run(flores_run, tmp_path / "late"), small_config())
    assert late["losses"] == checked["losses"] and late["val_loss"] == checked["val_loss"]
    assert_same_weights(Path(late["checkpoint"]), Path(checked["checkpoint"]))
    logged = [
        json.loads(line) for line in (tmp_path / "late/run/train/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in logged if r["kind"] == "train"] == [2, 4, 6, 8]
    run = fresh_run(flores_run, tmp_path / "resumed")  # and it resumes bit for bit
    train(run, small_config(stop_at_step=5))
    assert train(run, small_config())["losses"] == checked["losses"][5:]


def test_bad_setups_fail_before_training(flores_run: Path, tmp_path: Path) -> None:
    run = fresh_run(flores_run, tmp_path)
    with pytest.raises(FidelError, match="vocab_size 256 is smaller than the tokenizer's 512"):
        train(run, small_config(model_overrides={**SMALL, "vocab_size": 256}))
    with pytest.raises(FidelError, match="max_position_embeddings"):
        train(run, small_config(model_overrides={**SMALL, "max_position_embeddings": 32}))
    with pytest.raises(FidelError, match="fewer than one batch"):
        train(run, small_config(seq_len=2048, batch_size=512))
    shutil.rmtree(run / "tokens/val")
    with pytest.raises(FidelError, match="holds no token shards"):
        train(run, small_config())
    assert not (run / "train").exists()


def test_token_byte_lengths_add_up_to_utf8_bytes(flores_run: Path) -> None:
    tokenizer = load_tokenizer(flores_run / "tokenizer")
    lengths = token_byte_lengths(tokenizer)
    assert lengths[tokenizer.bos_id] == 0
    for line in flores_lines()[:50]:
        assert lengths[tokenizer.encode(line, add_bos=True)].sum() == len(line.encode("utf-8"))


def test_data_order_is_a_function_of_seed_and_position(flores_run: Path) -> None:
    from fidellm.tokenizer.shards import TokenShards

    shards = TokenShards.from_run(flores_run, "train")
    a, b = PackedBatches(shards, 64, 4, seed=1), PackedBatches(shards, 64, 4, seed=1)
    seen = [a.next_batch() for _ in range(a.steps_per_epoch + 2)]  # crosses into epoch 1
    b.load_state_dict({"epoch": 1, "step": 1})
    assert torch.equal(b.next_batch()[0], seen[-1][0])
    inputs, targets = seen[0]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert not torch.equal(PackedBatches(shards, 64, 4, seed=2).next_batch()[0], seen[0][0])


def test_prefetched_batch_is_not_counted_as_consumed(flores_run: Path) -> None:
    from fidellm.tokenizer.shards import TokenShards
    from fidellm.train.data import DevicePrefetch

    shards = TokenShards.from_run(flores_run, "train")
    data = DevicePrefetch(PackedBatches(shards, 64, 4, seed=1), torch.device("cpu"))
    first = data.next_batch()
    data.prefetch()
    data.prefetch()  # idempotent: still one batch in flight
    assert data.state_dict() == {"epoch": 0, "step": 1}
    resumed = PackedBatches(shards, 64, 4, seed=1)
    resumed.load_state_dict(data.state_dict())
    second = data.next_batch()
    assert torch.equal(resumed.next_batch()[0], second[0]) and not torch.equal(first[0], second[0])
    assert data.state_dict() == {"epoch": 0, "step": 2}


def test_loss_goes_down_on_real_text(flores_run: Path, tmp_path: Path) -> None:
    run = fresh_run(flores_run, tmp_path)
    summary = train(
        run, small_config(model_overrides=SMALL, max_steps=80, eval_every=80, lr=1e-2, warmup_steps=5)
    )
    start, end = sum(summary["losses"][:3]) / 3, sum(summary["losses"][-5:]) / 5
    assert start > math.log(512) - 0.5 and end < start - 0.6, (start, end)  # measured: 6.18 -> 5.37
    assert summary["val_loss"] < math.log(512) - 0.6 and 0 < summary["val_bpb"] < 3.0


def test_best_validation_weights_are_kept(flores_run: Path, tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import load_file

    from fidellm.models.load import load_model
    from fidellm.train import loop

    scripted = iter([5.0, 4.0, 4.5, 4.8, 4.2, 4.9])  # validation gets worse after step 4
    monkeypatch.setattr(loop, "evaluate", lambda *args: Validation(next(scripted), 1.0))
    run = fresh_run(flores_run, tmp_path / "best")
    summary = train(run, small_config(max_steps=12, eval_every=2, save_every=2, keep_last=10))
    kept = json.loads((run / "train/best/state.json").read_text())
    assert kept["step"] == summary["best"]["step"] == 4 and kept["val_loss"] == 4.0
    best = load_file(run / "train/best/model.safetensors")
    at_step_4 = load_file(run / "train/checkpoints/step_00000004/model.safetensors")
    assert best.keys() == at_step_4.keys() and all(torch.equal(best[k], at_step_4[k]) for k in best)
    model, tokenizer_dir = load_model(run / "train" / "best")
    assert tokenizer_dir == run / "tokenizer" and model.config.num_hidden_layers == SMALL["num_hidden_layers"]


def test_gradient_checkpointing_changes_memory_not_results(
    flores_run: Path, tmp_path: Path, monkeypatch
) -> None:
    from fidellm.models.blocks import TransformerBlock

    calls = {"n": 0}
    original = TransformerBlock.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TransformerBlock, "forward", counted)
    plain = train(fresh_run(flores_run, tmp_path / "plain"), small_config(max_steps=4, save_every=0))
    plain_calls, calls["n"] = calls["n"], 0
    recomputed = train(
        fresh_run(flores_run, tmp_path / "ckpt"),
        small_config(max_steps=4, save_every=0, gradient_checkpointing=True),
    )  # dropout 0.1 is on: recomputation must replay the same masks
    assert recomputed["losses"] == plain["losses"] and recomputed["val_loss"] == plain["val_loss"]
    assert calls["n"] - plain_calls == 4 * 2 * SMALL["num_hidden_layers"]  # each block again in backward
    with pytest.raises(FidelError, match="gradient_checkpointing with compile"):
        train(tmp_path / "unused", small_config(gradient_checkpointing=True, compile=True))


def test_tensorboard_events_mirror_metrics(flores_run: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = fresh_run(flores_run, tmp_path)
    train(run, small_config(max_steps=4, save_every=0, tensorboard=True))
    events = EventAccumulator(str(run / "train/tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run / "train/metrics.jsonl").read_text().splitlines()]
    train_losses = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [s for s, _ in train_losses] == [2, 4]
    assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(logged, train_losses, strict=True))
    assert {"val/val_loss", "val/val_bpb", "train/lr", "train/tok_per_s"} <= set(events.Tags()["scalars"])


def test_resuming_with_another_model_shape_is_refused(flores_run: Path, tmp_path: Path) -> None:
    run = fresh_run(flores_run, tmp_path)
    train(run, small_config(max_steps=2, save_every=0))
    with pytest.raises(FidelError, match="model config differs"):
        train(run, small_config(max_steps=4, model_overrides={**SMALL, "intermediate_size": 192}))
    with pytest.raises(FidelError, match="num_attention_heads"):
        train(run, small_config(model_overrides={**SMALL, "num_key_value_heads": 3}))
    with pytest.raises(FidelError, match="unknown model fields"):
        train(run, small_config(model_overrides={**SMALL, "hidden": 3}))
    with pytest.raises(FidelError, match="strategy"):
        train(run, small_config(strategy="zero3"))


def test_chunked_loss_trains_like_the_materialized_logits(flores_run: Path, tmp_path: Path) -> None:
    """The fused output-projection loss (the default) changes the summation order, not the training."""
    config = small_config(max_steps=6, eval_every=6, save_every=0)
    chunked = train(fresh_run(flores_run, tmp_path / "chunked"), dataclasses.replace(config, loss_chunk=48))
    full = train(fresh_run(flores_run, tmp_path / "full"), dataclasses.replace(config, loss_chunk=0))
    assert chunked["losses"] == pytest.approx(full["losses"], rel=1e-5)
    assert chunked["val_loss"] == pytest.approx(full["val_loss"], rel=1e-5)
    masked = train(
        fresh_run(flores_run, tmp_path / "masked"), dataclasses.replace(config, document_mask=True)
    )
    assert masked["losses"][0] == pytest.approx(full["losses"][0], rel=0.05)  # same data, same scale
    assert masked["losses"] != full["losses"]  # but attention no longer crosses documents
    bad_cases = [
        ({"loss_chunk": -1}, "loss_chunk must be 0"),
        ({"compile_mode": "fast"}, "compile_mode"),
        ({"document_mask": True, "arch": "hnet", "preset": "hnet-tiny", "model_overrides": {}}, "llama"),
    ]
    for bad, message in bad_cases:
        with pytest.raises(FidelError, match=message):
            train(tmp_path / "chunked/run", dataclasses.replace(config, **bad))


@pytest.fixture(scope="module")
def stopped_run(flores_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped at step 2 of 4 (one checkpoint, step_00000002), to be copied and damaged."""
    run = fresh_run(flores_run, tmp_path_factory.mktemp("stopped"))
    train(run, small_config(max_steps=4, stop_at_step=2, save_every=0))
    return run


def _edit_state(path: Path, **changes) -> None:
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps({k: v for k, v in state.items() if v is not None}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda c: (c / "optimizer.pt").write_bytes(b"garbage"),
            r"optimizer\.pt: unreadable \(.*delete this",
        ),
        (lambda c: (c / "rng.pt").unlink(), r"rng\.pt: missing; delete this checkpoint"),
        (lambda c: (c / "rng.pt").write_bytes(b""), r"rng\.pt: unreadable"),
        (lambda c: _edit_state(c / "state.json", step="abc"), r"state\.json: field 'step' .* got 'abc'"),
        (lambda c: _edit_state(c / "state.json", step=None), r"state\.json: field 'step' .* got None"),
        (lambda c: _edit_state(c / "state.json", data=None), r"state\.json: no field 'data'"),
        (lambda c: _edit_state(c / "state.json", rng=None), r"state\.json: no field 'rng'"),
        (lambda c: (c / "state.json").write_text("[1]"), r"state\.json: not a JSON object"),
    ],
    ids=["garbage-optimizer", "missing-rng", "empty-rng", "bad-step", "no-step", "no-data", "no-rng", "list"],
)
def test_damaged_checkpoint_names_its_file(stopped_run: Path, tmp_path: Path, damage, message: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    damage(run / "train/checkpoints/step_00000002")
    with pytest.raises(FidelError, match=rf"step_00000002/{message}") as raised:
        train(run, small_config(max_steps=4))
    assert "\n" not in str(raised.value)


def test_no_resume_refuses_a_dir_with_checkpoints(stopped_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    metrics = (run / "train/metrics.jsonl").read_text()
    with pytest.raises(FidelError, match=r"train/checkpoints holds checkpoints .*step_00000002.*new run dir"):
        train(run, small_config(max_steps=1, resume=False))
    assert (run / "train/metrics.jsonl").read_text() == metrics  # nothing overwritten
    shutil.rmtree(run / "train")  # what the message says to do
    assert train(run, small_config(max_steps=1, save_every=0, resume=False))["step"] == 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"stop_at_step": -1}, "stop_at_step must be positive, got -1"),
        ({"stop_at_step": 0}, "stop_at_step must be positive, got 0"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0 and finite, got -1.0"),
        ({"weight_decay": math.nan}, "weight_decay must be >= 0 and finite, got nan"),
        ({"grad_clip": math.nan}, r"grad_clip must be >= 0 \(0: no clipping\), got nan"),
        ({"grad_clip": -1.0}, r"grad_clip must be >= 0 \(0: no clipping\), got -1.0"),
        ({"lr": math.inf}, "lr must be positive and finite, got inf"),
        ({"warmup_steps": -5}, "warmup_steps must be >= 0, got -5"),
    ],
)
def test_no_op_settings_are_refused(tmp_path: Path, bad: dict, message: str) -> None:
    with pytest.raises(FidelError, match=message):
        train(tmp_path, small_config(**bad))


def test_cli_refuses_negative_weight_decay_in_one_line(tmp_path: Path, capsys) -> None:
    from fidellm.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["train", str(tmp_path), "--weight-decay", "-1", "--stop-at-step", "3"])
    err = capsys.readouterr().err
    assert (
        exited.value.code == 2
        and err == "error: train config: weight_decay must be >= 0 and finite, got -1.0\n"
    )


def test_throughput_leaves_validation_and_checkpoint_time_out(tmp_path: Path, monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(monitor_module.time, "perf_counter", lambda: clock[0])
    monitor = Monitor(tmp_path, torch.device("cpu"), flops_per_tok=1.0, total_steps=10, echo=False)

    def steps(n: int, seconds_each: float) -> None:
        for _ in range(n):
            clock[0] += seconds_each
            monitor.count(100)

    steps(2, 1.0)
    with monitor.paused():  # a validation pass of 5 s
        clock[0] += 5.0
    steps(1, 2.0)
    record = monitor.log_train(3, 1.0, 1e-3, 0.5)
    assert record["tok_per_s"] == pytest.approx(300 / 4.0)  # 4 s of training, not 9
    assert record["eta_s"] == pytest.approx(7 * 9.0 / 3)  # the run's wall time per step, pauses included
    steps(1, 1.0)
    record = monitor.log_train(4, 1.0, 1e-3, 0.5)
    assert record["tok_per_s"] == pytest.approx(100.0) and record["eta_s"] == pytest.approx(6 * 10.0 / 4)
