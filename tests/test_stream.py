"""Streaming detokenization: whole characters only, joined chunks = full decode, stop strings held back."""

from __future__ import annotations

import codecs

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fidellm.generate.stream import ByteDetokenizer, StopStringFilter, TextDetokenizer, TokenStream
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.bpe import BPETokenizer, train_bpe
from fidellm.tokenizer.bytes import ByteTokenizer

BYTES = ByteTokenizer()


@pytest.fixture(scope="module")
def flores() -> list[str]:
    return (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def bpe(flores: list[str]) -> BPETokenizer:
    """A small BPE trained on FLORES dev: many Ethiopic letters stay split across byte-level tokens."""
    return train_bpe(flores, vocab_size=512, show_progress=False)


def stream_all(stream: TokenStream, ids: list[int]) -> list[str]:
    chunks = [stream.push(i) for i in ids]
    return [*chunks, stream.finish()]


def is_valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_byte_stream_equals_decode_and_never_splits_characters(data: bytes) -> None:
    ids = list(data)  # every byte is one id: the stream is cut at every position
    chunks = stream_all(TokenStream(BYTES), ids)
    assert "".join(chunks) == BYTES.decode(ids)
    if is_valid_utf8(data.translate(None, bytes((254, 255)))):
        assert all("\ufffd" not in chunk for chunk in chunks)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_valid_text_byte_by_byte_gives_whole_characters(text: str) -> None:
    data = text.encode("utf-8", errors="surrogatepass")
    if not is_valid_utf8(data):
        return
    detok = ByteDetokenizer()
    chunks = [detok.push(b) for b in data] + [detok.flush()]
    assert "".join(chunks) == text
    assert all(chunk.encode("utf-8").decode("utf-8") == chunk and "\ufffd" not in chunk for chunk in chunks)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_text_detokenizer_on_bytes_matches_byte_decoder(data: bytes) -> None:
    """The generic re-decoding path, run on the byte tokenizer, agrees with the byte path."""
    ids = list(data)
    detok = TextDetokenizer(BYTES)
    chunks = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(chunks) == BYTES.decode(ids)
    if is_valid_utf8(data.translate(None, bytes((254, 255)))):
        assert all("\ufffd" not in chunk for chunk in chunks)


def test_ethiopic_bpe_stream_is_whole_characters(bpe: BPETokenizer, flores: list[str]) -> None:
    split_tokens = 0
    for line in flores[:200]:
        ids = bpe.encode(line)
        split_tokens += sum("\ufffd" in bpe.decode([i]) for i in ids)
        chunks = stream_all(TokenStream(bpe), ids)
        assert "".join(chunks) == bpe.decode(ids) == line
        assert all("\ufffd" not in chunk for chunk in chunks)
        assert all(chunk.encode("utf-8").decode("utf-8") == chunk for chunk in chunks)
    # The test is only meaningful if some tokens end (or start) mid-character; a 512-id BPE has many.
    assert split_tokens > 100, split_tokens


def test_ethiopic_byte_stream(flores: list[str]) -> None:
    for line in flores[:50]:
        ids = BYTES.encode(line, add_bos=True)
        chunks = stream_all(TokenStream(BYTES), ids)
        assert "".join(chunks) == line
        assert all("\ufffd" not in c for c in chunks) and sum(bool(c) for c in chunks) == len(line)


def test_bpe_stream_of_truncated_character_ends_in_replacement(bpe: BPETokenizer) -> None:
    """A generation that stops inside a letter: the partial letter is emitted once, at the end, as U+FFFD."""
    ids = BYTES.encode("ሰላም")[:-1]
    chunks = stream_all(TokenStream(BYTES), ids)
    assert chunks[-1] == "\ufffd" and "".join(chunks) == "ሰላ\ufffd"
    line_ids = bpe.encode("ሰላም ለኢትዮጵያ")
    assert "".join(stream_all(TokenStream(bpe), line_ids)) == "ሰላም ለኢትዮጵያ"


def complete_part(data: bytes) -> str:
    """What an incremental UTF-8 decoder emits before the end: all of `data` (invalid bytes as U+FFFD)
    except a trailing sequence that is only started."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
@example(b"\xed\xa0")  # held as incomplete by the decoder, two U+FFFD when decoded whole
@example(b"a\xf0\x9f")
def test_length_cut_drops_only_an_incomplete_last_character(data: bytes) -> None:
    """finish(drop_incomplete=True), as at a length limit: an only-started last character is left out
    instead of becoming U+FFFD; invalid bytes before it stay U+FFFD. Byte path and re-decoding path."""
    expected = complete_part(data.translate(None, bytes((254, 255))))
    stream = TokenStream(BYTES)
    assert "".join(stream_all_dropping(stream, list(data))) == expected == stream.text
    detok = TextDetokenizer(BYTES)
    assert "".join([detok.push(i) for i in data] + [detok.flush(drop_incomplete=True)]) == expected


def stream_all_dropping(stream: TokenStream, ids: list[int]) -> list[str]:
    return [*(stream.push(i) for i in ids), stream.finish(drop_incomplete=True)]


def test_length_cut_bpe_stream_ends_at_a_whole_character(bpe: BPETokenizer, flores: list[str]) -> None:
    """Every prefix of a line's BPE ids (many end inside a letter) streams, cut there, to the whole
    characters of its bytes: no U+FFFD, nothing complete lost."""
    cut_inside = 0
    for line in flores[:20]:
        ids = bpe.encode(line)
        for end in range(1, len(ids) + 1):
            data = b"".join(bpe.token_bytes(i) for i in ids[:end])
            expected = complete_part(data)
            cut_inside += len(expected.encode()) < len(data)
            assert "".join(stream_all_dropping(TokenStream(bpe), ids[:end])) == expected
    assert cut_inside > 50, cut_inside


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="ab።ሰላ", max_size=25),
    st.lists(st.text(alphabet="ab።ሰላ", min_size=1, max_size=4), min_size=1, max_size=3),
    st.lists(st.integers(min_value=0, max_value=25), max_size=6),
)
def test_stop_filter_cuts_at_first_completed_stop_across_chunks(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    stop_filter = StopStringFilter(stops)
    out = "".join(stop_filter.feed(piece) for piece in pieces) + stop_filter.flush()
    # The stop completing first wins (on the same end, the earlier start), whatever the chunking.
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if hits:
        _, index, stop = min(hits)
        assert out == text[:index] and stop_filter.matched == stop
    else:
        assert out == text and stop_filter.matched is None


def test_stop_string_never_emitted_partially(bpe: BPETokenizer) -> None:
    """The stream holds back a suffix that might become the stop string; a false start is released."""
    stop_filter = StopStringFilter(["።\n"])
    assert stop_filter.feed("ሰላም።") == "ሰላም"
    assert stop_filter.feed("x") == "።x"
    assert stop_filter.feed("ዓለም።") == "ዓለም"
    assert stop_filter.feed("\nmore") == ""
    assert stop_filter.matched == "።\n"
    stream = TokenStream(bpe, stop_strings=["ኢትዮጵያ"])
    chunks = stream_all(stream, bpe.encode("ሰላም ለኢትዮጵያ ሕዝብ"))
    assert "".join(chunks) == "ሰላም ለ" and stream.stopped == "ኢትዮጵያ"
    assert not any("ኢ" in chunk for chunk in chunks)
