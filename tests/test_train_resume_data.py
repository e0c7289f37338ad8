"""Resuming on re-tokenized (changed) training data is refused: the checkpoint's data position, an
(epoch, step) into a permutation of the rows, would silently point at other windows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fidellm.errors import FidelError
from fidellm.train.config import TrainConfig
from fidellm.train.loop import train

SMALL = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 1,
         "num_key_value_heads": 1, "head_dim": 32}  # fmt: skip


def halve_train_split(split: Path) -> None:
    """Keep the first half of the split's documents (as a re-tokenization of less data would)."""
    meta = json.loads((split / "meta.json").read_text())
    offsets = np.load(split / "offsets.npy")
    kept = len(offsets) // 2
    tokens = np.fromfile(split / "tokens.bin", dtype=meta["dtype"])[: offsets[kept]]
    tokens.tofile(split / "tokens.bin")
    np.save(split / "offsets.npy", offsets[: kept + 1])
    np.save(split / "doc_source.npy", np.load(split / "doc_source.npy")[:kept])
    (split / "meta.json").write_text(json.dumps({**meta, "n_tokens": int(offsets[kept]), "n_docs": kept}))


def test_resume_on_changed_training_data_is_refused(flores_run: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    run = tmp_path / "run"
    shutil.copytree(flores_run, run, ignore=lambda d, names: ["train"] if Path(d) == flores_run else [])
    config = TrainConfig(
        model_overrides=SMALL, seq_len=64, batch_size=4, max_steps=4, warmup_steps=1, eval_batches=1,
        stop_at_step=2, echo=False,
    )  # fmt: skip
    train(run, config)
    saved = json.loads((run / "train/checkpoints/step_00000002/state.json").read_text())
    halve_train_split(run / "tokens/train")
    message = rf"the training data changed since \(it made {saved['data_rows']:,} rows, .*tokens/train now"
    with pytest.raises(FidelError, match=message):
        train(run, config)
