"""The data report: report.json (every count), report.md (the same for people), report.png (plots).

All numbers are recomputed from the files the pipeline left behind — kept documents in splits/, dropped
documents with their reason in dropped/, unreadable records in rejected/ — so the accounting is checked for
every source, not assumed: records read = records in documents + rejected records, and documents = kept +
dropped (one record is one document except in a `group_by` source, whose documents are groups of records).
"""

from __future__ import annotations

import gzip
import json
import platform
import re
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fidellm.data.boilerplate import merge_examples
from fidellm.data.config import RERUN_PREPARE, PrepareConfig
from fidellm.data.registry import SourceSpec
from fidellm.data.sources import source_files
from fidellm.errors import FidelError
from fidellm.hashing import file_sha256
from fidellm.jsonfile import read_json_object

if TYPE_CHECKING:
    from fidellm.data.pipeline import PrepareLayout

_ETHIOPIC = re.compile("[\u1200-\u139f\u2d80-\u2ddf\uab00-\uab2f]")
_SPACE = re.compile(r"\s")


def iter_jsonl(folder: Path) -> Iterator[dict]:
    """Every JSON record of every *.jsonl / *.jsonl.gz file below `folder`, in file-name order."""
    for path in sorted(folder.rglob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)


def _display_path(path: Path, data_dir: Path) -> str:
    """Relative to the data directory where possible (reports compare across machines), else absolute."""
    try:
        return str(path.resolve().relative_to(data_dir.resolve()))
    except ValueError:
        return str(path.resolve())


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


class _TextStats:
    """Documents, lines, characters, bytes and Ethiopic characters of a set of texts."""

    def __init__(self) -> None:
        self.docs = self.lines = self.chars = self.bytes = self.nonspace = self.ethiopic = 0

    def add(self, text: str) -> None:
        self.docs += 1
        self.lines += text.count("\n") + 1
        self.chars += len(text)
        self.bytes += len(text.encode("utf-8"))
        self.nonspace += len(text) - len(_SPACE.findall(text))
        self.ethiopic += len(_ETHIOPIC.findall(text))

    def as_dict(self) -> dict[str, Any]:
        share = self.ethiopic / self.nonspace if self.nonspace else 0.0
        return {
            "docs": self.docs,
            "lines": self.lines,
            "chars": self.chars,
            "bytes": self.bytes,
            "ethiopic_share": round(share, 4),
        }


