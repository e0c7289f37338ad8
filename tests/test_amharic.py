"""Tests of the Amharic normalizer: fixed mappings, the folding tables checked against Unicode names,
hypothesis properties (idempotence, no loss) and the real FLORES-200 dev file."""

from __future__ import annotations

import difflib
import re
import string
import sys
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fidellm.data.amharic import (
    HOMOPHONES,
    LABIALIZED,
    REMOVED_CHARS,
    ethiopic_share,
    fold,
    is_ethiopic,
    match_key,
    normalize,
    punctuation_chars,
    sentences,
    words,
)
from fidellm.errors import FidelError
from fidellm.paths import resolve_data_dir

PREFIX = "ETHIOPIC SYLLABLE "
COLONS = "፡:"

# --- fixed normalizer mappings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ሰላም ነው፡፡", "ሰላም ነው።"),
        ("ሰላም ነው::", "ሰላም ነው።"),
        ("ሰላም ነው ፡ ፡ ቀጥሎ", "ሰላም ነው ። ቀጥሎ"),
        ("ሰላም ነው፡\t፡", "ሰላም ነው።"),
        ("ሰላም፡ነው", "ሰላም፡ነው"),  # the wordspace alone is kept
        ("ርዕስ: ሰላም", "ርዕስ: ሰላም"),
        ("ሰዓት 10:30 ላይ", "ሰዓት 10:30 ላይ"),
        ("Cafe\u0301 ቡና", "Café ቡና"),  # NFC composes e + combining acute
        ("Cafe\u200b\u0301", "Café"),  # ... also once the zero width space between them is gone
        ("ሰላም\tነው", "ሰላም ነው"),
        ("ሰ\u200bላም\ufeff", "ሰላም"),
        ("ኢት\u00adዮጵያ", "ኢትዮጵያ"),  # soft hyphen removed
        ("ሰላም\u200e \u202aነው\u202c", "ሰላም ነው"),  # bidi controls removed
        ("👩\u200d💻", "👩\u200d💻"),  # zero width joiner kept (emoji sequences)
        ("ሀ\x07ለ\x92ሐ", "ሀለሐ"),  # C0/C1 controls removed
        ("ሰላም  \t ነው\u00a0 ነው", "ሰላም ነው ነው"),
        ("  መስመር አንድ  \r\n\tሁለት \rሦስት\u2028አራት ", "መስመር አንድ\nሁለት\nሦስት\nአራት"),
        ("አንቀጽ\n\nአንቀጽ", "አንቀጽ\n\nአንቀጽ"),  # empty lines kept
        ("std::vector", "std::vector"),
        ("ድረገጽ http://a.b/c::d ላይ", "ድረገጽ http://a.b/c::d ላይ"),
        ("fe80::1", "fe80::1"),
        ("zegbWal::", "zegbWal።"),
        ("c:::d", "c።:d"),
        ("፩፻ 100 ፣ ፤ ፥ ፦ ፧ ፨ ፠", "፩፻ 100 ፣ ፤ ፥ ፦ ፧ ፨ ፠"),
    ],
)
def test_normalize_mappings(raw: str, expected: str) -> None:
    assert normalize(raw) == expected
    assert normalize(expected) == expected


def test_every_unicode_whitespace_becomes_a_space_or_a_line_break() -> None:
    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        if ch.isspace() and ch not in REMOVED_CHARS:
            assert normalize(f"ሀ{ch}ለ") in ("ሀ ለ", "ሀ\nለ"), hex(code)


def test_normalize_rejects_non_str() -> None:
    with pytest.raises(TypeError):
        normalize(b"\xe1\x88\x80")  # type: ignore[arg-type]


def test_folding_is_off_by_default() -> None:
    text = "ሐሰት ፀሐይ ዓለም ሠላም ቍጥር ሉዋ ዱዋ"
    assert normalize(text) == text
    assert normalize(text, fold_homophones=True) == "ሀሰት ጸሀይ ኣለም ሰላም ቁጥር ሉዋ ዱዋ"
    assert normalize(text, fold_labialized=True) == "ሐሰት ፀሐይ ዓለም ሠላም ቍጥር ሏ ዷ"


# --- folding tables against Unicode names ---------------------------------------------------------------


def _vowel_suffix(ch: str, consonant: str) -> str:
    name = unicodedata.name(ch)
    assert name.startswith(PREFIX + consonant), name
    return name[len(PREFIX + consonant) :]


SERIES = {"HH": "H", "X": "H", "SZ": "S", "PHARYNGEAL ": "GLOTTAL ", "TZ": "TS"}


