"""The Amharic normalizer: punctuation, invisible characters, whitespace, homophone and labialization folding.

`normalize()` is conservative by default: it only canonicalises the encoding (NFC, line breaks, spaces),
drops invisible characters and turns the typed full stops ``፡፡`` / ``::`` into ``።``; every letter,
digit (Arabic and Ethiopic), Latin word, URL and other punctuation mark is kept. Spelling-changing folds
(homophones, labialized spellings) are opt-in, and `fold()` / `match_key()` use them for matching and
deduplication. All tables are built from Unicode character names, so each mapping is checkable.

Decisions:

* Removed: C0/C1 control characters except ``\\n`` and ``\\t``; U+200B zero width space, U+2060 word
  joiner, U+FEFF BOM; U+00AD soft hyphen (an invisible hyphenation hint that only breaks word
  matching); the bidi controls U+200E/200F, U+202A-202E, U+2066-2069 (noise from copy-paste in
  left-to-right Amharic text). Kept: U+200C/U+200D (zero width (non-)joiner build emoji sequences).
* Line breaks: ``\\r\\n``, ``\\r``, VT, FF, U+001C-001E, NEL, U+2028, U+2029 (every boundary that
  ``str.splitlines`` knows) become ``\\n``. Other whitespace (tab, NBSP, Unicode spaces) runs become
  one space; lines are stripped on both sides. Empty lines are kept.
* ``፡፡`` and ``::`` (any two of ``፡``/``:``, optionally with one space between) become ``።``, except a
  tight ``::`` directly between two ASCII letters/digits (``std::vector``, ``fe80::1``,
  ``http://a.b/c::d``), which is kept. A single ``፡`` or ``:`` (``10:30``) is never touched.
* Homophones fold vowel order to vowel order: ሐ, ኀ → ሀ; ሠ → ሰ; ዐ → አ; ፀ → ጸ. So ሓ, ኃ → ሃ and
  ዓ → ኣ, while ሃ and ኣ stay (the 1st/4th-order merger of laryngeals, ሀ/ሃ and አ/ኣ, is not applied: it
  changes vowel orders). ፀ → ጸ because ጸ is the majority spelling in modern text (BBC, ENA, Al-Ain,
  Wikipedia, GFF eBooks; only the 1997-2009 ENH papers prefer ፀ) and only the ጸ series has a -wa letter
  (ጿ). ሗ (the ሐ series' -wa) → ኋ (the letter Amharic writes for /hʷa/; the ሀ series has none).
  Labialized velars: the -wi and -wɨ letters (ቊ ቍ, ኲ ኵ, ጒ ጕ, ...) → the -u letter (ቁ, ኩ, ጉ, ...);
  in the real corpora ቊጥር, ኲሉ, ጒዳይ are typos of ቍጥር (= ቁጥር), ኵሉ, ጕዳይ (= ጉዳይ).
* Labialization: a -u letter followed by ዋ, አ or ኣ → that consonant's -wa letter (ሉዋ → ሏ, ዱዋ → ዷ,
  ቁዋ → ቋ for velars, ሁዋ → ኋ). A 1st-order letter + ዋ (ደዋ) is never touched. ኣ is included so that
  folding gives the same key for ሉዓላዊ and ሉአላዊ; the glottal ኡ has no -wa letter (ኧ is the vowel ä).
  This over-folds some names (ፉአድ → ፏድ): use it for matching, not for display.
"""

from __future__ import annotations

import functools
import re
import string
import sys
import unicodedata

__all__ = [
    "HOMOPHONES",
    "LABIALIZED",
    "REMOVED_CHARS",
    "ethiopic_share",
    "fold",
    "is_ethiopic",
    "match_key",
    "normalize",
    "punctuation_chars",
    "script_share",
    "sentences",
    "words",
]

ETHIOPIC_RANGES: tuple[tuple[int, int], ...] = (
    (0x1200, 0x137F),
    (0x1380, 0x139F),
    (0x2D80, 0x2DDF),
    (0xAB00, 0xAB2F),
)
ETHIOPIC_PUNCTUATION = "".join(chr(c) for c in range(0x1360, 0x1369))  # ፠ ፡ ። ፣ ፤ ፥ ፦ ፧ ፨
FULL_STOP = "።"

# --- the Ethiopic syllable table, parsed from character names -------------------------------------------

_SYLLABLE_PREFIX = "ETHIOPIC SYLLABLE "
# Vowel suffixes of syllable names, longest first so that "HHWA" parses as HH + WA, not HHW + A.
_VOWELS = ("WAA", "WEE", "WA", "WI", "WE", "OA", "AA", "EE", "A", "U", "I", "E", "O")


