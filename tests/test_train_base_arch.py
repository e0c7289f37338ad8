"""`fidellm train --base` trains the base's own architecture: train/config.json records it (an H-Net base
was recorded as arch "llama", the --arch default, beside its H-Net model config)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.tokenizer.shards import tokenize_splits
from fidellm.train.config import TrainConfig
from fidellm.train.loop import train
from fixtures.train.build_run import build_flores_run


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FLORES fixture run with the byte tokenizer, re-tokenized."""
    run = build_flores_run(tmp_path_factory.mktemp("bytes"))
    shutil.rmtree(run / "tokenizer")
    ByteTokenizer().save(run / "tokenizer")
    tokenize_splits(run, workers=1, show_progress=False)
    return run


def test_a_base_records_its_own_architecture(byte_run: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    settings = {"seq_len": 64, "batch_size": 2, "max_steps": 1, "warmup_steps": 1, "eval_batches": 1}
    train(byte_run, TrainConfig(arch="hnet", preset="hnet-tiny", echo=False, **settings))
    run = tmp_path / "run"
    shutil.copytree(byte_run, run, ignore=lambda d, names: ["train"] if Path(d) == byte_run else [])
    train(run, TrainConfig(base=str(byte_run), echo=False, **settings))  # arch left at its default
    saved = json.loads((run / "train/config.json").read_text())
    assert saved["model"]["arch"] == saved["train"]["arch"] == "hnet"
