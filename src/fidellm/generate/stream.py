"""UTF-8-safe incremental detokenization and stop strings that hold across chunk boundaries.

One Ethiopic letter is 3 UTF-8 bytes, and a byte-level BPE token or a byte model's id can end in the
middle of one. Streams here never emit half a character:
- `ByteDetokenizer` feeds the bytes to Python's incremental UTF-8 decoder, which keeps an incomplete
  trailing sequence until it completes (or the stream ends).
- `TextDetokenizer` (any `TextTokenizer`) decodes the ids since the last clean boundary and emits only
  the new text, holding it back while it ends in U+FFFD (an incomplete sequence decodes to that).
- `StopStringFilter` finds stop strings across chunks and holds back any suffix that could still
  become one, so a stop string is never emitted, not even in part.
In every case the joined chunks equal the tokenizer's `decode` of all ids (cut at the stop string),
except that a stream cut by the length limit (`finish(drop_incomplete=True)`) leaves out a last
character it holds only part of, as vLLM's detokenizer does, instead of ending in U+FFFD: the limit
cut it, the model did not write it broken. Where the model itself stopped mid-character (EOS), the
U+FFFD stays: that is what it wrote.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from fidellm.errors import FidelError
from fidellm.tokenizer.base import TextTokenizer
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.tokenizer.special import BYTE_BOS_ID

REPLACEMENT = "\ufffd"


class ByteDetokenizer:
    """Byte ids -> text through an incremental UTF-8 decoder; ids 254/255 (BOS/EOS) are not text."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this id ('' while a character is still incomplete)."""
        if not 0 <= token_id < 256:
            raise FidelError(f"byte tokenizer id {token_id} is outside 0..255")
        if token_id >= BYTE_BOS_ID:
            return ""
        return self._decoder.decode(bytes((token_id,)))

    def flush(self, drop_incomplete: bool = False) -> str:
        """What is left at the end: an incomplete trailing sequence becomes U+FFFD, as in `decode`, or
        nothing when `drop_incomplete`. (The decoder holds back only a valid start of a sequence:
        invalid bytes already came out as U+FFFD.)"""
        if drop_incomplete:
            self._decoder.reset()
            return ""
        return self._decoder.decode(b"", final=True)


class TextDetokenizer:
    """Incremental `tokenizer.decode`: re-decodes the ids since the last clean boundary at each step."""

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded each step (one clean boundary back, for context)
        self._read = 0  # ids before this are emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Text completed by this id; nothing while the decoded window ends in U+FFFD."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self, drop_incomplete: bool = False) -> str:
        """The held-back rest: a truly incomplete ending comes out as U+FFFD, as `decode` gives it, or
        is left out when `drop_incomplete`."""
        tail = self._incomplete_tail() if drop_incomplete else ""
        text = self._advance(final=True)
        return text[: len(text) - len(tail)] if tail and text.endswith(tail) else text

    def _incomplete_tail(self) -> str:
        """What `decode` makes of the bytes that end the ids not yet emitted inside a UTF-8 sequence (the
        emitted ones end at a character boundary): one U+FFFD, or two for a start the decoder holds but
        no character can complete (b"\xed\xa0", a surrogate's start); "" when they end cleanly."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in self._ids[self._read :]:
            decoder.decode(self.tokenizer.token_bytes(token, self.skip_special_tokens))
        return decoder.getstate()[0].decode("utf-8", errors="replace")

    def _advance(self, final: bool) -> str:
        emitted = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if not window.startswith(emitted):
            if final:
                raise FidelError("the tokenizer's decode is not prefix-stable: cannot stream its text")
            return ""
        if len(window) <= len(emitted) or (window.endswith(REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(emitted) :]


def make_detokenizer(
    tokenizer: TextTokenizer, skip_special_tokens: bool = True
) -> ByteDetokenizer | TextDetokenizer:
    """The byte-level decoder for the byte tokenizer, the re-decoding one for every other tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return ByteDetokenizer()
    return TextDetokenizer(tokenizer, skip_special_tokens)


class StopStringFilter:
    """Passes text through until a stop string appears; never emits a stop string or its start.

    The stop string that completes first wins (on the same end, the one starting earlier), as a
    generator sees it: generation ends there. The text is cut where that occurrence starts; `matched`
    is that stop string.
    """

    def __init__(self, stop_strings: Sequence[str]):
        if any(not stop for stop in stop_strings):
            raise FidelError("stop strings must be non-empty")
        self.stop_strings = tuple(stop_strings)
        self.matched: str | None = None
        self._pending = ""

    def feed(self, text: str) -> str:
        """The part of `pending + text` that can no longer belong to a stop string."""
        if self.matched is not None:
            return ""
        text = self._pending + text
        hits = [
            (index + len(stop), index, stop) for stop in self.stop_strings if (index := text.find(stop)) >= 0
        ]
        if hits:
            _, index, self.matched = min(hits)
            self._pending = ""
            return text[:index]
        hold = max((self._partial_suffix(text, stop) for stop in self.stop_strings), default=0)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The held-back suffix at the end of generation (it never completed a stop string)."""
        text, self._pending = self._pending, ""
        return "" if self.matched is not None else text

    @staticmethod
    def _partial_suffix(text: str, stop: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                return size
        return 0


class TokenStream:
    """Token ids in, safe text chunks out: the detokenizer followed by the stop-string filter."""

    def __init__(
        self, tokenizer: TextTokenizer, stop_strings: Sequence[str] = (), skip_special_tokens: bool = True
    ):
        self.detokenizer = make_detokenizer(tokenizer, skip_special_tokens)
        self.stops = StopStringFilter(stop_strings)
        self.text = ""

    @property
    def stopped(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self.stops.matched

    def push(self, token_id: int) -> str:
        """New text this id makes safe to show (often '')."""
        return self._emit(self.stops.feed(self.detokenizer.push(token_id)))

    def finish(self, drop_incomplete: bool = False) -> str:
        """Everything still held back, at the end of generation; with `drop_incomplete` (the length
        limit cut the text) without a last character that is only partly there."""
        tail = self.stops.feed(self.detokenizer.flush(drop_incomplete))
        return self._emit(tail + self.stops.flush())

    def _emit(self, chunk: str) -> str:
        self.text += chunk
        return chunk
