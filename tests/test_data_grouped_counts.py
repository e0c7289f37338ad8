"""A `group_by` source's accounting: records read are the file's rows, documents are the groups, and every
row is either in a document or rejected once (an all-empty or removed group is not counted twice)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from datatrove.data import Document

from fidellm.data.config import PrepareConfig
from fidellm.data.pipeline import prepare
from fidellm.data.readers import Rejection
from fidellm.data.registry import load_registry
from fidellm.data.sources import iter_documents
from fidellm.paths import resolve_data_dir

VERSES = [
    ("1", "1", "በመጀመሪያ እግዚአብሔር ሰማይንና ምድርን ፈጠረ። ምድርም ባዶ ነበረች፥ አንዳችም አልነበረባትም።"),
    ("1", "1", ""),
    ("1", "1", "እግዚአብሔርም ብርሃን ይሁን አለ፤ ብርሃንም ሆነ። እግዚአብሔርም ብርሃኑ መልካም እንደ ሆነ አየ።"),
    ("1", "2", ""),
    ("1", "2", "  "),
    ("2", "1", "ይህ ምዕራፍ በዝርዝሩ ውስጥ ስላለ መወገድ አለበት። ሁለተኛው ቁጥርም እንዲሁ።"),
    ("2", "1", "የተወገደው ምዕራፍ ሁለተኛ ቁጥር ይህ ነው፤ ሊነበብ አይገባውም።"),
    ("3", "1", "ሰማያትና ምድር ሠራዊታቸውም ሁሉ ተፈጸሙ። እግዚአብሔርም የሠራውን ሥራ በሰባተኛው ቀን ፈጸመ።"),
    ("3", "1", "እግዚአብሔርም ሰባተኛውን ቀን ባረከው ቀደሰውም፤ በእርሱ ከሠራው ሥራ ሁሉ ዐርፎአልና።"),
    ("4", "1", "በዚያም ዘመን ከአውግስጦስ ቄሣር የዓለሙ ሁሉ ሕዝብ እንዲጻፍ ትእዛዝ ወጣ። ሁሉም ሊጻፉ ወደ ከተማቸው ሄዱ።"),
    ("5", "1", "በመጀመሪያው ቃል ነበረ፥ ቃልም በእግዚአብሔር ዘንድ ነበረ። ብርሃንም በጨለማ ይበራል፥ ጨለማም አላሸነፈውም።"),
]


def _source(tmp_path: Path) -> Path:
    """Eleven verse rows and one unparsable row; returns the registry file of source `verses`."""
    rows = [json.dumps({"book": b, "chapter": c, "text": t}, ensure_ascii=False) for b, c, t in VERSES]
    rows.insert(5, '{"book": "2", "chapter": "1", "text": "unterminated')
    (tmp_path / "verses.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "removed.tsv").write_text("id\n2/1\n", encoding="utf-8")
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        f"sources:\n  - name: verses\n    section: pretrain\n    paths: [{tmp_path / 'verses.jsonl'}]\n"
        f"    format: jsonl\n    group_by: [book, chapter]\n    removed_ids: {tmp_path / 'removed.tsv'}\n"
        "    license: MIT\n    license_family: open\n",
        encoding="utf-8",
    )
    return registry


def test_every_row_is_in_a_document_or_rejected_once(tmp_path: Path) -> None:
    items = list(iter_documents(load_registry(_source(tmp_path))["verses"], tmp_path))
    docs = [i for i in items if isinstance(i, Document)]
    rejected = [i for i in items if isinstance(i, Rejection)]
    assert [(d.metadata["orig_id"], d.metadata["records"]) for d in docs] == [
        ("1/1", 2),
        ("3/1", 2),
        ("4/1", 1),
        ("5/1", 1),
    ]
    by_reason = Counter()
    for rejection in rejected:
        by_reason[rejection.reason] += rejection.records
    assert by_reason == {"empty": 3, "invalid_json": 1, "removed_listed": 2}
    assert sum(d.metadata["records"] for d in docs) + sum(by_reason.values()) == len(VERSES) + 1


def test_report_counts_rows_read_and_documents(tmp_path: Path) -> None:
    config = PrepareConfig()
    config.sources.include = ["verses"]
    config.sources.extra_registry = str(_source(tmp_path))
    config.dedup.near = False
    config.decontam.enabled = False
    config.tasks = config.workers = 1
    report = prepare(tmp_path / "run", resolve_data_dir(), config.validate())
    info = report["sources"]["verses"]
    assert info["records_read"] == len(VERSES) + 1  # the rows of the file, not documents + rejections
    assert info["documents"] == 4 == info["kept"]["docs"] + info["dropped"]
    assert info["rejected"] == 6 and info["rejected_by_reason"] == {
        "empty": 3,
        "invalid_json": 1,
        "removed_listed": 2,
    }
    assert info["balanced"]
    markdown = (tmp_path / "run" / "data" / "report.md").read_text(encoding="utf-8")
    assert "Records read 12: rejected 6, the rest made 4 documents" in markdown
