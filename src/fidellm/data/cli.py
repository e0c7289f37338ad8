"""`fidellm data …`: prepare, tokenize, download, sources, chat."""

from __future__ import annotations

import os
from pathlib import Path

import click

DATA_DIR_OPTION = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data directory (default: $FIDELLM_DATA, else ../shared/data).",
)


@click.group()
def data() -> None:
    """Data stage: raw sources -> clean, deduplicated, decontaminated splits -> token shards."""


@data.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@DATA_DIR_OPTION
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="YAML overrides."
)
@click.option(
    "--sources", help="Comma-separated registry sources to read (default: every pretraining source)."
)
@click.option("--open-licences-only", is_flag=True, help="Keep only sources under open licences.")
@click.option(
    "--workers", type=click.IntRange(min=1), help="Parallel worker processes (default from config: 2)."
)
@click.option(
    "--overwrite", is_flag=True, help="Replace RUN_DIR/data if it exists (once the new one is complete)."
)
@click.option(
    "--verbose", is_flag=True, help="Show datatrove's per-task logs instead of writing them to logs/."
)
def prepare(
    run_dir: Path,
    data_dir: Path | None,
    config_path: Path | None,
    sources: str | None,
    open_licences_only: bool,
    workers: int | None,
    overwrite: bool,
    verbose: bool,
) -> None:
    """Normalize, filter, deduplicate, decontaminate and split the Amharic sources into RUN_DIR/data.

    Writes splits/{train,val,test}/*.jsonl.gz, dropped/<reason>/ (every removed document), rejected/
    (unreadable records with file:line) and report.{md,json,png}.
    """
    from fidellm.data.config import load_prepare_config
    from fidellm.data.pipeline import prepare as run_prepare
    from fidellm.paths import resolve_data_dir

    config = load_prepare_config(config_path)
    if sources:
        config.sources.include = [s.strip() for s in sources.split(",") if s.strip()]
    if open_licences_only:
        config.sources.licence_families = ["open"]
    if workers is not None:
        config.workers = config.tasks = workers
    config.validate()
    report = run_prepare(run_dir, resolve_data_dir(data_dir), config, overwrite=overwrite, quiet=not verbose)
    totals = report["totals"]
    click.echo(
        f"kept {totals['kept_docs']:,} documents ({totals['kept_bytes'] / 1e6:.1f} MB) of "
        f"{totals['records_read']:,} read; dropped {totals['dropped']:,}, rejected {totals['rejected']:,}. "
        f"Exact dup rate {report['dedup']['exact_rate']:.2%}, "
        f"near dup rate {report['dedup']['near_rate']:.2%}."
    )
    click.echo(f"report: {Path(run_dir) / 'data' / 'report.md'}")


@data.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Tokenizer directory (default: RUN_DIR/tokenizer).",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Parallel encoding processes."
)
@click.option(
    "--source-weight",
    "source_weights",
    multiple=True,
    metavar="SOURCE=WEIGHT",
    help="Replace the train weight of every document of SOURCE (0 leaves it out); repeatable.",
)
@click.option(
    "--curriculum",
    is_flag=True,
    help="Also score every document's complexity (complexity.npy) for `fidellm train --curriculum`.",
)
def tokenize(
    run_dir: Path, tokenizer_dir: Path | None, workers: int, source_weights: tuple[str, ...], curriculum: bool
) -> None:
    """Encode RUN_DIR/data/splits into memory-mappable token shards in RUN_DIR/tokens."""
    from fidellm.errors import FidelError
    from fidellm.tokenizer.shards import tokenize_splits

    weights: dict[str, float] = {}
    for item in source_weights:
        name, _, value = item.partition("=")
        if name.strip() in weights:
            raise FidelError(f"--source-weight names {name.strip()!r} twice; give each source one weight")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise FidelError(f"--source-weight {item!r}: expected SOURCE=WEIGHT, e.g. wikipedia=2") from None
    summary = tokenize_splits(
        run_dir, tokenizer_dir=tokenizer_dir, workers=workers, source_weights=weights, curriculum=curriculum
    )
    for split, info in summary.items():
        click.echo(f"{split}: {info['n_docs']:,} documents, {info['n_tokens']:,} tokens")


@data.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write the files (default: $FIDELLM_DATA; one of the two is needed).",
)
@click.option("--sources", help="Comma-separated registry sources (default: all).")
@click.option(
    "--retries",
    type=int,
    default=4,
    show_default=True,
    help="Retries per file on transient errors, after the first attempt (0: one attempt).",
)
def download(data_dir: Path | None, sources: str | None, retries: int) -> None:
    """Fetch the public sources from their canonical URLs into DATA_DIR, verifying sha256."""

    from fidellm.data.download import download_sources
    from fidellm.errors import FidelError
    from fidellm.paths import DATA_ENV

    target = data_dir or (Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None)
    if target is None:
        raise FidelError(f"download needs --data-dir or ${DATA_ENV} to say where to write")
    names = [s.strip() for s in sources.split(",")] if sources else None
    report = download_sources(target, names=names, retries=retries)
    click.echo(report.lines()[-1])
    report.raise_on_failure()


@data.command(name="sources")
@click.option("--registry", type=click.Path(dir_okay=False, path_type=Path), help="Extra user registry YAML.")
def list_sources(registry: Path | None) -> None:
    """List the registry: every source with its section, format and licence."""
    from fidellm.data.registry import load_registry

    for name, spec in load_registry(registry).items():
        click.echo(f"{name:34s} {spec.section:9s} {spec.license_family:13s} {spec.license}")


@data.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@DATA_DIR_OPTION
@click.option(
    "--sources", help="Comma-separated sft/parallel sources (default: every sft source + MarsPanther)."
)
@click.option("--max-samples", type=int, help="Keep at most N conversations per source (hash-chosen).")
@click.option(
    "--eval-split", type=float, default=0.05, show_default=True, help="Fraction of conversations for eval."
)
@click.option(
    "--overwrite", is_flag=True, help="Replace RUN_DIR/chat if it exists (once the new one is complete)."
)
def chat(
    run_dir: Path,
    data_dir: Path | None,
    sources: str | None,
    max_samples: int | None,
    eval_split: float,
    overwrite: bool,
) -> None:
    """Convert instruction/chat sets and MarsPanther translation pairs into RUN_DIR/chat/{train,eval}.jsonl.

    Validates every record (rejected.jsonl lists each bad one with file:line and field), deduplicates,
    removes conversations overlapping the chat evaluation prompts and pairs overlapping the MT test sets,
    and writes report.json (counts per source and reason, licence per source).
    """
    from fidellm.chat.data import build_chat_data
    from fidellm.errors import FidelError
    from fidellm.paths import resolve_data_dir

    names = [s.strip() for s in sources.split(",") if s.strip()] if sources is not None else None
    if names == []:
        raise FidelError(f"--sources {sources!r} names no source; leave it out for the default sources")
    report = build_chat_data(
        run_dir, resolve_data_dir(data_dir), names, max_samples, eval_split, overwrite=overwrite
    )
    for name, info in report["sources"].items():
        click.echo(  # records: read = accepted + rejected; their conversations = dropped + kept
            f"{name:30s} read {info['records_read']:>6,}  accepted {info['records_accepted']:>6,}  rejected"
            f" {sum(info['rejected'].values()):>4,}  conversations {info['conversations']:>6,}  dropped"
            f" {sum(info['dropped'].values()):>6,}  kept {info['kept']:>6,} ({info['license_family']})"
        )
    totals = report["totals"]
    click.echo(f"train {totals['train']:,}, eval {totals['eval']:,}: {Path(run_dir) / 'chat'}")
