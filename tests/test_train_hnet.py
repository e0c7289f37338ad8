"""`fidellm train --arch hnet`: the same engine trains the byte-level H-Net (ratio loss, per-stage
learning rates, decay exemptions, bytes/chunk logging, exact resume, gradient checkpointing)."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from fidellm.errors import FidelError
from fidellm.models.factory import build_model, preset_config
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.tokenizer.shards import tokenize_splits
from fidellm.train.config import TrainConfig
from fidellm.train.loop import train
from fidellm.train.optim import build_optimizer, param_groups
from fixtures.train.build_run import build_flores_run


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)  # tiny ops: one thread is much faster on the shared 2-core machine


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FLORES fixture run with the byte tokenizer in place of the BPE, re-tokenized."""
    run = build_flores_run(tmp_path_factory.mktemp("bytes"))
    shutil.rmtree(run / "tokenizer")
    ByteTokenizer().save(run / "tokenizer")
    tokenize_splits(run, workers=1, show_progress=False)
    return run


def fresh(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=lambda d, names: ["train"] if Path(d) == source else [])
    return target


def config(**changes) -> TrainConfig:
    base = TrainConfig(arch="hnet", preset="hnet-tiny", seq_len=128, batch_size=2, max_steps=6,
                       warmup_steps=1, lr=2e-3, eval_every=3, eval_batches=2, log_every=1, save_every=3,
                       echo=False, stage_lr_multipliers=[2.0, 1.0])  # fmt: skip
    return dataclasses.replace(base, **changes)


def test_hnet_trains_logs_chunks_and_resumes_exactly(byte_run: Path, tmp_path: Path) -> None:
    straight = train(fresh(byte_run, tmp_path / "a"), config())
    run = fresh(byte_run, tmp_path / "b")
    train(run, config(stop_at_step=3))
    resumed = train(run, config())
    assert resumed["resumed_from"] == 3 and resumed["losses"] == straight["losses"][3:]
    assert straight["losses"][-1] < straight["losses"][0]
    records = [json.loads(line) for line in (run / "train/metrics.jsonl").read_text().splitlines()]
    chunks = [r["bytes_per_chunk"] for r in records if r["kind"] == "train"]
    assert len(chunks) == 6 and all(len(c) == 1 and c[0] >= 1.0 for c in chunks)
    state = json.loads((run / "train/checkpoints/step_00000006/state.json").read_text())
    assert state["model_config"]["arch"] == "hnet" and 0 < straight["val_bpb"] < 9


