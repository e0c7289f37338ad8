"""Byte tokenizer: exact round trip, H-Net control ids, tolerant decode, save/load through load_tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fidellm.errors import FidelError
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.bytes import ByteTokenizer

TOKENIZER = ByteTokenizer()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
@example("")
@example("𝕏😀 ሀ\u135d e\u0301 \x00\x7f\r\n  ")
def test_round_trip_and_control_ids_never_in_text(text: str) -> None:
    ids = TOKENIZER.encode(text)
    assert TOKENIZER.decode(ids) == text
    assert 254 not in ids and 255 not in ids  # 0xFE / 0xFF never occur in valid UTF-8
    assert TOKENIZER.encode(text, add_bos=True) == [254, *ids]
    assert len(ids) == len(text.encode("utf-8"))
    assert b"".join(TOKENIZER.token_bytes(i) for i in [254, *ids, 255]) == text.encode("utf-8")


def test_control_ids() -> None:
    assert (TOKENIZER.vocab_size, TOKENIZER.bos_id, TOKENIZER.eos_id, TOKENIZER.pad_id) == (
        256,
        254,
        255,
        255,
    )
    assert TOKENIZER.decode([254, *"ሰላም".encode(), 255, 255]) == "ሰላም"


def test_incomplete_utf8_decodes_without_error() -> None:
    ids = TOKENIZER.encode("ሰላም")
    assert len(ids) == 9  # every Ethiopic letter is 3 bytes
    assert TOKENIZER.decode(ids[:7]) == "ሰላ\ufffd"
    assert TOKENIZER.decode(ids[1:]).startswith("\ufffd")


def test_batch_equals_single() -> None:
    texts = ["ሰላም ለዓለም።", "", "abc 123"]
    assert TOKENIZER.encode_batch(texts, add_bos=True) == [TOKENIZER.encode(t, add_bos=True) for t in texts]


def test_save_and_load(tmp_path: Path) -> None:
    TOKENIZER.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, ByteTokenizer)
    assert loaded.fingerprint() == TOKENIZER.fingerprint()
    assert loaded.token_dtype.name == "uint16"


def test_bad_ids_and_bad_meta(tmp_path: Path) -> None:
    with pytest.raises(FidelError, match=r"0\.\.255"):
        TOKENIZER.decode([300])
    with pytest.raises(FidelError, match=r"0\.\.255"):
        TOKENIZER.token_bytes(300)
    (tmp_path / "fidellm_tokenizer.json").write_text('{"kind": "bytes", "vocab_size": 256, "bos_id": 1}')
    with pytest.raises(FidelError, match="bos_id"):
        load_tokenizer(tmp_path)
    (tmp_path / "fidellm_tokenizer.json").write_text('{"kind": "words"}')
    with pytest.raises(FidelError, match="kind"):
        load_tokenizer(tmp_path)
