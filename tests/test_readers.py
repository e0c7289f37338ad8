"""Format readers on small fixtures, including deliberately broken files: every problem is a Rejection with
file:line or a FidelError naming the file, never a crash or a silent loss."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest
import zstandard

from fidellm.data.compressed import iter_chunks, iter_raw_lines, logical_name
from fidellm.data.readers import RawRecord, Rejection, read_records
from fidellm.errors import FidelError

FIX = Path(__file__).parent / "fixtures" / "readers"


def always() -> bool:
    return True


def read(name: str | Path, fmt: str, **kwargs) -> list[RawRecord | Rejection]:
    path = name if isinstance(name, Path) else FIX / name
    return list(read_records(path, fmt, "fx", always, **kwargs))


def rejections(items: list) -> list[Rejection]:
    return [item for item in items if isinstance(item, Rejection)]


def records(items: list) -> list[RawRecord]:
    return [item for item in items if isinstance(item, RawRecord)]


def test_plain_zst_and_gz_give_identical_records():
    plain = read("good.jsonl", "jsonl")
    assert [r.fields for r in plain] == [r.fields for r in read("compressed/zst/good.jsonl.zst", "jsonl")]
    assert [r.fields for r in plain] == [r.fields for r in read("compressed/gz/good.jsonl.gz", "jsonl")]
    assert [r.fields["id"] for r in plain] == ["a", "b", "c"]
    assert [r.line for r in plain] == [1, 2, 3]


def test_zstd_is_streamed_in_chunks(tmp_path):
    rng = random.Random(0)
    text = "".join(rng.choice("ሀለሐመሠረሰሸቀበተቸኀነኘአከኸወዐዘዠየደጀገጠጨጰጸፀፈፐ \n") for _ in range(1 << 20))
    payload = text.encode() + b"\nlast line\n"
    path = tmp_path / "big.txt.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(payload))
    chunks = list(iter_chunks(path))
    assert len(chunks) > 1 and max(len(c) for c in chunks) < len(payload)
    assert b"".join(chunks) == payload
    assert list(iter_raw_lines(path))[-1] == b"last line"


def test_multi_frame_zstd_is_read_completely(tmp_path):
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "two.txt.zst"
    path.write_bytes(compressor.compress(b"one\n") + compressor.compress(b"two\n"))
    assert list(iter_raw_lines(path)) == [b"one", b"two"]


def test_bad_jsonl_lines_are_rejected_with_file_line_and_reason():
    items = read("bad.jsonl", "jsonl")
    rejected = {r.line: r for r in rejections(items)}
    assert rejected[2].reason == "invalid_json"
    assert rejected[3].reason == "invalid_utf8" and "column" in rejected[3].detail
    assert rejected[7].reason == "not_an_object"
    assert all(r.path.endswith("bad.jsonl") and r.source == "fx" for r in rejected.values())
    assert str(rejected[2]).startswith(f"fx: {FIX / 'bad.jsonl'}:2: invalid_json")
    # blank line 9 is not a record; missing/empty/non-string text is judged by the source layer
    assert [r.line for r in records(items)] == [1, 4, 5, 6, 8, 10, 11]


@pytest.mark.parametrize(
    "name, message",
    [
        ("broken/empty.jsonl", "broken/empty.jsonl is empty"),
        ("broken/empty.tsv.zst", "broken/empty.tsv.zst is empty"),
        ("broken/corrupt.jsonl.zst", "corrupt.jsonl.zst: corrupt zstd file"),
        ("broken/truncated.jsonl.zst", "truncated.jsonl.zst: corrupt zstd file (truncated"),
        ("broken/truncated.jsonl.gz", "truncated.jsonl.gz: corrupt gzip file"),
    ],
)
def test_empty_and_corrupt_files_raise_naming_the_file(name, message):
    fmt = "tsv" if ".tsv" in name else "jsonl"
    with pytest.raises(FidelError, match=message.replace("(", r"\(")):
        read(name, fmt)


def test_not_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "fake.jsonl.gz"
    path.write_bytes(b'{"text": "plain"}\n')
    with pytest.raises(FidelError, match=r"fake\.jsonl\.gz: corrupt gzip file"):
        read(path, "jsonl")


def test_missing_file_and_unknown_format():
    with pytest.raises(FidelError, match="does not exist"):
        read("nope.jsonl", "jsonl")
    with pytest.raises(FidelError, match="unknown format 'xlsx'; supported formats: jsonl, json, txt"):
        read("good.jsonl", "xlsx")


def test_txt_units():
    paragraphs = records(read("paragraphs.txt", "txt", unit="paragraph"))
    assert [(r.line, r.fields["text"]) for r in paragraphs] == [
        (1, "first paragraph line one\nline two"),
        (5, "second paragraph"),
        (9, "third"),
    ]
    (whole,) = records(read("paragraphs.txt", "txt", unit="file"))
    assert whole.fields["text"].startswith("first paragraph") and whole.fields["text"].endswith("third")
    lines = records(read("crlf_lines.txt", "txt", unit="line"))
    assert [r.fields["text"] for r in lines] == ["አንድ", "ሁለት", "", "ሦስት"]  # CRLF stripped
    with pytest.raises(FidelError, match="unknown txt unit"):
        read("paragraphs.txt", "txt", unit="sentence")


def test_txt_invalid_utf8_rejects_only_its_paragraph():
    items = read("bad_paragraphs.txt", "txt", unit="paragraph")
    (rejected,) = rejections(items)
    assert (rejected.line, rejected.reason) == (3, "invalid_utf8")
    assert [r.fields["text"] for r in records(items)] == ["good one", "last"]
    (whole,) = read("bad_paragraphs.txt", "txt", unit="file")
    assert isinstance(whole, Rejection) and whole.line == 3


def test_tsv_quoting_bad_rows_and_bad_utf8():
    items = read("table.tsv", "tsv", required=["text"])
    good = records(items)
    assert [r.fields["id"] for r in good] == ["1", "2", "5"]
    assert good[1].fields["text"] == 'quoted\twith tab and "quotes"'
    assert [r.line for r in good] == [2, 3, 6]
    assert {r.line: r.reason for r in rejections(items)} == {4: "bad_row", 5: "invalid_utf8"}


def test_an_unclosed_quote_in_a_tsv_rejects_its_line_only(tmp_path):
    """A tsv record is one line: an unclosed quote used to swallow the following rows into its field."""
    path = tmp_path / "q.tsv"
    path.write_text('id\ttext\nq1\t"ሰላም ነው\nq2\tሁለት\nq3\tሦስት "ጥቅስ" ነው\nq4\t"a"b\n', encoding="utf-8")
    items = read(path, "tsv", required=["text"])
    assert [(r.fields["id"], r.line) for r in records(items)] == [("q2", 3), ("q3", 4)]
    assert records(items)[1].fields["text"] == 'ሦስት "ጥቅስ" ነው'  # a quote inside a field is text
    (unclosed, garbage) = rejections(items)
    assert (unclosed.line, unclosed.reason) == (2, "bad_quoting")
    assert "does not close on its line" in unclosed.detail
    assert (garbage.line, garbage.reason) == (5, "bad_quoting") and "expected after" in garbage.detail


def test_csv_quoted_fields_may_span_lines_but_broken_quoting_is_rejected(tmp_path):
    """A quote open to the end of the file rejects its own line; the records after it are read again (they
    used to be swallowed into that one rejection: c5 and c6 lost, unseen)."""
    path = tmp_path / "q.csv"
    path.write_text('id,text\nc1,"two\nlines"\nc2,"a"b\nc3,plain\nc4,"never closed\nc5,back\n\nc6,too\n')
    items = read(path, "csv")
    assert [(r.fields["id"], r.fields["text"], r.line, r.key) for r in records(items)] == [
        ("c1", "two\nlines", 2, "0"),
        ("c3", "plain", 5, "2"),
        ("c5", "back", 7, "4"),
        ("c6", "too", 9, "5"),
    ]
    assert [(r.line, r.reason) for r in rejections(items)] == [(4, "bad_quoting"), (6, "bad_quoting")]
    assert rejections(items)[1].detail == (
        "a quoted field does not close before the end of the file (line 9); the lines after line 6 are"
        " read again as records; the record spans line 6"
    )
    assert len(items) == 6  # one item per record: the lines read again are counted once


def test_csv_quote_open_to_the_end_sharded(tmp_path):
    """Ranks of a sharded read see each record once, the lines read again after the open quote included."""
    path = tmp_path / "q.csv"
    path.write_text('id,text\na,one\nb,"open\nc,three\nd,four\ne,five\n')
    whole = read(path, "csv")
    assert [r.fields["id"] for r in records(whole)] == ["a", "c", "d", "e"]
    for world_size in (2, 3):
        shards = []
        for rank in range(world_size):
            owners = (k % world_size == rank for k in range(10**6))
            shards += read_records(path, "csv", "fx", owners.__next__)
        assert sorted(map(str, shards)) == sorted(map(str, whole))


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_blank_lines_are_no_records_in_csv_and_tsv(tmp_path, fmt):
    """As in jsonl: trailing blank lines (an editor's, a pandas export's) used to be `bad_row: 0 fields`."""
    sep = "," if fmt == "csv" else "\t"
    path = tmp_path / f"blank.{fmt}"
    path.write_text(f"\nid{sep}text\n1{sep}ሀ\n\n  \n2{sep}ለ\n\n\n", encoding="utf-8")
    items = read(path, fmt, required=["text"])
    assert [(r.line, r.key, r.fields["text"]) for r in items] == [(3, "0", "ሀ"), (6, "1", "ለ")]


def test_csv_quotes_and_huge_fields(tmp_path):
    assert [r.fields["text"] for r in records(read("table.csv", "csv"))] == ['a, b and "c"', "plain"]
    huge = "ሀ" * 300_000  # larger than the csv module's default 128 KiB field limit
    path = tmp_path / "huge.tsv"
    path.write_text(f"id\ttext\n1\t{huge}\n", encoding="utf-8")
    (record,) = read(path, "tsv", required=["text"])
    assert record.fields["text"] == huge


def test_missing_column_names_file_column_and_columns_found():
    with pytest.raises(FidelError, match=r"nocol.tsv: column 'text' not found; columns: id, body"):
        read("nocol.tsv", "tsv", required=["text"])
    with pytest.raises(FidelError, match=r"badheader.tsv:1: the header line is not UTF-8"):
        read("badheader.tsv", "tsv", required=["text"])


def test_headerless_tsv_with_named_columns():
    options = {"header": False, "columns": ["label", "text"], "quoting": "none"}
    got = records(read("headerless.tsv", "tsv", options=options, required=["text"]))
    assert [(r.fields["label"], r.fields["text"]) for r in got] == [
        ("__label__JOY", "ደስ ብሎኛል"),
        ("__label__FEAR", "ፈራሁ"),
    ]


def test_parquet_plain_and_zst_wrapped(tmp_path):
    plain = records(read("records.parquet", "parquet", required=["id", "text"]))
    assert [r.fields for r in plain] == [
        {"id": "p1", "text": "ፓርኬ አንድ"},
        {"id": "p2", "text": None},
        {"id": "p3", "text": "ሦስት"},
    ]
    wrapped = tmp_path / "records.parquet.zst"
    wrapped.write_bytes(zstandard.ZstdCompressor().compress((FIX / "records.parquet").read_bytes()))
    assert [r.fields for r in records(read(wrapped, "parquet", required=["id", "text"]))] == [
        r.fields for r in plain
    ]
    with pytest.raises(FidelError, match=r"column 'body' not found; columns: id, text, extra"):
        read("records.parquet", "parquet", required=["body"])
    with pytest.raises(FidelError, match="not a readable parquet file"):
        read("good.jsonl", "parquet", required=["text"])


def test_xml_records_fields_and_errors():
    got = records(read("records.xml", "xml", options={"record_tag": "doc"}))
    assert [r.fields["id"] for r in got] == ["x1", "x2", "x3"]
    assert got[0].fields["title"] == "ርዕስ" and got[0].fields["date"] == "2020-01-01"
    assert got[0].line == 3 and got[1].fields["body"] == ""
    items = read("bad_utf8.xml", "xml", options={"record_tag": "doc"})
    assert [(r.line, r.reason) for r in rejections(items)] == [(3, "invalid_utf8")]
    assert [r.fields["id"] for r in records(items)] == ["1", "3"]
    with pytest.raises(FidelError, match=r"malformed.xml:3: malformed XML"):
        read("malformed.xml", "xml", options={"record_tag": "doc"})
    with pytest.raises(FidelError, match="record_tag"):
        read("records.xml", "xml")


def test_an_xml_record_tag_that_matches_nothing_is_an_error_naming_the_elements(tmp_path):
    path = tmp_path / "docs.xml"
    path.write_text('<?xml version="1.0"?>\n<docs>\n<doc id="1"><text>ሰላም</text></doc>\n</docs>\n')
    with pytest.raises(FidelError) as caught:
        read(path, "xml", options={"record_tag": "document"})
    assert str(caught.value) == (
        f"{path}: no <document> element, the record_tag of source 'fx'; elements in the file: <docs>, <doc>,"
        " <text>"
    )


def test_conll_sentences():
    got = records(read("sample.conll", "conll"))
    assert [r.fields["text"] for r in got] == ["አበበ በሶ በላ ።", "ኢትዮጵያ አገር"]
    assert got[0].fields["tags"] == ["B-PER", "O", "O", "O"]
    assert [r.line for r in got] == [3, 8]


def test_squad_contexts_questions_answers_and_dict_paragraphs():
    got = records(read("squad.json", "squad"))
    assert [r.key for r in got] == ["ctx0", "q0", "a0", "ctx1", "ctx2", "q1", "a1"]
    assert got[4].fields["text"] == "ላሊበላ ታሪካዊ ከተማ ናት።"  # from the dict-valued `paragraphs`
    only = records(read("squad.json", "squad", options={"parts": ["question"]}))
    assert [r.key for r in only] == ["q0", "q1"]


def test_json_array_object_nested_and_errors():
    items = read("array.json", "json")
    assert [r.fields["text"] for r in records(items)] == ["one", "three"]
    assert [(r.line, r.reason) for r in rejections(items)] == [(4, "invalid_utf8"), (6, "not_an_object")]
    assert [r.line for r in records(items)] == [2, 5]
    assert [(r.fields["_key"], r.fields["text"]) for r in records(read("object.json", "json"))] == [
        ("k1", "first"),
        ("k2", "second"),
    ]
    nested = records(read("nested.json", "json", options={"records": "data.items"}))
    assert [r.fields["text"] for r in nested] == ["deep one", "deep two"]
    with pytest.raises(FidelError, match=r"malformed.json:4: malformed JSON"):
        read("malformed.json", "json")


def test_mine_callback_skips_other_records():
    flags = iter([True, False, True])
    got = list(read_records(FIX / "good.jsonl", "jsonl", "fx", lambda: next(flags)))
    assert [r.fields["id"] for r in got] == ["a", "c"]


def test_logical_name():
    assert logical_name(Path("a/x.jsonl.zst")) == "x.jsonl"
    assert logical_name(Path("a/x.tsv.gz")) == "x.tsv"
    assert logical_name(Path("a/x.txt")) == "x.txt"


def test_gzip_roundtrip_of_real_lines(tmp_path):
    path = tmp_path / "lines.txt.gz"
    path.write_bytes(gzip.compress("አንድ\nሁለት".encode()))
    assert [r.fields["text"] for r in records(read(path, "txt"))] == ["አንድ", "ሁለት"]


def test_escaped_lone_surrogates_are_rejected_with_file_line_and_field(tmp_path):
    """`\\ud83d` alone is valid JSON but no character (a broken emoji): the record is rejected, not passed on
    to crash hashing later; an escaped surrogate *pair* is one character and stays."""
    jsonl = tmp_path / "tweets.jsonl"
    jsonl.write_text(
        '{"id": "s1", "text": "ok \\ud83d\\ude00"}\n'
        '{"id": "s2", "text": "TEXT \\ud83d ሰላም"}\n'
        '{"id": "s3", "meta": [{"note": "\\udc80"}], "text": "fine"}\n',
        encoding="utf-8",
    )
    items = read(jsonl, "jsonl")
    assert [r.fields["text"] for r in records(items)] == ["ok 😀"]
    assert [(r.line, r.reason) for r in rejections(items)] == [(2, "invalid_utf8"), (3, "invalid_utf8")]
    assert "field 'text' holds the lone surrogate \\ud83d" in rejections(items)[0].detail
    assert "field 'meta[0].note' holds the lone surrogate \\udc80" in rejections(items)[1].detail
    array = tmp_path / "tweets.json"
    array.write_text('[{"text": "ok"},\n {"text": "TEXT \\ud83d"}]\n', encoding="utf-8")
    items = read(array, "json")
    assert [(r.line, r.reason) for r in rejections(items)] == [(2, "invalid_utf8")]
    squad = tmp_path / "squad.json"
    squad.write_text(
        '{"data": [{"title": "t", "paragraphs": [{"context": "ሰላም \\ud83d", "qas": []}]}]}', encoding="utf-8"
    )
    (rejected,) = read(squad, "squad")
    assert rejected.reason == "invalid_utf8" and rejected.detail.startswith("ctx0: field 'text'")


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize(
    ("name", "fmt", "content"),
    [
        ("bom.jsonl", "jsonl", b'{"id": "1", "text": "\xe1\x88\xb0"}\n'),
        ("bom.jsonl.zst", "jsonl", b'{"id": "1", "text": "\xe1\x88\xb0"}\n'),
        ("bom.csv", "csv", b"id,text\r\n1,\xe1\x88\xb0\r\n"),
        ("bom.tsv", "tsv", b"id\ttext\n1\t\xe1\x88\xb0\n"),
        ("bom.json", "json", b'[{"id": "1", "text": "\xe1\x88\xb0"}]'),
        ("bom.txt", "txt", b"\xe1\x88\xb0\n"),
    ],
)
def test_a_byte_order_mark_at_the_start_of_a_file_is_skipped(tmp_path, name, fmt, content):
    path = tmp_path / name
    data = BOM + content
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if name.endswith(".zst") else data)
    tabular = fmt in ("csv", "tsv")
    (record,) = read(path, fmt, required=["id", "text"] if tabular else None)
    assert isinstance(record, RawRecord), record
    assert record.fields["text"] == "ሰ" and record.line == (2 if tabular else 1)
    assert record.fields.get("id", "1") == "1"  # the first csv column is 'id', not '\ufeffid'
