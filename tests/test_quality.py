"""Tests for the 0-100 quality score: real FLORES text scores high, the classic junk shapes score low."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fidellm.data.amharic import words
from fidellm.data.quality import COMPONENTS, Ramp, measure, quality_score
from fidellm.paths import resolve_data_dir


@pytest.fixture(scope="module")
def flores() -> list[str]:
    data = resolve_data_dir() / "flores200"
    texts = [(data / name).read_text(encoding="utf-8") for name in ("amh_Ethi.dev", "amh_Ethi.devtest")]
    return [line.strip() for text in texts for line in text.splitlines()]


def test_clean_flores_paragraph_scores_high(flores):
    assert quality_score("\n".join(flores[:12])).score >= 95
    assert quality_score(" ".join(flores[100:106])).score >= 95
    assert min(quality_score(line).score for line in flores) >= 80


def test_repeated_line_scores_low(flores):
    result = quality_score("\n".join([flores[3]] * 20))
    assert result.score < 10
    assert result.components["dup_line_frac"] == pytest.approx(19 / 20)


def test_list_of_one_word_lines_scores_low(flores):
    ws = words(" ".join(flores[:5]))[:40]
    result = quality_score("\n".join(ws))
    assert result.score < 10
    assert result.components["short_line_frac"] == 1.0


def test_random_ethiopic_without_spaces_scores_low():
    rng = random.Random(7)
    letters = [chr(c) for c in range(0x1200, 0x135A)]
    text = "".join(rng.choice(letters) for _ in range(400))
    result = quality_score(text)
    assert result.score < 10
    assert result.components["mean_word_len"] == 400


def test_latin_text_scores_low_on_ethiopic_share():
    text = "The quick brown fox jumps over the lazy dog. " * 3
    assert quality_score(text).goodness["ethiopic_share"] == 0.0
    assert quality_score(text).score == 0.0


def test_empty_and_wordless_text_score_zero():
    assert quality_score("").score == 0.0
    assert quality_score("።።። ***\n---").score == 0.0


def test_more_duplication_never_raises_the_score(flores):
    base = flores[20:30]
    scores = [quality_score("\n".join(base + [base[0]] * k)).score for k in range(0, 12)]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] > scores[-1]


def test_component_values_on_a_small_example():
    text = "ሰላም ነው ወንድሜ።\nሰላም ነው ወንድሜ።\n• አንድ ሁለት ሦስት\nአዎ"
    values = measure(text)
    assert values["dup_line_frac"] == pytest.approx(1 / 3)  # 3 lines of >= 2 words, one repeat
    assert values["terminal_punct_frac"] == pytest.approx(2 / 4)
    assert values["short_line_frac"] == pytest.approx(1 / 4)
    assert values["bullet_line_frac"] == pytest.approx(1 / 4)
    assert values["digit_ratio"] == 0.0


def test_a_list_of_sentences_is_not_a_bullet_list():
    events = "*1825 - ባርነት በእንግሊዝ አገር ግዛቶች ሁሉ ባዋጅ ተከለከለ።\n*1831 - እንግሊዝ ሆንግኮንግን ማረከ።\n*1983 - ዩክሬን ነጻነቱን አዋጀ።"
    links = "* የዓለም ታሪክ\n* የአፍሪቃ ታሪክ\n* የኢትዮጵያ ታሪክ"
    assert measure(events)["bullet_line_frac"] == 0.0 and quality_score(events).score >= 50
    assert measure(links)["bullet_line_frac"] == 1.0 and quality_score(links).score == 0.0


def test_ngram_repetition_needs_three_occurrences():
    twice = "የእስራኤል ልጆች ወደ ምድረ በዳ ሄዱ፤ የእስራኤል ልጆች በዚያ አደሩ።"
    assert measure(twice)["top_2gram_char_frac"] == 0.0
    thrice = twice + " የእስራኤል ልጆች ተመለሱ።"
    assert measure(thrice)["top_2gram_char_frac"] > 0.0
    spam = "እኔ ጥሩ አይደለሁም " * 6  # "እኔ ጥሩ" 6 times: 6 x 4 chars of 60
    assert measure(spam)["top_2gram_char_frac"] == pytest.approx(0.4)
    assert quality_score(spam).score == 0.0


def test_ramp_both_directions():
    up = Ramp(ok=0.1, bad=0.4)
    assert up(0.0) == 1.0 and up(0.4) == 0.0 and up(0.25) == pytest.approx(0.5)
    down = Ramp(ok=0.8, bad=0.3)
    assert down(1.0) == 1.0 and down(0.3) == 0.0 and down(0.55) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        Ramp(ok=0.2, bad=0.2)


def test_weights_and_floors_are_sane():
    assert all(c.weight > 0 and 0.0 <= c.floor < 1.0 for c in COMPONENTS.values())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_score_in_range_and_deterministic(text):
    first = quality_score(text)
    assert 0.0 <= first.score <= 100.0
    assert quality_score(text) == first
    assert all(0.0 <= g <= 1.0 for g in first.goodness.values())


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.sampled_from(["ኢትዮጵያ ውስጥ ብዙ ሰዎች አሉ።", "ቡና ጠጣን።", "ዛሬ ዝናብ ዘነበ።", "12 34"]), min_size=1, max_size=8
    )
)
def test_appending_a_duplicate_line_never_helps(lines):
    text = "\n".join(lines)
    assert quality_score(text + "\n" + lines[0]).components["dup_line_frac"] >= measure(text)["dup_line_frac"]
