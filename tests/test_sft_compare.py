"""benchmarks/sft_compare.py trains its arms as `fidellm sft` would: the command's defaults for every
setting the benchmark does not fix for all arms (weight decay 0 above all, not TrainConfig's 0.1)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from fidellm.sft.cli import sft_command
from fidellm.sft.lora import lora_spec
from fidellm.train.config import TrainConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
FIXED = {  # what the benchmark sets alike for every arm
    "data", "chat_dir", "base", "lora", "max_steps", "epochs", "batch_size", "seq_len", "lr", "warmup_steps",
    "eval_every", "eval_batches", "log_every", "save_every", "device", "seed", "resume", "echo", "curriculum",
    "optimizer",
}  # fmt: skip


@pytest.fixture(scope="module")
def sft_compare(monkeypatch_module: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch_module.syspath_prepend(str(BENCHMARKS))  # its `from common import ...`
    spec = importlib.util.spec_from_file_location("sft_compare", BENCHMARKS / "sft_compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch_module.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("arm", ["full", "lora", "qlora", "lora-curriculum"])
def test_arms_take_the_sft_commands_defaults(sft_compare: ModuleType, arm: str) -> None:
    payload = {
        "lora": sft_compare.ARMS[arm], "chat_dir": "/c", "base": "/b", "steps": 40, "batch_size": 4,
        "seq_len": 128, "lr": 1e-4, "warmup": 4, "eval_batches": 2, "device": "cpu", "seed": 3,
        "optimizer": "adamw",
    }  # fmt: skip
    config = sft_compare.train_config(payload)
    cli = {param.name: param.default for param in sft_command.params}
    assert config.weight_decay == cli["weight_decay"] == 0.0 != TrainConfig().weight_decay
    shared = {field.name for field in dataclasses.fields(TrainConfig)} & cli.keys() - FIXED
    assert {name: getattr(config, name) for name in shared} == {name: cli[name] for name in shared}
    assert (config.max_steps, config.epochs, config.lr, config.seed) == (40, None, 1e-4, 3)
    quantize = "nf4" if arm == "qlora" else None
    lora = None if arm == "full" else lora_spec(cli["lora_rank"], cli["lora_alpha"], quantize=quantize)
    assert config.lora == lora and config.curriculum == (arm == "lora-curriculum")
