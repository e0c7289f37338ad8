"""Damaged token shards the size checks cannot see (ids outside the vocabulary, a doc_source.npy that does
not match meta.json) are one-line errors naming the file, not an IndexError traceback mid-training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fidellm.errors import FidelError
from fidellm.tokenizer.shards import TokenShards
from fidellm.train.data import PackedBatches, validation_batches


def write_shards(directory: Path, tokens: list[int], doc_source: list[int], vocab: int = 50) -> TokenShards:
    """A split of one document per `doc_source` entry, the tokens dealt out evenly."""
    directory.mkdir(parents=True)
    n_docs = len(doc_source)
    offsets = np.linspace(0, len(tokens), n_docs + 1).round().astype(np.int64)
    meta = {"dtype": "uint16", "n_tokens": len(tokens), "n_docs": n_docs, "vocab_size": vocab,
            "source_names": ["a", "b"], "tokenizer": {}}  # fmt: skip
    (directory / "meta.json").write_text(json.dumps(meta))
    np.asarray(tokens, dtype=np.uint16).tofile(directory / "tokens.bin")
    np.save(directory / "offsets.npy", offsets)
    np.save(directory / "doc_source.npy", np.asarray(doc_source, dtype=np.uint16))
    return TokenShards(directory)


def test_an_id_outside_the_vocabulary_names_tokens_bin(tmp_path: Path) -> None:
    tokens = [i % 50 for i in range(64)]
    tokens[37] = 60000
    shards = write_shards(tmp_path / "train", tokens, [0, 1])
    batches = PackedBatches(shards, seq_len=8, batch_size=7, seed=0)
    message = r"train/tokens.bin: token 37 is id 60000, outside the vocabulary of 50"
    with pytest.raises(FidelError, match=message):
        batches.next_batch()
    with pytest.raises(FidelError, match=r"tokens.bin: token 37 is id 60000"):
        validation_batches(shards, seq_len=8, batch_size=2, max_batches=10)


def test_a_clean_split_still_batches(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "val", [i % 50 for i in range(64)], [0, 1])
    val = validation_batches(shards, seq_len=8, batch_size=2, max_batches=10)
    assert sum(len(batch[0]) for batch in val.batches) == 7 and val.source_names == ["a", "b"]


@pytest.mark.parametrize("doc_source", [[0], [0, 1, 1], [0, 2]], ids=["short", "long", "unknown source"])
def test_a_doc_source_that_does_not_match_meta_is_named(tmp_path: Path, doc_source: list[int]) -> None:
    shards = write_shards(tmp_path / "val", [i % 50 for i in range(64)], [0, 1])
    np.save(tmp_path / "val" / "doc_source.npy", np.asarray(doc_source, dtype=np.uint16))
    shards = TokenShards(tmp_path / "val")
    message = r"val/doc_source.npy: does not match meta.json \(2 documents, 2 source_names\)"
    with pytest.raises(FidelError, match=message):
        validation_batches(shards, seq_len=8, batch_size=2, max_batches=10)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--stage-lr-multipliers", "error: --stage-lr-multipliers ' , ' names no factor (e.g. 2,1.5,1)\n"),
        ("--best-by-sources", "error: --best-by-sources ' , ' names no source\n"),
    ],
)
def test_a_list_option_naming_nothing_is_refused(tmp_path: Path, capsys, option: str, message: str) -> None:
    """' , ' was taken as no list at all: the run trained without the factors or sources asked for."""
    from fidellm.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["train", str(tmp_path), option, " , "])
    assert exited.value.code == 2 and capsys.readouterr().err == message