@pytest.mark.parametrize(("source", "target"), SERIES.items())
def test_homophone_series_map_vowel_order_to_vowel_order(source: str, target: str) -> None:
    first = unicodedata.lookup(PREFIX + source + "A")
    mapped = 0
    for code in range(ord(first), ord(first) + 8):  # 7 vowel orders + the 8th (labialized) form
        ch = chr(code)
        name = unicodedata.name(ch, "")
        if not name.startswith(PREFIX + source):
            continue
        suffix = name[len(PREFIX + source) :]
        try:
            expected = unicodedata.lookup(PREFIX + target + suffix)
        except KeyError:
            expected = None
        if expected is not None:
            assert HOMOPHONES[ch] == expected, (name, suffix)
            assert _vowel_suffix(HOMOPHONES[ch], target) == suffix
            mapped += 1
    assert mapped == (8 if source in ("SZ", "X") else 7)


def test_homophone_examples_and_irregular_letters() -> None:
    expected = {"ሐ": "ሀ", "ሓ": "ሃ", "ኃ": "ሃ", "ኀ": "ሀ", "ኇ": "ሇ", "ሠ": "ሰ", "ሧ": "ሷ"}
    expected |= {"ዐ": "አ", "ዓ": "ኣ", "ዕ": "እ", "ፀ": "ጸ", "ፅ": "ጽ", "ሗ": "ኋ"}
    expected |= {"ቊ": "ቁ", "ቍ": "ቁ", "ኲ": "ኩ", "ኵ": "ኩ", "ጒ": "ጉ", "ጕ": "ጉ", "ኊ": "ሁ", "ኍ": "ሁ"}
    for source, target in expected.items():
        assert HOMOPHONES[source] == target, source
    # 4th orders of the target series and the ኀ letters without a ሀ-series counterpart stay.
    for kept in "ሀሃአኣሰጸኈኋኌፇቈቋኰኳጐጓ":
        assert kept not in HOMOPHONES, kept


def _names() -> dict[str, str]:
    codes = [*range(0x1200, 0x13A0), *range(0x2D80, 0x2DE0), *range(0xAB00, 0xAB30)]
    return {unicodedata.name(chr(c), ""): chr(c) for c in codes}


def test_homophone_table_is_exactly_the_documented_set() -> None:
    """Series letters with a same-order target, ሗ, and every -wi/-wɨ letter of a velar (a consonant
    with a -waa letter) — computed here from the names, independently of the module's parser."""
    names = _names()
    expected = {names[PREFIX + "HHWA"]}
    for source, target in SERIES.items():
        for name, ch in names.items():
            suffix = name[len(PREFIX + source) :]
            if name.startswith(PREFIX + source) and suffix and PREFIX + target + suffix in names:
                expected.add(ch)
    # W + AA is the plain ዋ, not a labialized consonant: the consonant must be non-empty.
    velars = {name[len(PREFIX) : -3] for name in names if name.startswith(PREFIX) and name.endswith("WAA")}
    velars.discard("")
    for velar in velars:
        expected |= {names[PREFIX + velar + v] for v in ("WI", "WE") if PREFIX + velar + v in names}
    assert set(HOMOPHONES) == expected
    assert len(HOMOPHONES) == 52


def test_labialized_velars_fold_to_the_u_letter() -> None:
    for ch, target in HOMOPHONES.items():
        name = unicodedata.name(ch)
        if name.endswith(("WI", "WE")):
            u_letter = unicodedata.lookup(name[:-2] + "U")
            assert HOMOPHONES.get(u_letter, u_letter) == target, name


def test_folding_tables_are_closed() -> None:
    assert not set(HOMOPHONES.values()) & set(HOMOPHONES)
    assert not set(LABIALIZED.values()) & set(LABIALIZED)


def test_labialized_table_from_names() -> None:
    assert len(LABIALIZED) >= 30
    for u_letter, wa_letter in LABIALIZED.items():
        u_name, wa_name = unicodedata.name(u_letter), unicodedata.name(wa_letter)
        assert u_name.endswith("U"), u_name  # only -u (2nd order) letters, never 1st order (ደ)
        consonant = u_name[len(PREFIX) : -1]
        if u_letter == "ሁ":
            assert wa_letter == "ኋ"
        else:
            assert wa_name in (PREFIX + consonant + "WA", PREFIX + consonant + "WAA"), (u_name, wa_name)
    for consonant in ("L", "D", "T", "M", "B", "S", "R", "N", "Z", "J", "TH", "CH", "F", "P"):
        u_letter = unicodedata.lookup(PREFIX + consonant + "U")
        assert LABIALIZED[u_letter] == unicodedata.lookup(PREFIX + consonant + "WA")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ዱዋ", "ዷ"),
        ("ሉዋ", "ሏ"),
        ("ቱዋ", "ቷ"),
        ("አሉአቸው", "አሏቸው"),
        ("ቁዋንቁዋ", "ቋንቋ"),
        ("ጉዋደኛ", "ጓደኛ"),
        ("በሁዋላ", "በኋላ"),
        ("ደዋ", "ደዋ"),  # 1st order + ዋ is left alone
        ("ሉ ዋ", "ሉ ዋ"),
        ("ቊጥር", "ቁጥር"),
        ("ኵሉ", "ኩሉ"),
        ("ሉዓላዊ", "ሏላዊ"),
        ("ሉአላዊ", "ሏላዊ"),
        ("ሡዋ", "ሷ"),
        ("ሑዋ", "ኋ"),
        ("ፁዋ", "ጿ"),
        ("ኡዋ", "ኡዋ"),  # the glottal has no -wa letter
    ],
)
def test_fold(raw: str, expected: str) -> None:
    assert fold(raw) == expected
    assert normalize(raw, fold_homophones=True, fold_labialized=True) == expected