def _parse_syllables() -> dict[tuple[str, str], str]:
    """(consonant, vowel) -> letter for every Ethiopic syllable, from names like 'ETHIOPIC SYLLABLE DWA'."""
    table: dict[tuple[str, str], str] = {}
    for low, high in ETHIOPIC_RANGES:
        for code in range(low, high + 1):
            name = unicodedata.name(chr(code), "")
            if not name.startswith(_SYLLABLE_PREFIX):
                continue
            rest = name[len(_SYLLABLE_PREFIX) :]
            for vowel in _VOWELS:
                if rest.endswith(vowel) and len(rest) > len(vowel):
                    table[(rest[: -len(vowel)], vowel)] = chr(code)
                    break
    return table


_SYL = _parse_syllables()
_VELARS = frozenset(consonant for consonant, vowel in _SYL if vowel == "WAA")  # Q QH X K KX G GG
# Homophone series: source consonant -> target consonant (names as in the Unicode character names).
_SERIES_FOLDS = (("HH", "H"), ("X", "H"), ("SZ", "S"), ("PHARYNGEAL ", "GLOTTAL "), ("TZ", "TS"))


def _resolve(table: dict[str, str]) -> dict[str, str]:
    """Follow chains (ኍ → ኁ → ሁ) so that one lookup gives the final letter and folding is idempotent."""
    resolved = {}
    for source, target in table.items():
        while target in table:
            target = table[target]
        if target != source:
            resolved[source] = target
    return resolved


def _build_homophones() -> dict[str, str]:
    table: dict[str, str] = {}
    for source, target in _SERIES_FOLDS:
        for (consonant, vowel), letter in _SYL.items():
            if consonant == source and (target, vowel) in _SYL:
                table[letter] = _SYL[(target, vowel)]
    table[_SYL[("HH", "WA")]] = _SYL[("X", "WAA")]  # ሗ → ኋ
    for consonant in _VELARS:
        for vowel in ("WI", "WE"):
            if (consonant, vowel) in _SYL and (consonant, "U") in _SYL:
                table[_SYL[(consonant, vowel)]] = _SYL[(consonant, "U")]
    return _resolve(table)


def _build_labialized() -> dict[str, str]:
    table: dict[str, str] = {}
    for (consonant, vowel), letter in _SYL.items():
        if vowel != "U" or consonant == "GLOTTAL ":
            continue
        wa = "WAA" if consonant in _VELARS else "WA"
        if (consonant, wa) in _SYL:
            table[letter] = _SYL[(consonant, wa)]
    table[_SYL[("H", "U")]] = _SYL[("X", "WAA")]  # ሁዋ → ኋ (Unicode has no ሀ-series -wa letter)
    return table


#: Homophone folding, letter -> letter (ሐ → ሀ, ሓ → ሃ, ሠ → ሰ, ዓ → ኣ, ፀ → ጸ, ቊ → ቁ, ኵ → ኩ, ...).
HOMOPHONES: dict[str, str] = _build_homophones()
#: Labialization: -u letter -> the -wa letter it forms with a following ዋ/አ/ኣ (ሉ → ሏ, ዱ → ዷ, ቁ → ቋ).
LABIALIZED: dict[str, str] = _build_labialized()
_LAB_FOLLOWERS = "ዋአኣ"


# Homophone folding runs first, so ሑ ሡ ኁ are gone before labialization and its output never needs
# folding again (ሑዋ → ሁዋ → ኋ, the same letter as ሗ → ኋ).
_LAB_RE = re.compile(f"([{''.join(sorted(LABIALIZED))}])[{_LAB_FOLLOWERS}]")

# --- character classes for normalize() ------------------------------------------------------------------

