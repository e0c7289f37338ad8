"""The interface every tokenizer offers (BPE and bytes) and `load_tokenizer`, which picks the right one.

A tokenizer directory always holds `fidellm_tokenizer.json` ({"kind": "bpe" | "bytes", ...}): the
file that says which class reads the directory and records how the tokenizer was made.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fidellm.errors import FidelError
from fidellm.jsonfile import read_json_object

META_FILE = "fidellm_tokenizer.json"
RETRAIN = "train the tokenizer again with `fidellm tokenizer train RUN`"


class TextTokenizer(ABC):
    """Text <-> token ids. `decode(encode(s)) == s` holds for every string without lone surrogates."""

    kind: str = ""

    @abstractmethod
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`, with the BOS id first when `add_bos`."""

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` over many texts (subclasses may do it faster, never differently)."""
        return [self.encode(text, add_bos=add_bos) for text in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (list or numpy array); an incomplete UTF-8 sequence becomes U+FFFD, not an error."""

    @abstractmethod
    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """The bytes one id adds to the UTF-8 of `decode` (b"" for ids it drops): possibly part of a
        character, e.g. one byte of a 3-byte Ethiopic letter. Log-probabilities report tokens by them."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (reserved tokens included)."""

    @property
    @abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> int: ...

    @property
    def meta(self) -> dict[str, Any]:
        """Provenance recorded in META_FILE (how the tokenizer was made)."""
        return {}

    @abstractmethod
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer files into `directory` (created if needed) and return it."""

    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: equal fingerprints mean equal ids for every text."""

    @property
    def token_dtype(self) -> np.dtype:
        """Smallest unsigned dtype holding every id."""
        return token_dtype_for(self.vocab_size)


def id_list(ids: Sequence[int] | np.ndarray) -> list[int]:
    """Plain Python ints from a list or a numpy array (e.g. a slice of memory-mapped token shards)."""
    return ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]


def token_dtype_for(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies up to 65,536 ids, else uint32; beyond 2**32 ids is an error."""
    if vocab_size <= 0:
        raise FidelError(f"vocabulary size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise FidelError(f"vocabulary size {vocab_size} is too large for uint32 token shards (max 2**32)")


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_meta(directory: Path) -> dict[str, Any]:
    """The META_FILE of a tokenizer directory, with clear errors for a missing or broken file."""
    if not directory.is_dir():
        raise FidelError(f"tokenizer directory {directory} does not exist")
    path = directory / META_FILE
    if not path.is_file():
        if (directory / "tokenizer.json").is_file():
            return {"kind": "bpe"}
        raise FidelError(
            f"{directory} is not a tokenizer directory: no {META_FILE} or tokenizer.json "
            "(make one with `fidellm tokenizer train RUN`)"
        )
    meta = read_json_object(path, RETRAIN)
    if meta.get("kind") not in ("bpe", "bytes"):
        raise FidelError(f'{path}: field \'kind\' must be "bpe" or "bytes"')
    return meta


def load_tokenizer(directory: str | os.PathLike) -> TextTokenizer:
    """Load the tokenizer saved in `directory`, BPE or bytes, as its META_FILE says."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta["kind"] == "bytes":
        from fidellm.tokenizer.bytes import ByteTokenizer

        return ByteTokenizer.load(directory)
    from fidellm.tokenizer.bpe import BPETokenizer

    return BPETokenizer.load(directory)


def load_document_tokenizer(directory: str | os.PathLike) -> TextTokenizer:
    """`load_tokenizer` for documents, encoding them as the text they are: a control token's string in a
    document (`<|bos|>`, `<|im_end|>`) becomes its characters' ids, never the control id (a BOS inside a
    document would split it in two for document masking; `<|im_end|>` would teach chat ends from raw
    text). Token shards and held-out scoring use it; chat rendering must not (its control tokens are
    the template's). The byte tokenizer encodes every text as bytes already."""
    tokenizer = load_tokenizer(directory)
    from fidellm.tokenizer.bpe import BPETokenizer

    if isinstance(tokenizer, BPETokenizer):
        tokenizer.hf.encode_special_tokens = True  # not saved: the fingerprint stays the same
    return tokenizer
