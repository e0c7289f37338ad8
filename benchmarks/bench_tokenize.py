"""Tokenization throughput in MB/s of UTF-8 text (median of repeats), printed as a markdown row.

python benchmarks/bench_tokenize.py RUN [--workers 2]   # `fidellm data tokenize` end to end:
                                                        # RUN/data/splits -> RUN/tokens (rewritten)
python benchmarks/bench_tokenize.py [--tokenizer DIR]   # encode_batch on FLORES Amharic + 2,000
                                                        # ENH articles, normalized; without DIR a
                                                        # 32K BPE is first trained on the GFF eBooks
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import click
import zstandard
from common import MARKDOWN_HEADER, markdown_row

from fidellm.data.amharic import normalize
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.base import TextTokenizer, load_tokenizer
from fidellm.tokenizer.bpe import train_bpe
from fidellm.tokenizer.report import flores_lines
from fidellm.tokenizer.shards import tokenize_splits


def jsonl_zst_texts(path: Path, limit: int | None = None) -> list[str]:
    """The normalized "text" fields of the first `limit` records of a .jsonl.zst file."""
    texts = []
    with path.open("rb") as raw:
        for number, line in enumerate(
            io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), "utf-8")
        ):
            if limit is not None and number >= limit:
                break
            texts.append(normalize(json.loads(line)["text"]))
    return texts


def time_run(run: Path, workers: int) -> tuple[float, float]:
    """(MB of text read, seconds) for tokenize_splits over every split of `run`."""
    start = time.perf_counter()
    metas = tokenize_splits(run, workers=workers, show_progress=False)
    seconds = time.perf_counter() - start
    mb = sum(entry["bytes_read"] for meta in metas.values() for entry in meta["sources"].values()) / 1e6
    return mb, seconds


def time_texts(tokenizer: TextTokenizer, texts: list[str]) -> tuple[float, float]:
    """(MB of text, seconds) for one encode_batch over `texts`."""
    mb = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    start = time.perf_counter()
    tokenizer.encode_batch(texts)
    return mb, time.perf_counter() - start


@click.command()
@click.argument("run", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--workers", type=int, default=2, show_default=True, help="Worker processes (RUN mode).")
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def main(run: Path | None, workers: int, repeats: int, tokenizer_dir: Path | None) -> None:
    """Measure tokenization throughput and print a markdown row."""
    if run is not None:
        label = f"tokenize_splits({run.name}, workers={workers})"
        samples = [time_run(run, workers) for _ in range(repeats)]
    else:
        data = resolve_data_dir()
        texts = flores_lines(data) + jsonl_zst_texts(data / "enh_corpus" / "enh_articles.jsonl.zst", 2000)
        if tokenizer_dir is not None:
            tokenizer = load_tokenizer(tokenizer_dir)
        else:
            books = jsonl_zst_texts(data / "geez_ebooks_amharic" / "amharic_ebooks.jsonl.zst")
            tokenizer = train_bpe(books, 32000, show_progress=False)
        label = f"encode_batch(FLORES + 2,000 ENH articles), BPE {tokenizer.vocab_size}"
        samples = [time_texts(tokenizer, texts) for _ in range(repeats)]
    rates = [mb / seconds for mb, seconds in samples]
    command = "python benchmarks/bench_tokenize.py " + " ".join(sys.argv[1:])
    click.echo(
        f"{label}: {samples[0][0]:.1f} MB per repeat, rates {', '.join(f'{r:.2f}' for r in rates)} MB/s"
    )
    click.echo(MARKDOWN_HEADER)
    click.echo(markdown_row(f"{label}, {samples[0][0]:.1f} MB", command.strip(), rates, "MB/s"))


if __name__ == "__main__":
    main()
