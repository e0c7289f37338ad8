"""The reserved tokens: the single home of their strings, ids and flags.

BPE vocabularies start with these eight tokens, in this order, so ids 0-7 are the same in every
tokenizer the project trains. The first four are control tokens (special: true; servers hide them);
the four tool tags are ordinary added tokens (special: false) so servers keep them in the text that
tool-call parsers read. The byte tokenizer has no room for strings: it reserves the two byte values
that never occur in valid UTF-8 instead (see BYTE_BOS_ID).
"""

from __future__ import annotations

from dataclasses import dataclass

BOS = "<|bos|>"
"""Document separator and BOS; also the EOS of plain (non-chat) documents."""
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"


@dataclass(frozen=True)
class ReservedToken:
    """One reserved vocabulary entry: its text, its fixed id and whether it is a control token."""

    content: str
    id: int
    special: bool


RESERVED_TOKENS: tuple[ReservedToken, ...] = tuple(
    ReservedToken(content, index, special)
    for index, (content, special) in enumerate(
        [
            (BOS, True),
            (PAD, True),
            (IM_START, True),
            (IM_END, True),
            (TOOL_CALL_START, False),
            (TOOL_CALL_END, False),
            (TOOL_RESPONSE_START, False),
            (TOOL_RESPONSE_END, False),
        ]
    )
)
"""All reserved tokens in id order (ids 0..7 of every BPE vocabulary)."""

SPECIAL_TOKENS: tuple[str, ...] = tuple(token.content for token in RESERVED_TOKENS if token.special)
TOOL_TOKENS: tuple[str, ...] = tuple(token.content for token in RESERVED_TOKENS if not token.special)
CHAT_TOKENS: tuple[str, ...] = (IM_START, IM_END)
"""Control tokens besides BOS and pad: HF's "additional_special_tokens"."""

BOS_ID = 0
PAD_ID = 1
IM_START_ID = 2
IM_END_ID = 3

BYTE_BOS_ID = 254
"""Byte tokenizer BOS, as in H-Net: 0xFE never occurs in valid UTF-8, so it cannot collide with text."""
BYTE_EOS_ID = 255
"""Byte tokenizer EOS (and pad): 0xFF never occurs in valid UTF-8 either."""