def test_labialization_without_homophones_keeps_series() -> None:
    assert normalize("ሑዋ ሡዋ ኁዋ ሁዋ", fold_labialized=True) == "ሗ ሧ ኋ ኋ"


def test_match_key() -> None:
    assert match_key("  ሰላም፣ ዓለም!  Hello, World.\nሉዋ") == "ሰላም ኣለም hello world ሏ"
    assert match_key("ሐገር፡፡") == match_key("ሀገር።") == "ሀገር"
    assert match_key("፣።!?") == ""


# --- words, sentences, script share ---------------------------------------------------------------------


def test_words() -> None:
    text = "ሰላም፡ነው። don't 3.5 10,000 10:30 ት/ቤት ዓ.ም. «ጥቅስ» a--b _x_ 12/05/2010 ፲፱፻ ቡና፣"
    assert words(text) == [
        "ሰላም", "ነው", "don't", "3.5", "10,000", "10:30", "ት/ቤት", "ዓ.ም", "ጥቅስ", "a", "b", "x",
        "12/05/2010", "፲፱፻", "ቡና",
    ]  # fmt: skip
    assert words("።፣ , ...") == []


def test_sentences() -> None:
    text = "ሰላም ነው። እንዴት ነህ? «ደህና ነኝ።» ቀጥሎ!!! ሌላ\nአዲስ መስመር፧ \n\n  "
    assert sentences(text) == ["ሰላም ነው።", "እንዴት ነህ?", "«ደህና ነኝ።»", "ቀጥሎ!!!", "ሌላ", "አዲስ መስመር፧"]
    assert sentences("") == []


def test_ethiopic_share_and_is_ethiopic() -> None:
    assert ethiopic_share("") == 0.0
    assert ethiopic_share(" \n\t") == 0.0
    assert ethiopic_share("ሰላም ab") == pytest.approx(3 / 5)
    assert ethiopic_share("። ፩ ᎀ ⶀ ꬁ") == 1.0
    assert [is_ethiopic(ch) for ch in "ሀ።፩ᎀⶀꬁa1 "] == [True] * 6 + [False] * 3
    with pytest.raises(ValueError):
        is_ethiopic("ሀሀ")


# --- hypothesis properties ------------------------------------------------------------------------------

ETHIOPIC_SAMPLE = "".join(chr(c) for c in range(0x1200, 0x1380) if unicodedata.name(chr(c), ""))
ALPHABET = (
    ETHIOPIC_SAMPLE
    + "ሉዱቁሁዋአኣ፡፡::።"
    + string.ascii_letters
    + string.digits
    + string.punctuation
    + " \t\n\r\x0b\x85\u2028\u00a0\u3000"
    + "\u200b\ufeff\u00ad\u200e\u200d\x00\x07\x9f"
    + "\u0301\u0308\u135fé👍𝄀"
)
texts = st.one_of(st.text(), st.text(alphabet=ALPHABET, max_size=80))
flags = st.sampled_from([(False, False), (True, False), (False, True), (True, True)])


@settings(deadline=None)
@given(texts, flags)
def test_normalize_is_idempotent(text: str, flag_pair: tuple[bool, bool]) -> None:
    homophones, labialized = flag_pair
    once = normalize(text, fold_homophones=homophones, fold_labialized=labialized)
    assert normalize(once, fold_homophones=homophones, fold_labialized=labialized) == once


def _visible(text: str) -> str:
    return "".join(ch for ch in text if not ch.isspace())


@settings(deadline=None)
@given(texts)
def test_normalize_loses_nothing(text: str) -> None:
    """Let A be the non-whitespace characters of NFC(input without REMOVED_CHARS) and B those of
    normalize(input). Then B is A with some disjoint adjacent pairs of ፡/: replaced by one ። each:
    with all ፡ : ። deleted, A and B are the same sequence, no colon is added, and the number of new ።
    is exactly half the number of colons that disappeared."""
    kept = unicodedata.normalize("NFC", "".join(ch for ch in text if ch not in REMOVED_CHARS))
    before, after = _visible(kept), _visible(normalize(text))
    drop = re.compile("[፡:።]")
    assert drop.sub("", before) == drop.sub("", after)
    lost_colons = sum(before.count(c) for c in COLONS) - sum(after.count(c) for c in COLONS)
    assert lost_colons >= 0 and lost_colons % 2 == 0
    assert after.count("።") - before.count("።") == lost_colons // 2


