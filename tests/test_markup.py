"""Wikitext markup stripped at read time (`markup: wikitext` in the registry), on planted and real text."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fidellm.data.config import PrepareConfig
from fidellm.data.markup import strip_markup, strip_wikitext
from fidellm.data.pipeline import prepare
from fidellm.data.registry import load_registry
from fidellm.data.sources import iter_documents
from fidellm.errors import FidelError
from fidellm.paths import resolve_data_dir

DATA = resolve_data_dir()
MARKERS = ("'''", "''", "[[", "]]", "{{", "}}", "መደብ:", "ስዕል:", "#redirect", "[http")


@pytest.mark.parametrize(
    ("wikitext", "plain"),
    [
        # bold title and italics go, their words stay
        ("'''ረምብራንት''' (ሆላንድኛ፦ ''Rembrandt'') ሰዓሊ ነበር።", "ረምብራንት (ሆላንድኛ፦ Rembrandt) ሰዓሊ ነበር።"),
        # a category name glued to the next page's bold title: cut up to the title
        ("መደብ:የአውሮፓ ከተሞች'''ሆኒያራ''' (Honiara) ዋና ከተማ ነው።", "ሆኒያራ (Honiara) ዋና ከተማ ነው።"),
        ("#redirect ህንድ#redirect ህንድ'''ሹርከን''' የጃፓን መሣሪያ ነው።", "ሹርከን የጃፓን መሣሪያ ነው።"),
        # a category line alone, an interwiki link, a file line: nothing left
        ("መደብ: ያልተተረጎመ ምሳሌ", ""),
        ("ar:العقار", ""),
        ("ስዕል:Teferi.jpg", ""),
        # whole links keep their label; an unclosed link or template runs to the line's end
        ("ሌላ [[ኢትዮጵያ|የኢትዮጵያ]] ጥንታዊ [[አክሱም]] ጽሑፍ", "ሌላ የኢትዮጵያ ጥንታዊ አክሱም ጽሑፍ"),
        ("ከተማ ነው።\n[[ጄኔ ካንበራ ባሁኑ ጊዜ", "ከተማ ነው።"),
        ("[http://www.funaba.org/cal.cgi የቀን መለወጫ መሣርያ] ይረዳል።", "የቀን መለወጫ መሣርያ ይረዳል።"),
        ("ቪዲዮ\n** [https://www.youtube.com/watch?v=sZ የጥጃ ሥጋ", "ቪዲዮ"),
        ("ሰላም [HTTP://EXAMPLE.COM ገጽ] ነው።", "ሰላም ገጽ ነው።"),  # a URL in capitals too
        # a template is closed by a later `}}` only, not by one before it
        ("}}\nሀገር {{ማጣቀሻ|ስም", "ሀገር"),
        # an infobox over lines goes whole, closed or not; so do table rows; headings keep their words
        ("{{የሀገር መረጃ|\nስም = ኮሞሮስ|\nሙሉ_ስም = Union des Comores\n}}\n'''ኮሞሮስ''' አገር ነው።", "ኮሞሮስ አገር ነው።"),
        ("አገር ሲ{{የሀገር መረጃ|\nስም = ፋሮ ደሴቶች|\nባንዲራ_ሥዕል = Flag.svg|", "አገር ሲ"),
        ('{| class="wikitable"\n! ስም !! ዓመት\n|-\n| ሀ || 1\n|}\nከሠንጠረዡ በኋላ።', "ከሠንጠረዡ በኋላ።"),
        ("=ዋቢ ምንጮች=\n*ራጃ ሂንዱስታኒ\n*ላጋን", "ዋቢ ምንጮች\nራጃ ሂንዱስታኒ\nላጋን"),
        # text that merely contains "=" or a colon stays
        ("1 January 1999 እ.ኤ.ኣ. = 1991 አ.ም.", "1 January 1999 እ.ኤ.ኣ. = 1991 አ.ም."),
        ("ትርጉሙ: ሰላም ነው።", "ትርጉሙ: ሰላም ነው።"),
    ],
)
def test_strip_wikitext(wikitext: str, plain: str) -> None:
    assert strip_wikitext(wikitext) == plain


def test_no_markup_leaves_text_alone() -> None:
    text = "'''ሰላም''' [[ዓለም]]\n\n"
    assert strip_markup(text, "none") == text
    assert strip_markup(text, "wikitext") == "ሰላም ዓለም"


def test_the_2015_wikipedia_source_reads_as_plain_text() -> None:
    spec = load_registry()["amwiki_2015_dennis_sell"]
    assert spec.markup == "wikitext"
    docs = [doc for doc in iter_documents(spec, DATA) if hasattr(doc, "text")][:3000]
    raw = "".join(doc.text for doc in docs)
    plain = [strip_wikitext(doc.text) for doc in docs]
    assert raw.count("'''") > 1000 and raw.count("መደብ:") > 100  # the source has the markup ...
    for marker in MARKERS:  # ... and none of it is left
        assert sum(text.count(marker) for text in plain) <= 5, marker
    kept = sum(map(len, plain))
    assert 0.6 * len(raw) < kept < 0.95 * len(raw)  # the markup goes, the text stays


def test_registry_rejects_an_unknown_markup(tmp_path: Path) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        "sources:\n  - name: wiki\n    section: pretrain\n    paths: [wiki.txt]\n    format: txt\n"
        "    markup: html\n    license: CC BY-SA 3.0\n    license_family: open\n",
        encoding="utf-8",
    )
    with pytest.raises(FidelError, match=r"'wiki'.*field 'markup'.*'html' is not one of none, wikitext"):
        load_registry(registry)


def test_prepare_strips_markup_and_counts_it(tmp_path: Path) -> None:
    paragraphs = [
        "መደብ:የአውሮፓ ከተሞች'''ሆኒያራ''' (Honiara) የሰሎሞን ደሴቶች ዋና ከተማ ነው። ከተማዋ በጓዳልካናል ደሴት ላይ ትገኛለች።",
        "'''አክሱም''' በሰሜን [[ኢትዮጵያ]] የምትገኝ ጥንታዊ ከተማ ናት። የአክሱም መንግሥት መቀመጫ ነበረች።",
        "'''ድኒ ዲድሮ''' (ፈረንሳይኛ፦ '''Denis Diderot''') የፈረንሳይ ጸሐፊና ፈላስፋ ነበር። [[ፓሪስ]] ውስጥ ኖሯል።",
        "{{የሀገር መረጃ|\nስም = ኮሞሮስ|\n}}\n'''ኮሞሮስ''' በሕንድ ውቅያኖስ የሚገኝ የደሴቶች አገር ነው። ዋና ከተማው ሞሮኒ ነው።",
        "መደብ: ያልተተረጎመ ምሳሌ",
    ]
    (tmp_path / "wiki.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    (tmp_path / "registry.yaml").write_text(
        f"sources:\n  - name: wiki\n    section: pretrain\n    paths: [{tmp_path / 'wiki.txt'}]\n"
        "    format: txt\n    unit: paragraph\n    id_rule: line\n    markup: wikitext\n"
        "    license: CC BY-SA 3.0\n    license_family: open\n",
        encoding="utf-8",
    )
    config = PrepareConfig()
    config.sources.include = ["wiki"]
    config.sources.extra_registry = str(tmp_path / "registry.yaml")
    config.filters.min_words = 3
    config.dedup.near = False
    config.tasks = config.workers = 1
    report = prepare(tmp_path / "run", DATA, config.validate())
    info = report["sources"]["wiki"]
    removed = sum(len(p) for p in paragraphs) - sum(len(strip_wikitext(p)) for p in paragraphs)
    assert info["markup_chars_removed"] == removed > 0
    assert info["records_read"] == 5 and info["dropped_by_reason"] == {"empty": 1} and info["balanced"]
    texts = []
    for path in (tmp_path / "run" / "data" / "splits").rglob("*.jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            texts += [json.loads(line)["text"] for line in handle]
    assert sorted(texts) == sorted(strip_wikitext(p) for p in paragraphs[:4])
    markdown = (tmp_path / "run" / "data" / "report.md").read_text(encoding="utf-8")
    assert f"in characters: wiki {removed:,}." in markdown


def test_a_sentence_glued_to_a_category_name_is_kept() -> None:
    glued = "መደብ:የእስያ አገራትኩዌት በአረቢያ የሚገኝ አገር ሲሆን ዋና ከተማው ኩዌት ከተማ ነው።"
    assert strip_wikitext(glued) == glued.removeprefix("መደብ:")
    assert strip_wikitext("መደብ:የጀርመን መሪዎችቻርልስ ዲከንስ") == ""  # no sentence: all debris
    assert strip_wikitext("ስዕል:Garlic.jpg |ነጭ ሽንኩርት ነው።") == ""  # a file name never stays
