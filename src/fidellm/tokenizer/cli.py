"""`fidellm tokenizer ...`: train a tokenizer for a run and report its fertility on FLORES Amharic."""

from __future__ import annotations

import math
import time
from pathlib import Path

import click

from fidellm.errors import FidelError
from fidellm.paths import RunLayout
from fidellm.tokenizer.bpe import DEFAULT_SAMPLE_MB, DEFAULT_VOCAB_SIZE, MIN_FREQUENCY, train_from_run
from fidellm.tokenizer.report import DEFAULT_SWEEP


@click.group(name="tokenizer")
def tokenizer() -> None:
    """Train tokenizers (byte-level BPE or raw bytes) and measure them on FLORES-200 Amharic."""


@tokenizer.command("train", short_help="Train a BPE (or write the byte tokenizer) for a run.")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--vocab-size",
    type=int,
    default=DEFAULT_VOCAB_SIZE,
    show_default=True,
    help="Ids in the BPE vocabulary, reserved tokens included; a multiple of 64.",
)
@click.option(
    "--sample-mb",
    type=float,
    default=DEFAULT_SAMPLE_MB,
    show_default=True,
    help="Train on at most this many MB of UTF-8 text from RUN/data/splits/train, chosen by a "
    "hash of each document id (0 = all of it).",
)
@click.option(
    "--kind",
    type=click.Choice(["bpe", "bytes"]),
    default="bpe",
    show_default=True,
    help="bpe: trained byte-level BPE; bytes: the fixed 256-id byte tokenizer (for H-Net runs).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory [default: RUN/tokenizer].",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(run_dir: Path, vocab_size: int, sample_mb: float, kind: str, out: Path | None, quiet: bool) -> None:
    """Train a tokenizer on RUN/data/splits/train/*.jsonl.gz and save it (loads with transformers'
    AutoTokenizer). Deterministic: the same splits give the same tokenizer.json."""
    out = out or RunLayout(run_dir).tokenizer
    _check_out(out)  # before training: a path that cannot be a directory fails now, not after minutes
    if kind == "bytes":
        from fidellm.tokenizer.bytes import ByteTokenizer

        context = click.get_current_context()
        given = [
            "--" + name.replace("_", "-")
            for name in ("vocab_size", "sample_mb")
            if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise FidelError(
                f"{', '.join(given)} apply to --kind bpe only: the byte tokenizer always has 256 ids"
            )

        _remove_stale(out)
        ByteTokenizer().save(out)
        click.echo(f"byte tokenizer (256 ids, BOS 254, EOS/pad 255) written to {out}")
        return
    _check_sample_mb(sample_mb)
    start = time.perf_counter()
    trained = train_from_run(run_dir, vocab_size, sample_mb or None, show_progress=not quiet)
    _remove_stale(out)
    trained.save(out)
    training = trained.meta["training"]
    short = (
        f" (not the {vocab_size:,} asked: the text has no more pairs seen at least {MIN_FREQUENCY} times)"
        if trained.vocab_size < vocab_size
        else ""
    )
    click.echo(
        f"BPE with {trained.vocab_size:,} ids{short} trained on {training['docs']:,} documents "
        f"({training['bytes'] / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s; written to {out}"
    )


def _check_sample_mb(sample_mb: float | None) -> None:
    """--sample-mb is a size: a negative or non-finite one is an error (train and report alike), not a
    silent default or a traceback."""
    if sample_mb is not None and not math.isfinite(sample_mb):
        raise FidelError(f"--sample-mb must be a finite number of MB (0 = all of it), got {sample_mb}")
    if sample_mb is not None and sample_mb < 0:
        raise FidelError(f"--sample-mb must be >= 0, got {sample_mb}")


def _check_out(out: Path) -> None:
    """FidelError when `out` cannot become a directory because it, or a folder above it, is a file."""
    existing = next((path for path in (out, *out.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise FidelError(f"{out}: cannot write the tokenizer there: {existing} is a file, not a directory")


def _remove_stale(out: Path) -> None:
    """Drop files describing a previous tokenizer in `out` (its report, its HF files if it was a BPE)."""
    for name in (
        "report.md",
        "report.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        (out / name).unlink(missing_ok=True)


def _parse_sizes(text: str) -> tuple[int, ...]:
    """'8000,16000' -> (8000, 16000); '' or 'none' -> (). A size named twice is refused (it repeated a
    row of the sweep)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise FidelError(f"--vocab-sizes must be comma-separated integers, got {text!r}") from error
    repeated = sorted({size for size in sizes if sizes.count(size) > 1})
    if repeated:
        raise FidelError(f"--vocab-sizes {text!r} names {', '.join(map(str, repeated))} more than once")
    return sizes


@tokenizer.command("report", short_help="Fertility and round-trip on FLORES Amharic, with a vocab sweep.")
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--vocab-sizes",
    default=",".join(map(str, DEFAULT_SWEEP)),
    show_default=True,
    help="Also measure a BPE of each size, trained on the run's train split ('none' to skip); the "
    "largest is trained and the others are cut out of it, as training each would give.",
)
@click.option(
    "--sample-mb",
    type=float,
    default=None,
    help="MB of training text per sweep tokenizer, 0 = the whole train split "
    f"[default: what the run's tokenizer used, else {DEFAULT_SAMPLE_MB:g}].",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Shared data directory holding flores200/ [default: $FIDELLM_DATA or ../shared/data].",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def report(
    target: Path, vocab_sizes: str, sample_mb: float | None, data_dir: Path | None, quiet: bool
) -> None:
    """Fertility (tokens/word, tokens/char, bytes/token) and exact round-trip on FLORES-200 Amharic
    dev+devtest, beside published anchors. TARGET is a tokenizer directory or a run directory;
    writes report.md and report.json into the tokenizer directory (RUN/tokenizer)."""
    from fidellm.tokenizer.report import build_report, locate, write_report

    _check_sample_mb(sample_mb)
    sizes = _parse_sizes(vocab_sizes)
    if sample_mb is not None and not sizes:
        raise FidelError(f"--sample-mb sizes the vocabulary sweep, which --vocab-sizes {vocab_sizes!r} skips")
    tokenizer_dir, run_dir = locate(target)
    out = tokenizer_dir or RunLayout(run_dir).tokenizer
    result = build_report(target, sizes, data_dir, sample_mb, show_progress=not quiet)
    md_path, _ = write_report(result, out)
    for row in result["measured"]:
        click.echo(
            f"{row['name']:<40} vocab {row['vocab_size']:>6,}  tokens/word {row['tokens_per_word']:.3f}  "
            f"bytes/token {row['bytes_per_token']:.2f}  round-trip {100 * row['roundtrip_rate']:.2f}%"
        )
    if "skipped" in result["sweep"]:
        click.echo(f"vocabulary sweep skipped: {result['sweep']['skipped']}")
    if "unreached" in result["sweep"]:
        unreached = result["sweep"]["unreached"]
        sizes = ", ".join(f"{size:,}" for size in unreached["vocab_sizes"])
        click.echo(f"vocabulary sizes {sizes}: {unreached['reason']}")
    click.echo(f"report written to {md_path} and report.json")
