"""Tokenizer report: fertility and exact round-trip on FLORES-200 Amharic, beside published anchors.

Measured on flores200/amh_Ethi.dev + .devtest (each line stripped, then normalized exactly as the
training text was): tokens/word (words = whitespace-split, as the anchors count), tokens/char,
bytes/token and the share of lines with decode(encode(line)) == line. One BPE per vocabulary size is
trained on the same sample of the run's train split, so the sizes differ in nothing else: the largest
is trained and the others are cut out of it (`truncate_bpe`, identical to training each size).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tokenizers

from fidellm.errors import FidelError
from fidellm.paths import RunLayout, resolve_data_dir
from fidellm.tokenizer.base import META_FILE, TextTokenizer, load_tokenizer
from fidellm.tokenizer.bytes import ByteTokenizer

DEFAULT_SWEEP = (8000, 16000, 32000, 64000)
TARGET_TOKENS_PER_WORD = 2.0
TARGET_VOCAB_SIZE = 32000
FLORES_FILES = ("flores200/amh_Ethi.dev", "flores200/amh_Ethi.devtest")


@dataclass(frozen=True)
class Anchor:
    """A published tokenizer measurement on FLORES-200 Amharic dev+devtest (not measured here)."""

    name: str
    tokens_per_word: float
    tokens_per_char: float
    note: str = ""


PUBLISHED_ANCHORS: tuple[Anchor, ...] = (
    Anchor("LLaMA-1/2", 12.97, 2.55),
    Anchor("GPT-2", 11.96, 2.35),
    Anchor("cl100k (GPT-4)", 11.85, 2.33),
    Anchor("BLOOM", 7.88, 1.55),
    Anchor("mT5", 3.32, 0.65),
    Anchor("XLM-R", 2.33, 0.46),
    Anchor("NLLB", 2.30, 0.45),
    Anchor(
        "amharic-tokenizer 0.2.7 (30k)",
        1.91,
        0.37,
        "lossy: punctuation, digits and Latin become <unk> (12.4% of ids); 22 of 2,011 lines round-trip",
    ),
)
"""Published values (tokenization-fairness project; see design/amharic.md), labelled as published."""
PUBLISHED_FLORES_WORDS = 34_221
PUBLISHED_FLORES_CHARS = 174_268


@dataclass
class Fertility:
    """Counts of one tokenizer over the FLORES lines, and the ratios the report prints."""

    name: str
    vocab_size: int
    lines: int
    words: int
    chars: int
    bytes: int
    tokens: int
    roundtrip_lines: int
    train_seconds: float | None = None

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / self.words

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / self.chars

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens

    @property
    def roundtrip_rate(self) -> float:
        return self.roundtrip_lines / self.lines

    def to_dict(self) -> dict[str, Any]:
        ratios = {
            "tokens_per_word": round(self.tokens_per_word, 4),
            "tokens_per_char": round(self.tokens_per_char, 4),
            "bytes_per_token": round(self.bytes_per_token, 4),
            "roundtrip_rate": self.roundtrip_rate,
        }
        return {**asdict(self), **ratios}


def measure(name: str, tokenizer: TextTokenizer, lines: list[str]) -> Fertility:
    """Encode every line (no BOS), count tokens, and check the exact round trip of each line."""
    if not any(line.split() for line in lines):  # the ratios divide by words, chars and tokens
        raise FidelError("no evaluation lines with text to measure the tokenizer on")
    encoded = tokenizer.encode_batch(lines)
    return Fertility(
        name=name,
        vocab_size=tokenizer.vocab_size,
        lines=len(lines),
        words=sum(len(line.split()) for line in lines),
        chars=sum(len(line) for line in lines),
        bytes=sum(len(line.encode("utf-8")) for line in lines),
        tokens=sum(map(len, encoded)),
        roundtrip_lines=sum(tokenizer.decode(ids) == line for ids, line in zip(encoded, lines, strict=True)),
    )


def run_normalization(run_dir: Path | None) -> dict[str, Any]:
    """The normalizer flags the run's training text used (RUN/data/report.json), else the defaults."""
    settings: dict[str, Any] = {"fold_homophones": False, "fold_labialized": False, "from": "defaults"}
    path = RunLayout(run_dir).data / "report.json" if run_dir is not None else None
    if path is not None and path.is_file():
        try:
            normalize = json.loads(path.read_text(encoding="utf-8"))["config"]["normalize"]
            settings = {
                key: bool(normalize.get(key, False)) for key in ("fold_homophones", "fold_labialized")
            }
            settings["from"] = str(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise FidelError(f"{path}: cannot read config.normalize: {error}") from error
    return settings


def flores_lines(data_dir: Path, fold_homophones: bool = False, fold_labialized: bool = False) -> list[str]:
    """FLORES-200 Amharic dev then devtest, each line stripped and normalized like the training text."""
    from fidellm.data.amharic import normalize

    lines: list[str] = []
    for name in FLORES_FILES:
        path = data_dir / name
        if not path.is_file():
            raise FidelError(
                f"{path} does not exist (the FLORES-200 Amharic files are needed for the report)"
            )
        data = path.read_bytes()
        try:
            raw = data.decode("utf-8").split("\n")
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            raise FidelError(f"{path}:{line}: not UTF-8 ({error.reason} at byte {error.start})") from error
        if raw and raw[-1] == "":
            raw.pop()
        lines += [
            normalize(line.strip(), fold_homophones=fold_homophones, fold_labialized=fold_labialized)
            for line in raw
        ]
    if not any(line.split() for line in lines):
        raise FidelError(f"{' and '.join(str(data_dir / name) for name in FLORES_FILES)} hold no text")
    return lines


def locate(target: Path) -> tuple[Path | None, Path | None]:
    """(tokenizer dir or None, run dir with a train split or None) for a tokenizer dir or a run dir."""
    if (target / META_FILE).is_file() or (target / "tokenizer.json").is_file():
        run = target.parent if RunLayout(target.parent).split_dir("train").is_dir() else None
        return target, run
    layout = RunLayout(target)
    if layout.split_dir("train").is_dir() or layout.tokenizer.is_dir():
        tokenizer_dir = layout.tokenizer if layout.tokenizer.is_dir() else None
        return tokenizer_dir, target if layout.split_dir("train").is_dir() else None
    raise FidelError(f"{target} is neither a tokenizer directory nor a run directory with data/splits/train")


def build_report(
    target: str | os.PathLike,
    vocab_sizes: tuple[int, ...] = DEFAULT_SWEEP,
    data_dir: str | os.PathLike | None = None,
    sample_mb: float | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Measure the target's tokenizer, a byte tokenizer and one BPE per vocab size on FLORES Amharic."""
    from fidellm.tokenizer.bpe import (
        DEFAULT_SAMPLE_MB,
        MIN_FREQUENCY,
        check_vocab_size,
        sample_train_split,
        train_from_run,
        truncate_bpe,
    )

    for size in vocab_sizes:  # before the training they would otherwise fail after
        check_vocab_size(size)
    tokenizer_dir, run_dir = locate(Path(target))
    normalization = run_normalization(run_dir)
    folds = {key: normalization[key] for key in ("fold_homophones", "fold_labialized")}
    lines = flores_lines(resolve_data_dir(data_dir), **folds)
    rows: list[Fertility] = []
    main_meta: dict[str, Any] = {}
    if tokenizer_dir is not None:
        main = load_tokenizer(tokenizer_dir)
        main_meta = main.meta
        rows.append(measure(f"given tokenizer ({main.kind})", main, lines))
    rows.append(measure("bytes (UTF-8, 256 ids)", ByteTokenizer(), lines))
    sweep: dict[str, Any] = {"vocab_sizes": list(vocab_sizes)}
    if vocab_sizes and run_dir is None:
        sweep["skipped"] = f"no run directory with data/splits/train next to {target}"
    elif vocab_sizes:
        if sample_mb is None:
            sample_mb = main_meta.get("sample_mb", DEFAULT_SAMPLE_MB)
        sample_mb = sample_mb or None  # 0 = the whole train split, as in `tokenizer train` (not 1 document)
        sample = sample_train_split(run_dir, sample_mb, show_progress)
        sweep["training"] = sample.describe(run_dir)
        sweep["sample_mb"] = sample_mb
        largest = max(vocab_sizes)
        start = time.perf_counter()
        trained = train_from_run(run_dir, largest, sample_mb, show_progress=show_progress, sample=sample)
        sweep["trained_vocab_size"] = trained.vocab_size  # fewer than asked when the pairs ran out
        sweep["train_seconds"] = round(time.perf_counter() - start, 1)
        unreached = [size for size in vocab_sizes if size > trained.vocab_size]
        if unreached:  # truncate_bpe would hand back the whole smaller BPE under each of these names
            sweep["unreached"] = {
                "vocab_sizes": unreached,
                "reason": f"the training sample gives only {trained.vocab_size:,} ids (it runs out of "
                f"pairs seen at least {MIN_FREQUENCY} times); not measured",
            }
        for size in (size for size in vocab_sizes if size not in unreached):
            row = measure(f"BPE {size}", truncate_bpe(trained, size), lines)
            if size == largest:
                row.train_seconds = sweep["train_seconds"]
            rows.append(row)
    at_target = [row for row in rows if row.vocab_size == TARGET_VOCAB_SIZE]
    return {
        "eval_set": {
            "files": list(FLORES_FILES),
            "lines": len(lines),
            "words": rows[0].words,
            "chars": rows[0].chars,
            "bytes": rows[0].bytes,
            "normalization": normalization,
            "published_words": PUBLISHED_FLORES_WORDS,
            "published_chars": PUBLISHED_FLORES_CHARS,
        },
        "measured": [row.to_dict() for row in rows],
        "published": [asdict(anchor) for anchor in PUBLISHED_ANCHORS],
        "sweep": sweep,
        "target": {
            "tokens_per_word_max": TARGET_TOKENS_PER_WORD,
            "vocab_size": TARGET_VOCAB_SIZE,
            "roundtrip_rate": 1.0,
            "met": (
                all(
                    r.tokens_per_word <= TARGET_TOKENS_PER_WORD and r.roundtrip_rate == 1.0 for r in at_target
                )
                if at_target
                else None
            ),
        },
        "tokenizer": {"dir": str(tokenizer_dir) if tokenizer_dir else None, "meta": main_meta},
        "provenance": {
            "commit": _git_commit(),
            "python": platform.python_version(),
            "tokenizers": tokenizers.__version__,
            "machine": f"{platform.machine()} {platform.node()}",
        },
    }


def _git_commit() -> str | None:
    """HEAD of the checkout this code runs from, or None outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: measured rows, then the published anchors (labelled), then how it was measured."""
    ev = report["eval_set"]
    norm = ev["normalization"]
    lines = [
        "# Tokenizer report",
        "",
        f"FLORES-200 Amharic dev+devtest: {ev['lines']:,} lines, {ev['words']:,} words (whitespace-split), "
        f"{ev['chars']:,} characters, {ev['bytes']:,} UTF-8 bytes after normalization "
        f"(fold_homophones={norm['fold_homophones']}, fold_labialized={norm['fold_labialized']}; "
        f"settings from {norm['from']}). The published anchors counted {ev['published_words']:,} words "
        f"and {ev['published_chars']:,} characters.",
        "",
        "| tokenizer | vocab | tokens/word | tokens/char | bytes/token | exact round-trip | train s | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["measured"]:
        seconds = "" if row["train_seconds"] is None else f"{row['train_seconds']:.1f}"
        lines.append(
            f"| {row['name']} | {row['vocab_size']:,} | {row['tokens_per_word']:.3f} | "
            f"{row['tokens_per_char']:.3f} | {row['bytes_per_token']:.3f} | "
            f"{row['roundtrip_lines']:,}/{row['lines']:,} ({100 * row['roundtrip_rate']:.2f}%) | "
            f"{seconds} | measured |"
        )
    for anchor in report["published"]:
        note = f" ({anchor['note']})" if anchor["note"] else ""
        lines.append(
            f"| {anchor['name']}{note} | | {anchor['tokens_per_word']:.2f} | {anchor['tokens_per_char']:.2f} "
            "| | | | published |"
        )
    target = report["target"]
    verdict = {True: "met", False: "NOT met", None: "not measured (no 32,000-id BPE above)"}[target["met"]]
    lines += [
        "",
        f"Target: <= {target['tokens_per_word_max']} tokens/word at {target['vocab_size']:,} with "
        f"100% exact round-trip: **{verdict}**.",
        "",
    ]
    sweep = report["sweep"]
    if "skipped" in sweep:
        lines.append(f"Vocabulary sweep skipped: {sweep['skipped']}.")
    elif sweep.get("training"):
        training = sweep["training"]
        lines.append(
            f"Sweep tokenizers trained on {training['docs']:,} documents, {training['bytes'] / 1e6:.1f} MB "
            f"(of {training['total_docs']:,} documents, {training['total_bytes'] / 1e6:.1f} MB "
            "with weight > 0) "
            f"of {training['run']}/data/splits/train (sample limit: "
            f"{'none' if sweep['sample_mb'] is None else str(sweep['sample_mb']) + ' MB'}): one training "
            f"at {sweep['trained_vocab_size']:,} ids, {sweep['train_seconds']:.1f} s; each smaller size is "
            "its ids below that size and the merges that made them, which is what training at that size "
            "gives."
        )
        if "unreached" in sweep:
            sizes = ", ".join(f"{size:,}" for size in sweep["unreached"]["vocab_sizes"])
            lines += ["", f"Vocabulary sizes {sizes}: {sweep['unreached']['reason']}."]
    prov = report["provenance"]
    lines += [
        "",
        f"commit {prov['commit']}, tokenizers {prov['tokenizers']}, Python {prov['python']}, "
        f"{prov['machine']}.",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write report.md and report.json into `directory`; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    md_path, json_path = directory / "report.md", directory / "report.json"
    md_path.write_text(render_markdown(report), encoding="utf-8")
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return md_path, json_path
