"""Boilerplate-line removal and exact dedup: counting pass + removal pass, across ranks."""

from __future__ import annotations

import pytest
from datatrove.data import Document

from fidellm.data.amharic import normalize
from fidellm.data.boilerplate import (
    BoilerplateRemover,
    CollapseCopies,
    CorpusCounter,
    ExactDedup,
    line_shape,
    merge_examples,
    one_copy,
)
from fidellm.data.config import BoilerplateConfig
from fidellm.data.quality import quality_score
from fidellm.data.registry import load_registry
from fidellm.data.sources import iter_documents
from fidellm.paths import resolve_data_dir

FORUM = "ሰለ እዚህ ዜና ዋርካ ስር በአማርኛ ይወያዩ !"


def _body(i: int) -> str:
    """A body line of its own per document (a distinct syllable), unlike the repeated lines."""
    return f"የ{chr(0x1208 + 8 * i)}ላ ቤት {i * 7} ብር ነው ።"


def _docs(n: int) -> list[Document]:
    docs = []
    for i in range(n):
        body = _body(i)
        footer = f"ከአዲስ ዘመን ሐምሌ {i % 28 + 1} ቀን {1990 + i % 5}"
        docs.append(Document(text=f"{body}\n{FORUM}\n{footer}\n፲\n***", id=f"enh/{i:03d}", metadata={}))
    return docs


def _count(tmp_path, docs, config, world_size=1):
    for rank in range(world_size):
        shard = [d for i, d in enumerate(docs) if i % world_size == rank]
        list(CorpusCounter(tmp_path / "counts", config).run(iter(shard), rank=rank, world_size=world_size))


def test_line_shape_masks_digits_in_both_scripts():
    assert line_shape("ከአዲስ ዘመን ሐምሌ 12 ቀን 1997") == line_shape("ከአዲስ ዘመን ሐምሌ 3 ቀን 1990")
    assert line_shape("ምዕራፍ ፲፪") == line_shape("ምዕራፍ 5")
    assert line_shape("ከአዲስ ዘመን ሐምሌ 12") != line_shape("ከአዲስ ዘመን ነሐሴ 12")


def test_repeated_lines_footers_and_page_numbers_removed(tmp_path):
    config = BoilerplateConfig(min_docs=10)
    docs = _docs(30)
    _count(tmp_path, docs, config, world_size=2)
    remover = BoilerplateRemover(tmp_path / "counts", tmp_path / "examples", config)
    out = list(remover.run(iter(docs)))
    assert len(out) == 30
    for i, doc in enumerate(out):
        assert doc.text == _body(i)
        assert doc.metadata["boilerplate_lines"] == 2  # forum line + dated footer
        assert doc.metadata["non_text_lines"] == 2  # "፲" page number, "***"
    top = merge_examples(tmp_path / "examples")
    kinds = {(kind, count) for kind, _, count in top}
    assert ("boilerplate", 30) in kinds and ("non_text", 30) in kinds


def test_rare_lines_and_single_line_documents_kept(tmp_path):
    config = BoilerplateConfig(min_docs=10)
    docs = _docs(5)  # below the threshold: nothing is boilerplate yet
    tweets = [Document(text="አዎ ልክ ነው", id=f"tweet/{i}", metadata={}) for i in range(12)]
    _count(tmp_path, docs + tweets, config)
    out = list(BoilerplateRemover(tmp_path / "counts", tmp_path / "ex", config).run(iter(docs + tweets)))
    assert all(FORUM in d.text for d in out[:5])
    assert all(d.text == "አዎ ልክ ነው" for d in out[5:])  # a one-line document is never emptied as boilerplate


def test_exact_dedup_keeps_smallest_id_across_ranks(tmp_path):
    config = BoilerplateConfig()
    text = "ኢትዮጵያ በአፍሪካ ቀንድ የምትገኝ ሀገር ናት ።"
    docs = [
        Document(text=text, id="b/2", metadata={}),
        Document(text=text.replace("ሀ", "ሐ") + "  ", id="a/9", metadata={}),  # same match key
        Document(text="ሌላ የተለየ ጽሑፍ ነው ።", id="c/1", metadata={}),
    ]
    _count(tmp_path, docs, config, world_size=2)
    dedup = ExactDedup(tmp_path / "counts")
    kept = [d.id for rank in range(2) for d in dedup.run(iter(docs[rank::2]), rank=rank, world_size=2)]
    assert sorted(kept) == ["a/9", "c/1"]


