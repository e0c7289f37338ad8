"""Boilerplate-line removal and exact dedup: counting pass + removal pass, across ranks."""

from __future__ import annotations

from datatrove.data import Document

from fidellm.data.boilerplate import (
    BoilerplateRemover,
    CorpusCounter,
    ExactDedup,
    line_shape,
    merge_examples,
)
from fidellm.data.config import BoilerplateConfig

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
