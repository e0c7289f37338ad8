"""Byte tokenizer (256 ids: the UTF-8 bytes of the text) for byte-level models such as the H-Net.

Control ids follow H-Net: BOS = 254 (0xFE) and EOS = 255 (0xFF), also used as pad. Both byte values
never occur in valid UTF-8, and `encode` only ever emits valid UTF-8, so a control id can never be
mistaken for text. `decode` drops them and replaces an incomplete UTF-8 sequence (a generation cut
mid-character: every Ethiopic letter is 3 bytes) with U+FFFD instead of failing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fidellm.errors import FidelError
from fidellm.jsonfile import read_json_object
from fidellm.tokenizer.base import META_FILE, RETRAIN, TextTokenizer, id_list, sha256_text
from fidellm.tokenizer.special import BYTE_BOS_ID, BYTE_EOS_ID

_CONTROL = bytes(range(BYTE_BOS_ID, 256))


class ByteTokenizer(TextTokenizer):
    """Ids are the UTF-8 bytes of the text; 254 and 255 are BOS and EOS/pad."""

    kind = "bytes"

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        data = text.encode("utf-8")
        return [BYTE_BOS_ID, *data] if add_bos else list(data)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; 254/255 are never text, so they are dropped whatever `skip_special_tokens` says."""
        try:
            data = bytes(id_list(ids))
        except (ValueError, TypeError) as error:
            raise FidelError(f"byte tokenizer ids must be integers in 0..255: {error}") from error
        return data.translate(None, _CONTROL).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """The byte itself; b"" for 254/255, which `decode` always drops."""
        if not 0 <= token_id < 256:
            raise FidelError(f"byte tokenizer id {token_id} is outside 0..255")
        return b"" if token_id >= BYTE_BOS_ID else bytes((token_id,))

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def bos_id(self) -> int:
        return BYTE_BOS_ID

    @property
    def eos_id(self) -> int:
        return BYTE_EOS_ID

    @property
    def pad_id(self) -> int:
        return BYTE_EOS_ID

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "encoding": "utf-8",
        }

    def fingerprint(self) -> str:
        return sha256_text(json.dumps(self.meta, sort_keys=True))

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ByteTokenizer:
        """Read a saved byte tokenizer, checking its ids are the ones this code uses."""
        path = Path(directory) / META_FILE
        meta = read_json_object(path, RETRAIN)
        tokenizer = cls()
        for key in ("vocab_size", "bos_id", "eos_id", "pad_id"):
            if meta.get(key) != tokenizer.meta[key]:
                raise FidelError(
                    f"{path}: field '{key}' is {meta.get(key)!r}, expected {tokenizer.meta[key]!r}"
                )
        return tokenizer
