"""Sources read from small files written here: per-document licence and date columns in every tabular
format, registry option values checked at load time, repeated source names, user evaluation sets."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datatrove.data import Document

from fidellm.chat.data import select_chat_sources
from fidellm.data.readers import Rejection
from fidellm.data.registry import load_registry, select_sources
from fidellm.data.sources import iter_documents
from fidellm.errors import FidelError

ROWS = {
    "id": ["p1", "p2", "p3"],
    "text": ["ሰላም አንድ", "ሰላም ሁለት", "ሰላም ሦስት"],
    "lic": ["CC-BY", "CC-BY-NC", "CC-BY"],
    "date": ["2021-01-01", "2022-02-02", None],
    "unused": [1, 2, 3],
}


def registry_file(tmp_path: Path, entries: str) -> Path:
    """A user registry holding `entries` (YAML list items), beside the test's data files."""
    path = tmp_path / "mine.yaml"
    path.write_text("sources:\n" + entries, encoding="utf-8")
    return path


def licensed_entry(name: str, path: str, fmt: str) -> str:
    return (
        f"  - {{name: {name}, section: pretrain, paths: [{path}], format: {fmt}, id_field: id,"
        " date_field: date, license: mixed, license_family: unknown, license_field: lic,"
        " license_values: {CC-BY: CC BY 4.0, CC-BY-NC: CC BY-NC 4.0}}\n"
    )


def test_parquet_reads_the_licence_and_date_columns_like_jsonl(tmp_path):
    pq.write_table(pa.table(ROWS), tmp_path / "rows.parquet")
    entries = licensed_entry("pq", "rows.parquet", "parquet")
    registry = load_registry(registry_file(tmp_path, entries))
    docs = list(iter_documents(registry["pq"], tmp_path))
    assert [(d.metadata["license"], d.metadata["license_family"], d.metadata["date"]) for d in docs] == [
        ("CC BY 4.0", "open", "2021-01-01"),
        ("CC BY-NC 4.0", "noncommercial", "2022-02-02"),
        ("CC BY 4.0", "open", None),
    ]
    (spec,) = select_sources(registry, names=["pq"], licence_families=["open"])
    items = list(iter_documents(spec, tmp_path))
    assert [d.metadata["orig_id"] for d in items if isinstance(d, Document)] == ["p1", "p3"]
    assert [(r.line, r.reason) for r in items if isinstance(r, Rejection)] == [(2, "licence_excluded")]


def test_a_parquet_file_without_the_licence_column_falls_back_to_the_source_licence(tmp_path):
    pq.write_table(pa.table({"id": ["p1"], "text": ["ሰላም"]}), tmp_path / "bare.parquet")
    registry = load_registry(registry_file(tmp_path, licensed_entry("pq", "bare.parquet", "parquet")))
    (doc,) = iter_documents(registry["pq"], tmp_path)
    assert (doc.metadata["license"], doc.metadata["license_family"], doc.metadata["date"]) == (
        "mixed",
        "unknown",
        None,
    )


def test_a_removed_ids_file_with_a_byte_order_mark_still_removes(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"id": "a", "text": "ሰላም"}\n{"id": "b", "text": "ደህና"}\n')
    (tmp_path / "removed.tsv").write_bytes(b"\xef\xbb\xbfid\nb\n")
    entry = (
        "  - {name: rm, section: pretrain, paths: [docs.jsonl], format: jsonl, id_field: id,"
        " removed_ids: removed.tsv, license: CC0, license_family: open}\n"
    )
    items = list(iter_documents(load_registry(registry_file(tmp_path, entry))["rm"], tmp_path))
    assert [d.id for d in items if isinstance(d, Document)] == ["rm/a"]
    assert [r.reason for r in items if isinstance(r, Rejection)] == ["removed_listed"]


@pytest.mark.parametrize(
    ("fmt", "options", "message"),
    [
        ("csv", "{delimiter: '||'}", "'options.delimiter': must be one character (not a quote"),
        ("tsv", "{quoting: full}", "'options.quoting': must be minimal or none, got 'full'"),
        ("csv", "{header: 'no'}", "'options.header': must be true or false, got 'no'"),
        ("csv", "{header: false, columns: 5}", "'options.columns': must be a list of distinct column names"),
        ("tsv", "{header: false}", "'options.columns': is required with header: false"),
        ("tsv", "{columns: [a, b]}", "'options.columns': applies only with header: false"),
        ("parquet", "{batch_size: 0}", "'options.batch_size': must be an integer >= 1, got 0"),
        ("json", "{records: 5}", "'options.records': must be a dotted path such as data.items, got 5"),
        ("conll", "{column: abc}", "'options.column': must be an integer >= 0, got 'abc'"),
        ("squad", "{parts: [context, answers]}", "'options.parts': must be a list of context, question"),
        ("xml", "{record_tag: ''}", "'options.record_tag': must be an element name, got ''"),
    ],
)  # fmt: skip
def test_option_values_are_checked_when_the_registry_loads(tmp_path, fmt, options, message):
    entry = (
        f"  - {{name: opt, section: pretrain, paths: [a.{fmt}], format: {fmt}, options: {options},"
        " license: CC0, license_family: open}\n"
    )
    path = registry_file(tmp_path, entry)
    with pytest.raises(FidelError) as caught:
        load_registry(path)
    assert str(caught.value).startswith(f"{path}: source 'opt' (entry 0), field {message}")


def test_a_source_named_twice_is_read_once():
    registry = load_registry()
    chosen = select_sources(registry, names=["enh_corpus", "amqa", "enh_corpus"])
    assert [spec.name for spec in chosen] == ["enh_corpus", "amqa"]
    chat = select_chat_sources(["alpaca_seed_tasks", "alpaca_seed_tasks"], registry)
    assert [spec.name for spec in chat] == ["alpaca_seed_tasks"]