_LINE_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # with "\n": every str.splitlines() boundary
_INVISIBLE = "\u00ad\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2066\u2067\u2068\u2069\ufeff"
_CONTROLS = "".join(chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t" + _LINE_BREAKS)
#: Characters normalize() deletes (invisible format characters and control characters).
REMOVED_CHARS: frozenset[str] = frozenset(_INVISIBLE + _CONTROLS)
# All Unicode whitespace lies in the BMP below U+3001; what is not a line break or a control is a space.
_HSPACE = "".join(
    ch for ch in map(chr, range(0x3001)) if ch.isspace() and ch not in "\n" + _LINE_BREAKS + _CONTROLS
)


def _char_class(chars: str) -> str:
    return "[" + "".join(re.escape(ch) for ch in chars) + "]"


_BREAK_RE = re.compile(_char_class(_LINE_BREAKS))
_REMOVE_RE = re.compile(_char_class("".join(sorted(REMOVED_CHARS))))
_OTHER_SPACE_RE = re.compile(_char_class(_HSPACE.replace(" ", "")))
_SPACES_RE = re.compile(" {2,}")
_LINE_EDGE_RE = re.compile(" \n ?|\n ")
_PAIR_RE = re.compile("[፡:] ?[፡:]")
_ASCII_ALNUM = frozenset(string.ascii_letters + string.digits)
_HOMOPHONE_RE = re.compile(_char_class("".join(sorted(HOMOPHONES))))


def _full_stop(match: re.Match[str]) -> str:
    """``።`` for a ፡/: pair, except a tight ``::`` between two ASCII letters/digits (C++, IPv6, URLs)."""
    pair, text, start, end = match.group(), match.string, match.start(), match.end()
    if pair != "::" or start == 0 or end == len(text):
        return FULL_STOP
    return pair if text[start - 1] in _ASCII_ALNUM and text[end] in _ASCII_ALNUM else FULL_STOP


def _nfc(text: str) -> str:
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def _fold_homophones(text: str) -> str:
    # A regex over the 52 folded letters is ~6x faster than str.translate on Ethiopic text.
    return _HOMOPHONE_RE.sub(lambda match: HOMOPHONES[match.group()], text)


def _fold_labialized(text: str) -> str:
    return _LAB_RE.sub(lambda match: LABIALIZED[match.group(1)], text)


def normalize(text: str, *, fold_homophones: bool = False, fold_labialized: bool = False) -> str:
    """Canonical form of a text: NFC, invisible and control characters removed, ``\\n`` line breaks,
    single spaces, stripped lines, ``፡፡``/``::`` → ``።``; optionally homophone / labialization folding.

    Idempotent: ``normalize(normalize(t)) == normalize(t)`` for every flag combination. Only
    precompiled regexes and substring tests run on the default path (no per-character Python loop).
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize() needs a str, got {type(text).__name__}")
    text = _nfc(text)
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    text = _BREAK_RE.sub("\n", text)
    removed = _REMOVE_RE.sub("", text)
    if len(removed) != len(text):  # deleting may bring a base letter and a combining mark together
        text = _nfc(removed)
    text = _OTHER_SPACE_RE.sub(" ", text)
    if "  " in text:
        text = _SPACES_RE.sub(" ", text)
    if " \n" in text or "\n " in text:
        text = _LINE_EDGE_RE.sub("\n", text)
    text = _PAIR_RE.sub(_full_stop, text.strip(" "))
    if fold_homophones:
        text = _fold_homophones(text)
    if fold_labialized:
        text = _fold_labialized(text)
    return text


def fold(text: str) -> str:
    """Homophone then labialization folding only (no other normalization); idempotent."""
    return _fold_labialized(_fold_homophones(text))


# --- punctuation, words, sentences, keys ----------------------------------------------------------------


@functools.cache
def punctuation_chars() -> frozenset[str]:
    """Ethiopic punctuation ፠-፨, ASCII punctuation and every Unicode P* character (built once, lazily)."""
    unicode_p = (chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P"))
    return frozenset((*ETHIOPIC_PUNCTUATION, *string.punctuation, *unicode_p))


def _class_body(chars: list[str]) -> str:
    """A regex class body with consecutive code points compressed into ranges."""
    codes = sorted(map(ord, chars))
    parts, start = [], 0
    for i in range(1, len(codes) + 1):
        if i == len(codes) or codes[i] != codes[i - 1] + 1:
            low, high = chr(codes[start]), chr(codes[i - 1])
            parts.append(re.escape(low) if low == high else f"{re.escape(low)}-{re.escape(high)}")
            start = i
    return "".join(parts)


@functools.cache
def _punct_bmp() -> str:
    """Class body of the BMP punctuation: an all-BMP class compiles to a fast bitmap (about 4x faster
    than one class that also holds the 194 punctuation characters above U+FFFF)."""
    return _class_body([ch for ch in punctuation_chars() if ord(ch) <= 0xFFFF])


@functools.cache
def _astral_punct_re() -> re.Pattern[str]:
    return re.compile(f"[{_class_body([ch for ch in punctuation_chars() if ord(ch) > 0xFFFF])}]")


_ASTRAL_RE = re.compile("[\U00010000-\U0010ffff]")


def _astral_punct_to_space(text: str) -> str:
    return _astral_punct_re().sub(" ", text) if _ASTRAL_RE.search(text) else text


_ETH_LETTER = "\u1200-\u135a\u1380-\u138f\u2d80-\u2dde\uab00-\uab2e"


@functools.cache
def _punct_re() -> re.Pattern[str]:
    return re.compile(f"[{_punct_bmp()}]+")


@functools.cache
def _word_re() -> re.Pattern[str]:
    core = rf"[^\s{_punct_bmp()}]+"
    joiner = rf"(?:['’]|(?<=\d)[.,:/](?=\d)|(?<=[{_ETH_LETTER}])[./](?=[{_ETH_LETTER}]))"
    return re.compile(f"{core}(?:{joiner}{core})*")


def words(text: str) -> list[str]:
    """Word tokens: runs of characters that are neither whitespace nor punctuation (፡ splits words).

    Digits, Latin words and symbols stay. Kept inside a word, never at its edges: an apostrophe
    (' or ’) between two word characters (don't, Ge'ez); . , : / between two digits (3.5, 10,000,
    10:30, 12/05/2010); . and / between two Ethiopic letters (ዓ.ም, ት/ቤት, ዶ/ር). Note: FLORES word
    counts in the design notes are whitespace counts (``len(line.split())``), not ``len(words(line))``.
    """
    return _word_re().findall(_astral_punct_to_space(text))


_SENTENCE_RE = re.compile(r".*?[።፧!?]+[\"'»”’›)\]]*|.+")


def sentences(text: str) -> list[str]:
    """Sentences: split after runs of ። ፧ ! ? (closing quotes/brackets stay with their sentence) and at
    every line break; stripped, empty pieces dropped. Run normalize() first to turn ፡፡ / :: into ።."""
    pieces = (match.strip() for line in text.splitlines() for match in _SENTENCE_RE.findall(line))
    return [piece for piece in pieces if piece]


def match_key(text: str) -> str:
    """Key for exact dedup and contamination matching: normalize + fold + lowercase, punctuation replaced
    by spaces, whitespace collapsed and stripped. Idempotent."""
    key = normalize(text, fold_homophones=True, fold_labialized=True).lower()
    return _nfc(" ".join(_punct_re().sub(" ", _astral_punct_to_space(key)).split()))


# --- script share ---------------------------------------------------------------------------------------

_NON_ETHIOPIC_RE = re.compile(
    "[^" + "".join(f"{chr(low)}-{chr(high)}" for low, high in ETHIOPIC_RANGES) + r"\s]"
)


def is_ethiopic(ch: str) -> bool:
    """True for a character in the Ethiopic blocks (letters, punctuation, digits, tonal marks)."""
    if len(ch) != 1:
        raise ValueError(f"is_ethiopic() needs one character, got {len(ch)}: {ch[:20]!r}")
    code = ord(ch)
    return any(low <= code <= high for low, high in ETHIOPIC_RANGES)


def ethiopic_share(text: str) -> float:
    """Share of Ethiopic characters among non-whitespace characters (the MANIFEST "non-ws" fraction)."""
    visible = len("".join(text.split()))
    if visible == 0:
        return 0.0
    return (visible - len(_NON_ETHIOPIC_RE.findall(text))) / visible


_ETHIOPIC_WORD_CHAR_RE = re.compile(
    "[\u1200-\u135f\u1369-\u137c\u1380-\u138f\u2d80-\u2ddf\uab00-\uab2f]"
)  # Ethiopic letters, combining marks and numerals: not its punctuation (U+1360-1368) or tonal marks
_WORD_CHAR_RE = re.compile(r"[^\W_]")  # letters and digits of any script
_DIGIT_RE = re.compile(r"\d")  # decimal digits (Ethiopic numerals are not decimal digits)
OTHER_LETTER_WEIGHT = 0.5
"""An Ethiopic letter is a syllable: a word in Latin (or Cyrillic, Greek…) letters needs about two letters
for each one of Fidel, so each counts half in `script_share`."""


def script_share(text: str) -> float:
    """Ethiopic share of a text's letters and digits, other scripts' letters counted half (a syllable of
    Fidel is about two Latin letters); punctuation, symbols and emoji do not count, digits count fully.

    The non-whitespace share (`ethiopic_share`) counts every Latin letter and `?`, `!`, `#`, emoji against
    the text, so an Amharic question with an English phrase ("money hiest መቼ ነው የሚወጣው", 0.47) or a
    tweet with hashtags falls under one half; this share (0.64 there) keeps them, while Amharic typed in
    Latin letters, other languages and number lists ("87 እ.ኤ.ኣ.", 0.6 on 5 characters) stay low or short."""
    ethiopic = len(_ETHIOPIC_WORD_CHAR_RE.findall(text))
    digits = len(_DIGIT_RE.findall(text))
    others = len(_WORD_CHAR_RE.findall(text)) - ethiopic - digits
    total = ethiopic + digits + OTHER_LETTER_WEIGHT * others
    return ethiopic / total if total else 0.0
