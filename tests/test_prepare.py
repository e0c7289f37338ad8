"""`fidellm data prepare` end to end on a small slice of real data with planted problems."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from click.testing import CliRunner

from fidellm.cli import cli, main
from fidellm.data.boilerplate import one_copy
from fidellm.data.config import PrepareConfig, SplitConfig, load_prepare_config
from fidellm.data.pipeline import prepare
from fidellm.data.splits import SPLITS, fill_splits, split_of
from fidellm.errors import FidelError
from fidellm.hashing import unit_interval
from fidellm.paths import resolve_data_dir

DATA = resolve_data_dir()


def _real_articles(n: int) -> list[dict]:
    """The first n ENH articles (real text, real boilerplate)."""
    out = []
    path = DATA / "enh_corpus" / "enh_articles.jsonl.zst"
    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        for line in io.TextIOWrapper(reader, encoding="utf-8"):
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def _flores_line(i: int) -> str:
    return (DATA / "flores200" / "amh_Ethi.devtest").read_text(encoding="utf-8").splitlines()[i].strip()


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> dict:
    """A user source with planted duplicates, contamination, foreign text and bad records."""
    root = tmp_path_factory.mktemp("mini")
    articles = _real_articles(62)
    records = [{"id": a["id"], "text": a["text"], "date": "1997"} for a in articles[:60]]
    base = articles[1]["text"]
    records.append({"id": "planted/exact", "text": base})  # exact copy of a real article
    near = base.split("\n")
    near[-1] = near[-1] + " ተጨማሪ ቃል"
    records.append({"id": "planted/near", "text": "\n".join(near).replace("ሀ", "ሐ")})
    flores = _flores_line(5)
    records.append({"id": "planted/flores", "text": articles[60]["text"] + "\n" + flores})
    records.append(
        {"id": "planted/english", "text": "This is an English paragraph about the weather today. " * 5}
    )
    records.append({"id": "planted/short", "text": "ሰላም"})
    records.append({"id": "planted/twice", "text": articles[61]["text"] + "\n\n" + articles[61]["text"]})
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    lines.insert(10, b'{"id": "broken", "text": "unterminated')  # malformed JSON
    lines.insert(20, b'{"id": "latin1", "text": "caf' + b"\xe9" + b'"}')  # invalid UTF-8
    (root / "mini.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "registry.yaml").write_text(
        "sources:\n"
        "  - name: mini\n"
        "    section: pretrain\n"
        f"    paths: [{root / 'mini.jsonl'}]\n"
        "    format: jsonl\n"
        "    id_field: id\n"
        "    date_field: date\n"
        "    license: CC0 1.0\n"
        "    license_family: open\n",
        encoding="utf-8",
    )
    config = PrepareConfig()
    config.sources.include = ["mini"]
    config.sources.extra_registry = str(root / "registry.yaml")
    config.boilerplate.min_docs = 5
    config.tasks = config.workers = 1
    run = root / "run"
    report = prepare(run, DATA, config.validate())
    return {
        "run": run,
        "report": report,
        "flores": flores,
        "n_records": len(lines),
        "copied": articles[1]["id"],
        "twice": articles[61]["text"],
    }


def _kept(run: Path) -> dict[str, dict]:
    docs = {}
    for path in sorted((run / "data" / "splits").rglob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                doc = json.loads(line)
                docs[doc["metadata"]["orig_id"]] = doc
    return docs


def test_counts_add_up(mini):
    info = mini["report"]["sources"]["mini"]
    assert info["records_read"] == mini["n_records"]
    assert info["records_read"] == info["kept"]["docs"] + info["dropped"] + info["rejected"]
    assert info["balanced"]
    assert info["rejected"] == 2
    reasons = {r["reason"] for r in mini["report"]["rejected_examples"]}
    assert len(reasons) == 2
    lines = sorted(r["line"] for r in mini["report"]["rejected_examples"])
    assert lines == [11, 21]


def test_planted_problems_caught(mini):
    kept = _kept(mini["run"])
    reasons = mini["report"]["sources"]["mini"]["dropped_by_reason"]
    # exactly one of the two identical documents survives (the smaller id), whichever order they came in
    assert ("planted/exact" in kept) != (mini["copied"] in kept) and reasons.get("exact_duplicate") == 1
    assert reasons.get("near_duplicate", 0) >= 1
    assert sum(doc_id in kept for doc_id in (mini["copied"], "planted/exact", "planted/near")) == 1
    assert "planted/english" not in kept
    assert "planted/short" not in kept
    assert "planted/flores" in kept  # the document stays, its FLORES line goes
    assert mini["flores"] not in kept["planted/flores"]["text"]
    assert all(mini["flores"] not in doc["text"] for doc in kept.values())
    assert mini["report"]["decontamination"]["flores200"]["lines"] >= 1
    twice = kept["planted/twice"]  # an article stored twice over is kept once
    assert (
        twice["metadata"]["copy_lines_removed"] >= 1 and mini["report"]["boilerplate"]["collapsed_docs"] == 1
    )
    assert one_copy(twice["text"])[1] == 0 and len(twice["text"]) <= len(mini["twice"])


def test_boilerplate_removed_and_metadata_kept(mini):
    kept = _kept(mini["run"])
    assert mini["report"]["boilerplate"]["boilerplate_lines"] > 0
    doc = next(iter(kept.values()))
    meta = doc["metadata"]
    assert meta["source"] == "mini" and meta["license_family"] == "open" and meta["date"] == "1997"
    assert doc["id"] == f"mini/{meta['orig_id']}"


def test_report_files_written(mini):
    data = mini["run"] / "data"
    assert (data / "report.png").stat().st_size > 10_000
    text = (data / "report.md").read_text(encoding="utf-8")
    assert "| mini |" in text and "exact" in text.lower()
    report = json.loads((data / "report.json").read_text())
    kept = _kept(mini["run"]).values()
    assert report["totals"]["kept_docs"] == len(kept)
    moved = Counter(doc["metadata"]["split"] for doc in kept if doc["metadata"].get("split_filled"))
    assert sum(moved.values()) >= 1  # ~60 documents at 1% each: val or test comes from the fill rule
    assert report["sources"]["mini"]["filled_by_split"] == dict(moved)
    section = text.split("## Splits")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| mini |"))
    expected = ", ".join(f"{moved[split]} to {split}" for split in SPLITS if moved[split])
    assert row.endswith(f"| {expected} |"), row


def test_split_is_stable_and_proportional():
    config = SplitConfig(val_fraction=0.1, test_fraction=0.1, seed="s")
    splits = [split_of(f"doc/{i}", config) for i in range(5000)]
    assert splits == [split_of(f"doc/{i}", config) for i in range(5000)]
    assert 400 < splits.count("val") < 600 and 400 < splits.count("test") < 600
    assert split_of("doc/1", SplitConfig(seed="other")) in {"train", "val", "test"}


def test_cli_prepare_and_errors(mini, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "prepare", "--help"])
    assert result.exit_code == 0 and "--data-dir" in result.output
    existing = mini["run"]
    with pytest.raises(FidelError, match="already exists"):
        prepare(existing, DATA, PrepareConfig())
    bad = tmp_path / "bad.yaml"
    bad.write_text("filters:\n  min_qualty: 3\n")
    with pytest.raises(FidelError, match="min_qualty"):
        load_prepare_config(bad)
    with pytest.raises(SystemExit) as stop:
        main(["data", "prepare", str(tmp_path / "r"), "--config", str(bad)])
    assert stop.value.code == 2


def _text(doc_id: str, length: int = 16) -> str:
    """A document text of `length` characters that names its id."""
    return f"ጽሑፍ {doc_id} ".ljust(length, "ሀ")


def _write_split_files(
    splits: Path, docs: dict[str, list[str]], per_file: int, texts: dict[str, str] | None = None
) -> None:
    """Split files as the writer leaves them: `per_file` records per rank file; a document's source is the
    part of its id before the slash; texts default to `_text(id)` (equal lengths)."""
    texts = texts or {}
    for split, ids in docs.items():
        for start in range(0, len(ids), per_file):
            path = splits / split / f"{start // per_file:05d}.jsonl.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt", encoding="utf-8") as handle:
                for doc_id in ids[start : start + per_file]:
                    metadata = {"split": split, "source": doc_id.split("/")[0]}
                    record = {"text": texts.get(doc_id) or _text(doc_id), "id": doc_id, "metadata": metadata}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _read_splits(splits: Path) -> dict[str, dict[str, dict]]:
    return {
        split: {
            record["id"]: record
            for path in sorted((splits / split).glob("*.jsonl.gz"))
            for record in map(json.loads, gzip.open(path, "rt", encoding="utf-8"))
        }
        for split in ("train", "val", "test")
    }


def test_a_small_corpus_gets_one_document_in_val_and_test(tmp_path):
    config = SplitConfig()
    ids = [f"doc/{i}" for i in range(20)]
    assert {split_of(doc_id, config) for doc_id in ids} == {"train"}
    by_hash = sorted(ids, key=lambda doc_id: unit_interval(f"{config.seed}:{doc_id}"))
    for per_file in (20, 7):  # one writer task, or three: the same documents move
        splits = tmp_path / str(per_file) / "splits"
        _write_split_files(splits, {"train": ids}, per_file)
        assert fill_splits(splits, config) == []
        found = _read_splits(splits)
        assert list(found["test"]) == [by_hash[0]] and list(found["val"]) == [by_hash[1]]
        assert sorted(found["train"]) == sorted(by_hash[2:])
        assert found["val"][by_hash[1]]["metadata"] == {"source": "doc", "split": "val", "split_filled": True}
        assert found["test"][by_hash[0]]["text"] == _text(by_hash[0])
    two = tmp_path / "two" / "splits"
    _write_split_files(two, {"train": ids[:2]}, 20)
    assert fill_splits(two, config) == ["val", "test"]
    assert len(_read_splits(two)["train"]) == 2  # too few documents: nothing moves


def test_a_larger_corpus_is_split_exactly_by_the_hash(tmp_path):
    config = SplitConfig()
    ids = [f"source/{i}" for i in range(3000)]
    docs = {split: [doc_id for doc_id in ids if split_of(doc_id, config) == split] for split in SPLITS}
    assert all(docs.values())
    splits = tmp_path / "splits"
    _write_split_files(splits, docs, 500)
    before = {path: path.read_bytes() for path in splits.rglob("*.gz")}
    assert fill_splits(splits, config) == []
    assert {path: path.read_bytes() for path in splits.rglob("*.gz")} == before
    found = _read_splits(splits)
    assert {doc_id: split for split in SPLITS for doc_id in found[split]} == {
        doc_id: split_of(doc_id, config) for doc_id in ids
    }


def test_every_source_with_enough_documents_gets_every_split(tmp_path):
    config = SplitConfig()
    assert config.min_source_docs == 10
    big = [f"big/{i}" for i in range(3000)]
    # 40 "book" documents and 5 "note" documents that the hash all puts in train
    in_train = [doc_id for doc_id in (f"book/{i}" for i in range(99)) if split_of(doc_id, config) == "train"]
    books, notes = in_train[:40], [f"note/{i}" for i in range(5)]
    assert {split_of(doc_id, config) for doc_id in notes} == {"train"}
    by_hash = sorted(books, key=lambda doc_id: unit_interval(f"{config.seed}:{doc_id}"))
    texts = {doc_id: _text(doc_id, 20) for doc_id in books}
    texts[by_hash[0]], texts[by_hash[1]] = _text(by_hash[0], 1000), "ጽሑፍ"  # lowest hashes, atypical lengths
    docs = {split: [doc_id for doc_id in big if split_of(doc_id, config) == split] for split in SPLITS}
    docs["train"] += books + notes
    for min_source_docs, moved in ((10, {by_hash[2]: "test", by_hash[3]: "val"}), (0, {})):
        splits = tmp_path / str(min_source_docs) / "splits"
        _write_split_files(splits, docs, 700, texts)
        config = SplitConfig(min_source_docs=min_source_docs)
        assert fill_splits(splits, config) == []
        found = _read_splits(splits)
        # the longest and the shortest book have the lowest hashes but are not taken; the sources that had
        # every split, or fewer than min_source_docs documents, keep the placement of the hash
        assert {doc_id: split for split in SPLITS for doc_id in found[split]} == {
            **{doc_id: split_of(doc_id, config) for doc_id in big + books + notes},
            **moved,
        }
        for doc_id, split in moved.items():
            metadata = {"source": "book", "split": split, "split_filled": True}
            assert found[split][doc_id]["metadata"] == metadata
            assert found[split][doc_id]["text"] == texts[doc_id]
    with pytest.raises(FidelError, match="min_source_docs must be 0"):
        PrepareConfig(split=SplitConfig(min_source_docs=2)).validate()


def test_prepare_fills_val_of_a_small_corpus_and_refuses_too_few_documents(mini, tmp_path):
    by_split = mini["report"]["sources"]["mini"]["kept_by_split"]
    assert all(by_split[split]["docs"] >= 1 for split in SPLITS), by_split
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        (mini["run"].parent / "registry.yaml").read_text().replace("mini.jsonl", "two.jsonl"),
        encoding="utf-8",
    )
    two = [{"id": a["id"], "text": a["text"]} for a in _real_articles(2)]
    (mini["run"].parent / "two.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in two), encoding="utf-8"
    )
    config = PrepareConfig()
    config.sources.include = ["mini"]
    config.sources.extra_registry = str(registry)
    config.tasks = config.workers = 1
    run = tmp_path / "run"
    with pytest.raises(FidelError) as caught:
        prepare(run, DATA, config.validate())
    partial = run / "data.partial"  # a failed run is not put in place of RUN/data; it stays to be read
    assert str(caught.value) == (
        f"{partial / 'splits'}: only 2 document(s) kept, fewer than the 3 splits (train, val, test)"
        f" that need one each, so val, test stayed empty; {partial / 'report.md'} shows what was dropped"
    )
    assert (partial / "report.md").is_file() and not (run / "data").exists()


def test_no_surviving_document_is_one_error_with_the_counts_per_source(tmp_path):
    """Blank lines only, or every record rejected: the stages after filtering would fail on an empty
    folder, naming no source; the error gives each source's counts and the report instead."""
    (tmp_path / "blank.jsonl").write_text("\n\n\n", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n{"id": "b", "text": "ሰላም"\n', encoding="utf-8")
    entry = (
        "  - {{name: {0}, section: pretrain, paths: [{0}.jsonl], format: jsonl, license: CC0,"
        " license_family: open}}\n"
    )
    (tmp_path / "registry.yaml").write_text("sources:\n" + entry.format("blank") + entry.format("bad"))
    config = PrepareConfig()
    config.sources.include = ["blank", "bad"]
    config.sources.extra_registry = str(tmp_path / "registry.yaml")
    config.decontam.enabled = False
    config.tasks = config.workers = 1
    run = tmp_path / "run"
    with pytest.raises(FidelError) as caught:
        prepare(run, tmp_path, config.validate())
    partial = run / "data.partial"
    assert str(caught.value) == (
        "no document survived reading and filtering (blank: read 0, rejected 0, dropped 0; bad: read 2,"
        " rejected 2 (missing_field 1, invalid_json 1), dropped 0); see"
        f" {partial / 'report.md'} (rejected/ and dropped/ beside it list every record)"
    )
    assert (partial / "report.md").is_file()