@settings(deadline=None)
@given(texts)
def test_normalize_only_moves_whitespace(text: str) -> None:
    """Without ፡/: in the input, normalize() keeps exactly the whitespace-separated tokens of
    NFC(input without REMOVED_CHARS): a tab or NBSP separates words like a space does."""
    text = text.replace("፡", "").replace(":", "")
    kept = unicodedata.normalize("NFC", "".join(ch for ch in text if ch not in REMOVED_CHARS))
    assert normalize(text).split() == kept.split()


URL_PART = st.text(alphabet=string.ascii_letters + string.digits + "-._~", min_size=1, max_size=12)
urls = st.builds(
    lambda scheme, host, port, path, query: f"{scheme}://{host}.com{port}/{'/'.join(path)}?q={query}&x=%20",
    st.sampled_from(["http", "https", "ftp"]),
    URL_PART,
    st.sampled_from(["", ":8080"]),
    st.lists(URL_PART, max_size=4),
    URL_PART,
)


@settings(deadline=None)
@given(urls, st.text(alphabet=ETHIOPIC_SAMPLE + " ", max_size=20), st.text(alphabet=ALPHABET, max_size=40))
def test_normalize_keeps_urls_digits_and_latin(url: str, amharic: str, noise: str) -> None:
    text = f"{amharic} {url} {noise}"
    result = normalize(text)
    assert f" {url}" in f" {result}"
    for ch in string.ascii_letters + string.digits + "/?#[]@!$&'()*+,;=%-._~" + "፩፪፫፲፻":
        kept = unicodedata.normalize("NFC", "".join(c for c in text if c not in REMOVED_CHARS))
        assert result.count(ch) == kept.count(ch), ch


@settings(deadline=None)
@given(texts)
def test_fold_is_idempotent(text: str) -> None:
    once = fold(text)
    assert fold(once) == once
    assert not set(once) & set(HOMOPHONES)


@settings(deadline=None)
@given(texts)
def test_match_key_properties(text: str) -> None:
    key = match_key(text)
    assert match_key(key) == key
    assert not set(key) & punctuation_chars()
    assert key == " ".join(key.split())


@settings(deadline=None)
@given(texts)
def test_ethiopic_share_is_a_share(text: str) -> None:
    assert 0.0 <= ethiopic_share(text) <= 1.0


@settings(deadline=None)
@given(texts)
def test_words_are_clean(text: str) -> None:
    punct = punctuation_chars()
    tokens = words(text)
    for token in tokens:
        assert token and not any(ch.isspace() for ch in token)
        assert token[0] not in punct and token[-1] not in punct, token
        for i, ch in enumerate(token):
            if ch in punct:  # only a single joiner between two word characters
                assert ch in "'’.,:/" and token[i - 1] not in punct and token[i + 1] not in punct, token
    # every word character of the input is in some token, in order
    assert "".join(ch for ch in text if ch not in punct and not ch.isspace()) == "".join(
        ch for token in tokens for ch in token if ch not in punct
    )


@settings(deadline=None)
@given(texts)
def test_sentences_are_stripped_and_cover_the_text(text: str) -> None:
    pieces = sentences(text)
    assert all(piece and piece == piece.strip() for piece in pieces)
    assert _visible("".join(pieces)) == _visible(text)


# --- real data ------------------------------------------------------------------------------------------

ALLOWED_EDIT = re.compile(r"[፡:] ?[፡:]")


def test_flores_dev_changes_only_documented_mappings() -> None:
    try:
        path = resolve_data_dir() / "flores200" / "amh_Ethi.dev"
    except FidelError as error:
        pytest.skip(str(error))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 997
    changed, full_stops = 0, 0
    for number, line in enumerate(lines, 1):
        result = normalize(line)
        assert normalize(result) == result, number
        if result == line:
            continue
        changed += 1
        matcher = difflib.SequenceMatcher(None, line, result, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal":
                continue
            old, new = line[i1:i2], result[j1:j2]
            if ALLOWED_EDIT.fullmatch(old) and new == "።":
                full_stops += 1
            else:  # whitespace collapsed or stripped, or an invisible character removed
                assert new in ("", " ") and all(ch.isspace() or ch in REMOVED_CHARS for ch in old), (
                    number, tag, old, new,
                )  # fmt: skip
    # FLORES ends sentences with the typed ፡፡ in a few dozen lines; every such pair became ።.
    assert changed > 0
    assert full_stops == sum(len(ALLOWED_EDIT.findall(line)) for line in lines) > 0