def collect(layout: PrepareLayout, specs: list[SourceSpec]) -> dict[str, Any]:
    """Count everything the pipeline produced, per source."""
    read: dict[str, Counter[str]] = defaultdict(Counter)
    for path in sorted(layout.read_counts.glob("*.json")):
        for source, counts in read_json_object(path, RERUN_PREPARE).items():
            read[source].update(counts)

    rejected: dict[str, Counter[str]] = defaultdict(Counter)
    rejected_examples: list[dict] = []
    for record in iter_jsonl(layout.rejected):
        rejected[record["source"]][record["reason"]] += record.get("records", 1)
        if len(rejected_examples) < 20:
            rejected_examples.append(record)

    dropped: dict[str, Counter[str]] = defaultdict(Counter)
    languages: Counter[str] = Counter()
    lang_rules: Counter[str] = Counter()
    for step_dir in sorted(p for p in layout.dropped.glob("*") if p.is_dir()):
        for record in iter_jsonl(step_dir):
            meta = record.get("metadata", {})
            dropped[meta.get("source", "?")][meta.get("filter_reason", step_dir.name)] += 1
            if "lang" in meta:
                languages[meta["lang"]] += 1

    kept: dict[str, dict[str, _TextStats]] = defaultdict(lambda: defaultdict(_TextStats))
    lengths: list[int] = []
    line_removals: Counter[str] = Counter()
    decontam: dict[str, Counter[str]] = defaultdict(Counter)
    filled: dict[str, Counter[str]] = defaultdict(Counter)
    for split in ("train", "val", "test"):
        for record in iter_jsonl(layout.splits / split):
            meta = record.get("metadata", {})
            kept[meta["source"]][split].add(record["text"])
            filled[meta["source"]][split] += bool(meta.get("split_filled"))
            lengths.append(len(record["text"]))
            languages[meta.get("lang", "unknown")] += 1
            lang_rules[meta.get("lang_rule", "unknown")] += 1
            line_removals["boilerplate_lines"] += meta.get("boilerplate_lines", 0)
            line_removals["non_text_lines"] += meta.get("non_text_lines", 0)
            line_removals["copy_lines_removed"] += meta.get("copy_lines_removed", 0)
            line_removals["collapsed_docs"] += "copy_lines_removed" in meta
            for eval_set, n_lines in (meta.get("decontam_sets") or {}).items():
                decontam[eval_set]["lines"] += n_lines
    for record in iter_jsonl(layout.dropped / "contaminated"):
        for eval_set in record.get("metadata", {}).get("decontam_sets") or {}:
            decontam[eval_set]["docs"] += 1

    sources: dict[str, Any] = {}
    for spec in specs:
        name = spec.name
        total = _TextStats()
        by_split = {}
        for split, stats in kept[name].items():
            by_split[split] = stats.as_dict()
            for attr in ("docs", "lines", "chars", "bytes", "nonspace", "ethiopic"):
                setattr(total, attr, getattr(total, attr) + getattr(stats, attr))
        n_dropped = sum(dropped[name].values())
        n_rejected = sum(rejected[name].values())
        documents = read[name]["documents"]
        records = read[name]["records"]
        sources[name] = {
            "license": spec.license,
            "license_family": spec.license_family,
            "records_read": records,
            "documents": documents,
            "rejected": n_rejected,
            "rejected_by_reason": dict(rejected[name]),
            "dropped": n_dropped,
            "dropped_by_reason": dict(sorted(dropped[name].items())),
            "kept": total.as_dict(),
            "kept_by_split": by_split,
            "filled_by_split": {split: n for split, n in filled[name].items() if n},
            "markup_chars_removed": read[name]["markup_chars_removed"],
            "balanced": documents == total.docs + n_dropped and read[name]["rejected"] == n_rejected,
        }
    return {
        "sources": sources,
        "rejected_examples": rejected_examples,
        "languages": dict(languages.most_common()),
        "lang_rules": dict(lang_rules.most_common()),
        "line_removals": dict(line_removals),
        "decontam": {k: dict(v) for k, v in sorted(decontam.items())},
        "lengths": lengths,
    }


