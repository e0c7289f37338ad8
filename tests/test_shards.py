"""Token shards: BOS-prefixed documents, source weights in train only, worker-count independence, errors."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from fidellm.data.split_files import read_split_file, split_files
from fidellm.errors import FidelError
from fidellm.tokenizer.base import load_tokenizer, token_dtype_for
from fidellm.tokenizer.bpe import train_from_run
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.tokenizer.shards import TokenShards, copies, tokenize_splits
from fixtures.tokenizer.build_run import build_run, write_split

FILES = ("tokens.bin", "offsets.npy", "doc_source.npy", "meta.json")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = build_run(tmp_path_factory.mktemp("run"), articles=200, book_chunks=30)
    train_from_run(run, 1024, sample_mb=None, show_progress=False).save(run / "tokenizer")
    return run


@pytest.fixture(scope="module")
def metas(run_dir: Path) -> dict[str, dict]:
    return tokenize_splits(run_dir, workers=1, show_progress=False)


def documents(run: Path, split: str) -> list:
    return [doc for path in split_files(run, split) for doc in read_split_file(path)]


def test_val_documents_decode_back_with_bos(run_dir: Path, metas: dict[str, dict]) -> None:
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    shards = TokenShards.from_run(run_dir, "val")
    docs = documents(run_dir, "val")
    assert len(shards) == len(docs) == metas["val"]["n_docs"]
    assert shards.tokens.dtype == np.dtype("<u2") and len(shards.tokens) == metas["val"]["n_tokens"]
    for index, doc in enumerate(docs):
        ids = shards.document(index)
        assert ids[0] == tokenizer.bos_id
        assert tokenizer.decode(ids[1:]) == doc.text  # numpy slices decode directly
        assert shards.source(index) == doc.source
    assert not metas["val"]["reweighted"]
    assert metas["val"]["tokenizer"]["fingerprint"] == tokenizer.fingerprint()


def test_train_split_is_reweighted(run_dir: Path, metas: dict[str, dict]) -> None:
    docs = documents(run_dir, "train")
    assert {doc.weight for doc in docs} == {0.0, 0.5, 1.0, 2.5}
    expected: dict[str, int] = {}
    for doc in docs:
        expected[doc.source] = expected.get(doc.source, 0) + copies(doc.id, doc.weight)
    sources = metas["train"]["sources"]
    assert {name: entry["docs_emitted"] for name, entry in sources.items()} == expected
    assert sum(entry["docs_read"] for entry in sources.values()) == len(docs) == metas["train"]["n_docs_read"]
    assert metas["train"]["n_docs"] == sum(expected.values())
    assert sum(entry["tokens"] for entry in sources.values()) == metas["train"]["n_tokens"]
    shards = TokenShards.from_run(run_dir, "train")
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    emitted = [doc for doc in docs for _ in range(copies(doc.id, doc.weight))]
    for index in (0, 1, 2, len(shards) - 1):
        assert tokenizer.decode(shards.document(index)[1:].tolist()) == emitted[index].text
    assert metas["train"]["files"][0]["path"] == "data/splits/train/00000.jsonl.gz"
    assert len(metas["train"]["files"][0]["sha256"]) == 64


def test_copies_follow_the_weight() -> None:
    assert [copies("a", w) for w in (0.0, 1.0, 2.0, 3.0)] == [0, 1, 2, 3]
    counts = [copies(f"doc-{i}", 1.3) for i in range(20000)]
    assert set(counts) == {1, 2}
    assert math.isclose(sum(counts) / len(counts), 1.3, abs_tol=0.02)
    assert counts == [copies(f"doc-{i}", 1.3) for i in range(20000)]


def test_output_independent_of_worker_count(run_dir: Path, metas: dict[str, dict], tmp_path: Path) -> None:
    single = {
        split: {name: (run_dir / "tokens" / split / name).read_bytes() for name in FILES} for split in metas
    }
    tokenize_splits(run_dir, workers=2, show_progress=False)
    for split, files in single.items():
        for name, content in files.items():
            assert (run_dir / "tokens" / split / name).read_bytes() == content, f"{split}/{name}"
    assert not list((run_dir / "tokens").glob("*.partial"))


def test_byte_tokenizer_shards(run_dir: Path, tmp_path: Path) -> None:
    ByteTokenizer().save(tmp_path / "bytes")
    meta = tokenize_splits(run_dir, tmp_path / "bytes", workers=1, splits=("test",), show_progress=False)[
        "test"
    ]
    shards = TokenShards.from_run(run_dir, "test")
    first = documents(run_dir, "test")[0].text
    assert shards.document(0)[0] == 254
    assert bytes(shards.document(0)[1:].tolist()) == first.encode("utf-8")
    assert ByteTokenizer().decode(shards.document(0)) == first
    assert meta["tokenizer"]["kind"] == "bytes" and meta["vocab_size"] == 256


def test_token_dtype_bounds() -> None:
    assert token_dtype_for(65536).name == "uint16"
    assert token_dtype_for(65537).name == "uint32"
    with pytest.raises(FidelError, match="too large"):
        token_dtype_for(2**32 + 1)


def test_clear_errors(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FidelError, match="does not exist"):
        tokenize_splits(tmp_path, run_dir / "tokenizer")
    with pytest.raises(FidelError, match=r"tokenizer directory .* does not exist"):
        tokenize_splits(run_dir, tmp_path / "missing")
    (tmp_path / "data" / "splits" / "train").mkdir(parents=True)
    with pytest.raises(FidelError, match=r"no \*\.jsonl\.gz shards"):
        tokenize_splits(tmp_path, run_dir / "tokenizer")
    with pytest.raises(FidelError, match="no token shards"):
        TokenShards(tmp_path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "a", "metadata": {}}, "field 'text'"),
        ({"text": "x", "metadata": {}}, "field 'id'"),
        ({"text": "x", "id": "a", "metadata": {"weight": -1}}, "metadata.weight"),
        ({"text": "x", "id": "a", "metadata": {"weight": "2"}}, "metadata.weight"),
        ({"text": "x", "id": "a", "metadata": {"source": 3}}, "metadata.source"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path: Path, record: dict, message: str) -> None:
    good = {"text": "ሰላም", "id": "ok", "metadata": {"source": "s", "weight": 1.0}}
    [path] = write_split(tmp_path, "train", [good, record], files=1)
    with pytest.raises(FidelError, match=f"{path.name}:2: .*{message}"):
        list(read_split_file(path))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": "x \ud800 y", "id": "a"}, "field 'text' holds the lone surrogate \\\\ud800"),
        ({"text": "x", "id": "\udfff"}, "field 'id' holds the lone surrogate"),
        ({"text": "ሰላም 😀", "id": "a"}, None),  # a surrogate pair is one character
    ],
)
def test_lone_surrogates_are_refused(tmp_path: Path, record: dict, message: str | None) -> None:
    path = tmp_path / "00000.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:  # JSON escapes: "\ud800", "\ud83d\ude00"
        handle.write(json.dumps({**record, "metadata": {"source": "s"}}) + "\n")
    if message is None:
        assert [doc.text for doc in read_split_file(path)] == [record["text"]]
        return
    with pytest.raises(FidelError, match=f"{path.name}:1: {message}"):
        list(read_split_file(path))


def test_invalid_json_and_gzip(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps({"text": "a", "id": "1"}) + "\n{not json\n")
    with pytest.raises(FidelError, match=r"bad\.jsonl\.gz:2: not valid JSON"):
        list(read_split_file(path))
    path.write_bytes(b"not gzip")
    with pytest.raises(FidelError, match="cannot read gzip"):
        list(read_split_file(path))


def test_source_weight_overrides_reweight_train_only(
    run_dir: Path, metas: dict[str, dict], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from fidellm.cli import cli

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=lambda d, names: ["tokens"] if Path(d) == run_dir else [])
    left_out, tripled, *_ = metas["train"]["source_names"]
    options = ["--source-weight", f"{left_out}=0", "--source-weight", f"{tripled}=3", "--workers", "1"]
    result = CliRunner().invoke(cli, ["data", "tokenize", str(run), *options])
    assert result.exit_code == 0, result.output
    train = json.loads((run / "tokens/train/meta.json").read_text())
    assert train["source_weights"] == {left_out: 0.0, tripled: 3.0}
    docs = documents(run, "train")
    assert train["sources"][left_out]["docs_emitted"] == 0
    assert train["sources"][tripled]["docs_emitted"] == 3 * sum(doc.source == tripled for doc in docs)
    others = set(train["source_names"]) - {left_out, tripled}
    assert all(train["sources"][s] == metas["train"]["sources"][s] for s in others)
    assert json.loads((run / "tokens/val/meta.json").read_text())["sources"] == metas["val"]["sources"]

    shutil.rmtree(run / "tokens")
    with pytest.raises(FidelError, match=rf"\['nosuch'\], which the train split does not hold.*{left_out}"):
        tokenize_splits(run, workers=1, show_progress=False, source_weights={"nosuch": 1.0})
    assert not (run / "tokens").exists()  # refused before any split was encoded
    bad = CliRunner().invoke(cli, ["data", "tokenize", str(run), "--source-weight", f"{left_out}=lots"])
    assert isinstance(bad.exception, FidelError) and "SOURCE=WEIGHT" in str(bad.exception)
    twice = ["--source-weight", f"{left_out}=1", "--source-weight", f" {left_out}=2"]
    bad = CliRunner().invoke(cli, ["data", "tokenize", str(run), *twice])
    assert isinstance(bad.exception, FidelError) and f"names {left_out!r} twice" in str(bad.exception)
    with pytest.raises(FidelError, match="finite numbers >= 0"):
        tokenize_splits(run, workers=1, show_progress=False, source_weights={left_out: -1.0})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda meta: "{not json", r"not valid JSON \(Expecting"),
        (lambda meta: "[]", r"not a JSON object"),
        (
            lambda meta: json.dumps({k: v for k, v in meta.items() if k != "dtype"}),
            r"field 'dtype' is missing",
        ),
        (lambda meta: json.dumps({**meta, "dtype": "bogus"}), r"field 'dtype' .* got 'bogus'"),
        (lambda meta: json.dumps({**meta, "n_tokens": "many"}), r"field 'n_tokens' .* got 'many'"),
        (
            lambda meta: json.dumps({k: v for k, v in meta.items() if k != "n_docs"}),
            r"field 'n_docs' is missing",
        ),
        (lambda meta: json.dumps({**meta, "source_names": 3}), r"field 'source_names'"),
        (lambda meta: json.dumps({**meta, "tokenizer": "x"}), r"field 'tokenizer'"),
    ],
)
def test_bad_meta_json_names_file_and_field(
    run_dir: Path, metas: dict[str, dict], tmp_path: Path, edit, message: str
) -> None:
    shards = tmp_path / "val"
    shutil.copytree(run_dir / "tokens" / "val", shards)
    meta = json.loads((shards / "meta.json").read_text())
    (shards / "meta.json").write_text(edit(meta))
    with pytest.raises(FidelError, match=rf"val/meta\.json: {message}"):
        TokenShards(shards)


def test_damaged_offsets_name_the_file(run_dir: Path, metas: dict[str, dict], tmp_path: Path) -> None:
    shards = tmp_path / "val"
    shutil.copytree(run_dir / "tokens" / "val", shards)
    (shards / "offsets.npy").write_bytes(b"not numpy")
    with pytest.raises(FidelError, match=r"val/offsets\.npy: unreadable"):
        TokenShards(shards)


def test_empty_split_file_is_refused(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=lambda d, names: ["tokens"] if Path(d) == run_dir else [])
    [empty, *_] = split_files(run, "val")
    empty.write_bytes(b"")
    with pytest.raises(FidelError, match=rf"{empty.name}: empty file; re-run `fidellm data prepare"):
        list(read_split_file(empty))
    with pytest.raises(FidelError, match=rf"val/{empty.name}: empty file"):
        tokenize_splits(run, workers=1, show_progress=False)
    assert not (run / "tokens").exists()  # refused before any split was written


def test_control_token_strings_in_documents_are_text(run_dir: Path, tmp_path: Path) -> None:
    """`<|bos|>` inside a document became BOS (splitting it for document masking) and `<|im_end|>` the
    chat end; documents are text, so both are their characters. Tool tags are plain tokens anyway."""
    text = "ሰላም <|bos|> ለዓለም <|im_start|>user ጤና<|im_end|> <tool_call>"
    run = tmp_path / "run"
    write_split(run, "val", [{"text": text, "id": "x", "metadata": {"source": "s", "weight": 1.0}}], 1)
    shutil.copytree(run_dir / "tokenizer", run / "tokenizer")
    tokenizer = load_tokenizer(run / "tokenizer")
    for workers in (1, 2):
        meta = tokenize_splits(run, workers=workers, splits=("val",), show_progress=False)["val"]
        ids = TokenShards.from_run(run, "val").document(0).tolist()
        assert ids[0] == tokenizer.bos_id and not {0, 1, 2, 3} & set(ids[1:]), workers
        assert tokenizer.decode(ids[1:], skip_special_tokens=True) == text
        assert tokenizer.hf.token_to_id("<tool_call>") in ids
        assert meta["tokenizer"]["fingerprint"] == tokenizer.fingerprint()
    assert tokenizer.encode("<|bos|>") == [0]  # the tokenizer itself still reads them (chat template)


def test_dropped_documents_are_counted(run_dir: Path, metas: dict[str, dict]) -> None:
    """Documents a weight emits 0 times were missing from meta.json: with weights, docs_read and
    docs_emitted (copies) could not be reconciled. Now read = kept + dropped, per source and in all."""
    docs = documents(run_dir, "train")
    sources = metas["train"]["sources"]
    for name, entry in sources.items():
        mine = [doc for doc in docs if doc.source == name]
        dropped = sum(copies(doc.id, doc.weight) == 0 for doc in mine)
        assert entry["docs_dropped"] == dropped and entry["docs_read"] == len(mine)
    assert metas["train"]["n_docs_dropped"] == sum(e["docs_dropped"] for e in sources.values()) > 0
    assert metas["val"]["n_docs_dropped"] == 0
