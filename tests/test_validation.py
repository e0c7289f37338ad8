"""Validation during training: windows spread over the val split, bits per byte of each source, and the
best weights chosen by a set of sources."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fidellm.cli import cli
from fidellm.errors import FidelError
from fidellm.models.factory import build_model
from fidellm.paths import RunLayout
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.bpe import train_bpe
from fidellm.tokenizer.shards import TokenShards, tokenize_splits
from fidellm.train import config as train_config
from fidellm.train import loop
from fidellm.train.data import ValidationSet, token_byte_lengths, validation_batches
from fidellm.train.evaluation import evaluate
from fidellm.train.loop import train
from fixtures.tokenizer.build_run import write_split
from fixtures.train.build_run import flores_lines
from test_train import small_config


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def two_source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FLORES documents of 5 lines: dev documents are source "older", devtest ones "modern"; every split
    holds both, each written source by source (as `fidellm data prepare` writes them)."""
    run = tmp_path_factory.mktemp("two-sources")
    lines = flores_lines()
    docs = [
        {"text": "\n".join(lines[i : i + 5]), "id": f"flores/{i}",
         "metadata": {"source": "older" if i < 997 else "modern", "weight": 1.0}}
        for i in range(0, len(lines), 5)
    ]  # fmt: skip
    held = set(range(0, len(docs), 10))
    train_docs = [d for i, d in enumerate(docs) if i not in held]
    val_docs = [d for i, d in enumerate(docs) if i in held]
    write_split(run, "train", train_docs, files=1)
    write_split(run, "val", val_docs, files=1)
    write_split(run, "test", val_docs, files=1)
    train_bpe([d["text"] for d in train_docs], 512, show_progress=False).save(RunLayout(run).tokenizer)
    tokenize_splits(run, workers=1, show_progress=False)
    return run


def test_capped_validation_spreads_over_the_split_and_knows_each_targets_source(two_source_run: Path) -> None:
    shards = TokenShards.from_run(two_source_run, "val")
    every = validation_batches(shards, 64, 4, 10_000)
    n_windows = (len(shards.tokens) - 1) // 64
    assert sum(len(b[0]) for b in every.batches) == n_windows  # all of them when they fit
    capped = validation_batches(shards, 64, 4, 3)
    assert sum(len(b[0]) for b in capped.batches) == 12
    sources = torch.cat([b[2] for b in capped.batches])
    assert set(sources.unique().tolist()) == {0, 1}  # the first 12 windows would all be "older"
    assert capped.source_names == shards.meta["source_names"] == ["older", "modern"]
    # uncapped, row k is the window at k·64: its inputs and each target's source, from the offsets
    inputs, sources = torch.cat([b[0] for b in every.batches]), torch.cat([b[2] for b in every.batches])
    for k in (0, 1, n_windows // 2, n_windows - 1):
        assert inputs[k].tolist() == shards.tokens[k * 64 : k * 64 + 64].astype(np.int64).tolist()
        documents = np.searchsorted(shards.offsets, np.arange(k * 64 + 1, k * 64 + 65), side="right") - 1
        assert sources[k].tolist() == shards.doc_source[documents].astype(np.int64).tolist()
    assert set(sources[0].tolist()) == {0} and set(sources[-1].tolist()) == {1}


def test_per_source_bits_add_up_to_the_whole(two_source_run: Path) -> None:
    tokenizer = load_tokenizer(RunLayout(two_source_run).tokenizer)
    model = build_model(train_config.model_config(small_config(), tokenizer.vocab_size))
    val_set = validation_batches(TokenShards.from_run(two_source_run, "val"), 64, 4, 6)
    lengths = torch.from_numpy(token_byte_lengths(tokenizer))
    result = evaluate(model, val_set, lengths, torch.device("cpu"), _no_autocast)
    bits = sum(b for b, _ in result.source_bits.values())
    nbytes = sum(n for _, n in result.source_bits.values())
    assert set(result.source_bits) == {"older", "modern"}
    assert bits / nbytes == pytest.approx(result.bpb, rel=1e-9)
    assert result.bpb_of(["older", "modern"]) == pytest.approx(result.bpb, rel=1e-9)
    assert result.source_bpb()["modern"] == pytest.approx(result.bpb_of(["modern"]))
    plain = evaluate(model, ValidationSet([b[:2] for b in val_set.batches]), lengths, torch.device("cpu"),
                     _no_autocast)  # fmt: skip
    assert (plain.loss, plain.bpb, plain.source_bits) == (result.loss, result.bpb, {})  # chat batches


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_best_weights_follow_the_selected_sources(two_source_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(two_source_run, run)
    config = small_config(max_steps=4, eval_every=2, save_every=0, best_by_sources=["modern"])
    summary = train(run, config)
    records = [json.loads(line) for line in (run / "train/metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    assert all(set(r["val_bpb_by_source"]) == {"older", "modern"} for r in val)
    assert all(r["val_bpb_selected"] == r["val_bpb_by_source"]["modern"] for r in val)
    best = min(val, key=lambda r: r["val_bpb_selected"])
    kept = json.loads((run / "train/best/state.json").read_text())
    assert kept["step"] == best["step"] == summary["best"]["step"] and kept["best_by_sources"] == ["modern"]
    assert kept["score"] == pytest.approx(best["val_bpb_selected"])
    assert summary["val_bpb_by_source"] == val[-1]["val_bpb_by_source"]


def test_unknown_selected_source_is_refused_before_training(two_source_run: Path, tmp_path: Path) -> None:
    with pytest.raises(FidelError, match=r"best_by_sources: nowhere not in the validation batches \(sources"
                                         r" there: older, modern\)"):  # fmt: skip
        train(two_source_run, dataclasses.replace(small_config(), best_by_sources=["nowhere"]))
    assert not (two_source_run / "train").exists()


def test_train_cli_passes_best_by_sources(tmp_path: Path, monkeypatch) -> None:
    seen: list[train_config.TrainConfig] = []
    summary = {"step": 0, "parameters": 1, "checkpoint": "x"}
    monkeypatch.setattr(loop, "train", lambda run, config: seen.append(config) or summary)
    result = CliRunner().invoke(cli, ["train", str(tmp_path), "--best-by-sources", " modern, older ,"])
    assert result.exit_code == 0, result.output
    assert seen[0].best_by_sources == ["modern", "older"]