def write_report(
    layout: PrepareLayout,
    specs: list[SourceSpec],
    config: PrepareConfig,
    data_dir: Path,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Write report.json, report.md and report.png into RUN/data; raise if any source does not balance."""
    facts = collect(layout, specs)
    lengths = facts.pop("lengths")
    sources = facts["sources"]
    totals = Counter()
    reasons: Counter[str] = Counter()
    for info in sources.values():
        totals["records_read"] += info["records_read"]
        totals["documents"] += info["documents"]
        totals["rejected"] += info["rejected"]
        totals["dropped"] += info["dropped"]
        for key in ("docs", "chars", "bytes"):
            totals[f"kept_{key}"] += info["kept"][key]
        reasons.update(info["dropped_by_reason"])
    after_exact = totals["documents"] - reasons["empty"]
    after_filters = totals["kept_docs"] + reasons["near_duplicate"]
    n_lang = sum(facts["languages"].values())
    report = {
        "totals": dict(totals),
        "dropped_by_reason": dict(reasons.most_common()),
        "dedup": {
            "exact_duplicates": reasons["exact_duplicate"],
            "exact_rate": round(reasons["exact_duplicate"] / after_exact, 4) if after_exact else 0.0,
            "near_duplicates": reasons["near_duplicate"],
            "near_rate": round(reasons["near_duplicate"] / after_filters, 4) if after_filters else 0.0,
        },
        "language_id": {
            "counts": facts["languages"],
            "amharic_share": round(facts["languages"].get("am", 0) / n_lang, 4) if n_lang else 0.0,
            "kept_by_rule": facts["lang_rules"],
        },
        "boilerplate": {**facts["line_removals"], "top_removed": merge_examples(layout.boilerplate_examples)},
        "decontamination": facts["decontam"],
        "sources": sources,
        "rejected_examples": facts["rejected_examples"],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "provenance": {
            "data_dir": str(data_dir),
            "files": {
                spec.name: {_display_path(p, data_dir): file_sha256(p) for p in source_files(spec, data_dir)}
                for spec in specs
            },
            "commit": _git_commit(),
            "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.node()}",
        },
        "config": config.to_dict(),
    }
    layout.root.mkdir(parents=True, exist_ok=True)
    (layout.root / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2))
    (layout.root / "report.md").write_text(render_markdown(report))
    _plot(report, lengths, layout.root / "report.png")
    unbalanced = [name for name, info in sources.items() if not info["balanced"]]
    if unbalanced:
        raise FidelError(f"accounting mismatch (read != kept + dropped + rejected) for sources {unbalanced}")
    return report


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _split_row(name: str, info: dict[str, Any]) -> list[Any]:
    """A source's documents in train, val and test, the characters of val and test, and the moved ones."""
    stats = {split: info["kept_by_split"].get(split, {}) for split in ("train", "val", "test")}
    moved = ", ".join(f"{n} to {split}" for split, n in info.get("filled_by_split", {}).items())
    return [
        name,
        f"{stats['train'].get('docs', 0):,}",
        *(f"{stats[split].get(key, 0):,}" for split in ("val", "test") for key in ("docs", "chars")),
        moved or "-",
    ]


def render_markdown(report: dict[str, Any]) -> str:
    """The report for people: per-source accounting, reasons, dedup, decontamination, language ID."""
    totals = report["totals"]
    parts = [
        "# Data report",
        f"Records read {totals['records_read']:,}: rejected {totals['rejected']:,}, the rest made "
        f"{totals['documents']:,} documents (a `group_by` source makes one of several records) = kept "
        f"{totals['kept_docs']:,} + dropped {totals['dropped']:,}. Kept {totals['kept_chars']:,} "
        f"characters, {totals['kept_bytes'] / 1e6:.1f} MB.",
        "## Per source",
        _table(
            [
                "source",
                "licence",
                "read",
                "rejected",
                "documents",
                "dropped",
                "kept docs",
                "lines",
                "chars",
                "MB",
                "Ethiopic",
                "ok",
            ],
            [
                [
                    name,
                    info["license_family"],
                    f"{info['records_read']:,}",
                    info["rejected"],
                    f"{info['documents']:,}",
                    f"{info['dropped']:,}",
                    f"{info['kept']['docs']:,}",
                    f"{info['kept']['lines']:,}",
                    f"{info['kept']['chars']:,}",
                    f"{info['kept']['bytes'] / 1e6:.2f}",
                    info["kept"]["ethiopic_share"],
                    "yes" if info["balanced"] else "NO",
                ]
                for name, info in report["sources"].items()
            ],
        ),
        "## Splits (documents, characters)",
        "Each source with at least `split.min_source_docs` documents has one in every split; 'moved' counts"
        " those placed there by that rule rather than by the hash of their id (splits.py).",
        _table(
            ["source", "train", "val", "val chars", "test", "test chars", "moved"],
            [_split_row(name, info) for name, info in report["sources"].items()],
        ),
        "## Dropped documents by reason",
        _table(["reason", "documents"], [[k, f"{v:,}"] for k, v in report["dropped_by_reason"].items()]),
        "## Per source and reason",
        _table(
            ["source", "reasons"],
            [
                [name, ", ".join(f"{k} {v:,}" for k, v in info["dropped_by_reason"].items()) or "-"]
                for name, info in report["sources"].items()
            ],
        ),
        "## Deduplication",
        f"Exact duplicates {report['dedup']['exact_duplicates']:,} ({report['dedup']['exact_rate']:.2%} of "
        f"documents); MinHash near duplicates {report['dedup']['near_duplicates']:,} "
        f"({report['dedup']['near_rate']:.2%} of the documents that passed the filters).",
        "## Decontamination (lines removed from kept documents; documents dropped whole)",
        _table(
            ["eval set", "lines", "documents"],
            [[k, v.get("lines", 0), v.get("docs", 0)] for k, v in report["decontamination"].items()],
        )
        if report["decontamination"]
        else "No overlap with any evaluation set found.",
        "## Language identification (every document that reached the language filter)",
        f"Share CLD2 identifies as Amharic: {report['language_id']['amharic_share']:.2%}. Kept documents by "
        "rule (`cld2`: CLD2 said Amharic; `ethiopic_fallback`: CLD2 could not score the text, mostly short "
        "texts, and it is mostly Ethiopic script): "
        + ", ".join(f"{k} {v:,}" for k, v in report["language_id"]["kept_by_rule"].items())
        + ".",
        _table(
            ["language", "documents"], [[k, f"{v:,}"] for k, v in report["language_id"]["counts"].items()]
        ),
        "## Boilerplate",
        f"Removed {report['boilerplate'].get('boilerplate_lines', 0):,} boilerplate lines and "
        f"{report['boilerplate'].get('non_text_lines', 0):,} lines without letters. "
        f"{report['boilerplate'].get('collapsed_docs', 0):,} kept documents were one text stored two or more"
        f" times over and are kept once ({report['boilerplate'].get('copy_lines_removed', 0):,} lines"
        " removed). Most removed:",
        _table(["kind", "line shape (digits masked)", "count"], report["boilerplate"]["top_removed"]),
    ]
    markup = [
        f"{name} {info['markup_chars_removed']:,}"
        for name, info in report["sources"].items()
        if info.get("markup_chars_removed")
    ]
    if markup:
        parts.append(
            "Markup stripped as the sources were read (their registry entry's `markup`), in characters: "
            + ", ".join(markup)
            + "."
        )
    if report["rejected_examples"]:
        parts += [
            "## Rejected records (first 20)",
            _table(
                ["source", "file:line", "reason", "detail"],
                [
                    [r["source"], f"{r['path']}:{r['line']}", r["reason"], str(r.get("detail", ""))[:80]]
                    for r in report["rejected_examples"]
                ],
            ),
        ]
    parts += [
        "## Timings (s)",
        _table(["stage", "seconds"], list(report["timings_s"].items())),
    ]
    return "\n\n".join(parts) + "\n"


def _plot(report: dict[str, Any], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    if lengths:
        bins = np.logspace(0, np.log10(max(lengths) + 1), 50)
        axes[0].hist(lengths, bins=bins)
        axes[0].set_xscale("log")
    axes[0].set(title="Kept document length", xlabel="characters", ylabel="documents")
    names = list(report["sources"])
    infos = [report["sources"][n] for n in names]
    read = np.array([max(info["records_read"], 1) for info in infos])
    grouped = np.array([(i["records_read"] - i["rejected"]) / max(i["documents"], 1) for i in infos])
    parts = {  # kept and dropped documents in the records they were made of (more than one with group_by)
        "kept": grouped * [info["kept"]["docs"] for info in infos],
        "dropped": grouped * [info["dropped"] for info in infos],
        "rejected": np.array([info["rejected"] for info in infos]),
    }
    y = np.arange(len(names))
    left = np.zeros(len(names))
    for label, counts in parts.items():
        share = 100 * counts / read
        axes[1].barh(y, share, left=left, label=label)
        left += share
    axes[1].set_yticks(y, [f"{n} ({r:,})" for n, r in zip(names, read, strict=True)], fontsize=8)
    axes[1].set(title="Records per source (records read)", xlabel="% of records read", xlim=(0, 100))
    axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    reasons = report["dropped_by_reason"]
    axes[2].barh(list(reasons), list(reasons.values()))
    axes[2].set_xscale("log")
    axes[2].set(title="Dropped documents by reason", xlabel="documents (log scale)")
    axes[2].tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