def test_copies_that_share_their_id_too_are_exact_duplicates(tmp_path):
    """A line repeated verbatim in a JSONL file: same id, same text; one copy stays, on any sharding."""
    text = "ኢትዮጵያ በአፍሪካ ቀንድ የምትገኝ ሀገር ናት ።"
    for world_size in (1, 2):
        docs = [Document(text=text, id="s/j1", metadata={}) for _ in range(3)]
        docs.append(Document(text="ሌላ የተለየ ጽሑፍ ነው ።", id="s/j2", metadata={}))
        counts = tmp_path / f"w{world_size}"
        for rank in range(world_size):
            list(CorpusCounter(counts, BoilerplateConfig()).run(iter(docs[rank::world_size]), rank=rank))
        dedup = ExactDedup(counts)
        out = [d for rank in range(world_size) for d in dedup.run(iter(docs[rank::world_size]), rank=rank)]
        assert sorted(d.id for d in out) == ["s/j1", "s/j2"], world_size
        dropped = [d.metadata for d in docs if d.metadata.get("filter_reason") == "exact_duplicate"]
        assert [m["duplicate_of"] for m in dropped] == ["s/j1", "s/j1"], world_size


PROVERB = "'''የምስራች በቃሏ መላች''' የአማርኛ ምሳሌ ነው።"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{PROVERB}\n{PROVERB}", (PROVERB, 1)),  # the amwiki proverb pages
        ("ሀ\nለ\n\nሀ\nለ\n", ("ሀ\nለ", 2)),  # blank lines between copies do not matter
        ("ሀ\nሀ\nሀ", ("ሀ", 2)),
        ("ሀ\nለ\nሀ", ("ሀ\nለ\nሀ", 0)),  # a refrain inside other text stays
        ("ሀ\nለ\nሀ\nመ", ("ሀ\nለ\nሀ\nመ", 0)),
        ("ሀ", ("ሀ", 0)),
        ("", ("", 0)),
    ],
)
def test_one_copy_keeps_a_document_that_repeats_whole_once(text: str, expected: tuple[str, int]) -> None:
    assert one_copy(text) == expected


def test_collapse_copies_marks_and_counts_what_it_removed() -> None:
    step = CollapseCopies()
    docs = [Document(text=f"{PROVERB}\n{PROVERB}", id="a", metadata={}), Document(text="ሀ\nለ", id="b")]
    out = list(step.run(iter(docs)))
    assert [d.text for d in out] == [PROVERB, "ሀ\nለ"]
    assert out[0].metadata["copy_lines_removed"] == 1 and "copy_lines_removed" not in out[1].metadata
    assert step.stats["collapsed_docs"].total == 1 and step.stats["copy_lines_removed"].total == 1


def test_amwiki_proverb_pages_are_kept_once() -> None:
    """The 2015 Wikipedia's proverb pages: the proverb line twice, then "ትርጉሙ", which `data prepare`
    removes as boilerplate; what is left is one line said twice, which the quality score dropped whole."""
    spec = load_registry()["amwiki_2015_dennis_sell"]
    read = (d for d in iter_documents(spec, resolve_data_dir()) if isinstance(d, Document))
    texts = ["\n".join(s for s in normalize(d.text).split("\n") if s.strip() != "ትርጉሙ") for d in read]
    collapsed = [one_copy(t)[0] for t in texts if one_copy(t)[1]]
    assert sum("የአማርኛ ምሳሌ ነው" in t for t in collapsed) > 300
    assert all(quality_score(t).score == 0.0 for t in texts if one_copy(t)[1] and "ምሳሌ ነው" in t)
    assert sum(quality_score(t).score >= 50 for t in collapsed) > 300


def test_a_document_of_boilerplate_only_is_dropped_with_that_reason(tmp_path):
    config = BoilerplateConfig(min_docs=10)
    docs = _docs(30)
    only = Document(text=f"{FORUM}\n***", id="only/1", metadata={})  # its lines: boilerplate, non-text
    _count(tmp_path, [*docs, only], config)
    out = list(BoilerplateRemover(tmp_path / "counts", tmp_path / "ex", config).run(iter([*docs, only])))
    assert [d.id for d in out] == [d.id for d in docs]
    assert only.metadata["filter_reason"] == "boilerplate_only" and only.text == f"{FORUM}\n***"