def test_hnet_sync_free_loop_logs_what_the_checked_one_does(
    byte_run: Path, tmp_path: Path, monkeypatch
) -> None:
    """The CUDA loop (losses and chunk sizes read one step late) on CPU, against the checked loop."""
    from fidellm.train import loop

    monkeypatch.setattr(loop, "build_optimizer", functools.partial(build_optimizer, fused=True))
    checked = train(fresh(byte_run, tmp_path / "checked"), config())
    monkeypatch.setattr(loop, "SYNC_FREE_DEVICES", ("cuda", "cpu"))
    late = train(fresh(byte_run, tmp_path / "late"), config())
    assert late["losses"] == checked["losses"] and late["val_loss"] == checked["val_loss"]

    timing = ("tok_per_s", "mfu", "eta_s", "memory_gib", "time")

    def logged(run: str) -> list[dict]:
        lines = (tmp_path / run / "train/metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]

    assert logged("late") == logged("checked")


def test_hnet_ratio_loss_is_trained_not_logged_as_cross_entropy(
    byte_run: Path, tmp_path: Path, monkeypatch
) -> None:
    from fidellm.models.hnet import HNetForCausalLM

    seen = []
    original = HNetForCausalLM.forward

    def spy(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if self.training:
            seen.append((output.loss.item(), output.aux_loss.item()))
        return output

    monkeypatch.setattr(HNetForCausalLM, "forward", spy)
    summary = train(fresh(byte_run, tmp_path / "run"), config(max_steps=2, save_every=0))
    assert summary["losses"] == pytest.approx([ce for ce, _ in seen], rel=1e-6)
    assert all(aux > 0 for _, aux in seen)


def test_hnet_groups_use_stage_multipliers_and_decay_exemptions() -> None:
    model = build_model(preset_config("hnet", "hnet-tiny", 256, 2048, {}))
    groups = param_groups(model, 0.1, stage_lr_multipliers=[2.0, 1.0])
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: (g["weight_decay"], g["lr_mult"]) for g in groups for p in g["params"]}
    assert by_name["embeddings.weight"] == (0.0, 2.0)
    assert all(mult == 1.0 for name, (_, mult) in by_name.items() if "main_network.main_network" in name)
    assert all(
        decay == 0.0 for name, (decay, _) in by_name.items() if name.endswith(("A_log", "dt_bias", ".D"))
    )
    assert any(decay == 0.1 for decay, _ in by_name.values())
    with pytest.raises(FidelError, match=r"has 3 entries; the model has 2 stage\(s\)"):
        param_groups(model, 0.1, stage_lr_multipliers=[1.0, 1.0, 1.0])


def test_hnet_gradient_checkpointing_gives_the_same_losses(byte_run: Path, tmp_path: Path) -> None:
    plain = train(fresh(byte_run, tmp_path / "plain"), config(max_steps=2, save_every=0))
    recomputed = train(fresh(byte_run, tmp_path / "ckpt"), config(max_steps=2, save_every=0,
                                                                    gradient_checkpointing=True))  # fmt: skip
    assert recomputed["losses"] == pytest.approx(plain["losses"], rel=1e-6)


def test_hnet_needs_the_byte_tokenizer(tmp_path: Path) -> None:
    run = build_flores_run(tmp_path / "bpe")
    with pytest.raises(FidelError, match="byte tokenizer"):
        train(run, config())


def test_progressive_unfreezing_trains_only_what_the_schedule_opened(byte_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run = fresh(byte_run, tmp_path / "run")
    schedule = [[0, ["embeddings.*"]], [2, ["*"]]]
    train(run, config(max_steps=4, save_every=1, keep_last=10, unfreeze=schedule))
    start = load_file(str(run / "train/checkpoints/step_00000001/model.safetensors"))
    after_two = load_file(str(run / "train/checkpoints/step_00000002/model.safetensors"))
    end = load_file(str(run / "train/checkpoints/step_00000004/model.safetensors"))
    assert not torch.equal(start["embeddings.weight"], after_two["embeddings.weight"])
    frozen = [k for k in start if k != "embeddings.weight"]
    assert all(torch.equal(start[k], after_two[k]) for k in frozen)  # steps 1-2: embeddings only
    assert any(not torch.equal(after_two[k], end[k]) for k in frozen)  # from step 2 on: everything
    with pytest.raises(FidelError, match="matches no parameter"):
        train(fresh(byte_run, tmp_path / "bad"), config(unfreeze=[[0, ["nosuch.*"]]]))
    preset = train(
        fresh(byte_run, tmp_path / "preset"), config(max_steps=2, save_every=0, unfreeze="hnet-design-notes")
    )
    assert preset["step"] == 2


def test_a_base_records_its_own_architecture(byte_run: Path, tmp_path: Path) -> None:
    """`--base` trains the base's own architecture, and train/config.json records it (an H-Net base was
    recorded as arch "llama", the --arch default, beside its H-Net model config)."""
    settings = {"seq_len": 64, "batch_size": 2, "max_steps": 1, "warmup_steps": 1, "eval_batches": 1}
    base = fresh(byte_run, tmp_path / "base")
    train(base, TrainConfig(arch="hnet", preset="hnet-tiny", echo=False, **settings))
    run = fresh(byte_run, tmp_path / "run")
    train(run, TrainConfig(base=str(base), echo=False, **settings))  # arch left at its default
    saved = json.loads((run / "train/config.json").read_text())
    assert saved["model"]["arch"] == saved["train"]["arch"] == "hnet"


def test_a_base_run_records_no_preset_and_refuses_another_arch(byte_run: Path, tmp_path: Path) -> None:
    """`fidellm train --base` recorded preset "tiny" (the --preset default) whatever the base was, and an
    explicit --arch other than the base's was silently overridden by the base's."""
    from click.testing import CliRunner

    from fidellm.cli import cli

    settings = {"seq_len": 64, "batch_size": 2, "max_steps": 1, "warmup_steps": 1, "eval_batches": 1}
    base = fresh(byte_run, tmp_path / "base")
    train(base, TrainConfig(arch="hnet", preset="hnet-2s-tiny", echo=False, **settings))
    run = fresh(byte_run, tmp_path / "run")
    args = ["train", str(run), "--base", str(base), "--seq-len", "64", "--batch-size", "2", "--steps", "1",
            "--warmup", "1", "--eval-batches", "1", "--device", "cpu"]  # fmt: skip
    refused = CliRunner().invoke(cli, [*args, "--arch", "llama"])
    assert isinstance(refused.exception, FidelError) and not (run / "train").exists()
    assert str(refused.exception).startswith(f"--arch llama: the base model {base} is hnet")
    result = CliRunner().invoke(cli, [*args, "--arch", "hnet"])  # the base's own: fine
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "train/config.json").read_text())["train"]
    assert (saved["arch"], saved["preset"], saved["base"]) == ("hnet", None, str(base.resolve()))
    with pytest.raises(FidelError, match="preset is needed"):
        TrainConfig(preset=None).validate()
