"""Time of `fidellm.data.markup.strip_wikitext` on the 2015 Wikipedia source and on a text of many
unclosed `{{` lines (the worst case of a template's closing search), median of repeats; also a
fingerprint of the stripped text, so a faster version can be checked to give the same text.

Usage: python benchmarks/bench_markup.py [--repeats 3] [--lines 20000]   (reads $FIDELLM_DATA)
"""

from __future__ import annotations

import argparse
import hashlib
import time

from common import markdown_row
from datatrove.data import Document

from fidellm.data.markup import strip_wikitext
from fidellm.data.registry import load_registry
from fidellm.data.sources import iter_documents
from fidellm.paths import resolve_data_dir

SOURCE = "amwiki_2015_dennis_sell"


def timed(texts: list[str], repeats: int) -> tuple[list[float], str]:
    """Seconds per pass over `texts` and the sha256 of what the last pass returned."""
    seconds, digest = [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        stripped = [strip_wikitext(text) for text in texts]
        seconds.append(time.perf_counter() - started)
        digest = hashlib.sha256("\0".join(stripped).encode("utf-8")).hexdigest()[:16]
    return seconds, digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lines", type=int, default=20_000, help="Unclosed `{{` lines of the worst case.")
    args = parser.parse_args()
    spec = load_registry()[SOURCE]
    texts = [d.text for d in iter_documents(spec, resolve_data_dir()) if isinstance(d, Document)]
    command = f"python benchmarks/bench_markup.py --repeats {args.repeats} --lines {args.lines}"
    seconds, digest = timed(texts, args.repeats)
    chars = sum(map(len, texts))
    what = f"strip_wikitext, {SOURCE}: {len(texts):,} paragraphs, {chars:,} chars (out {digest})"
    print(markdown_row(what, command, seconds, "s"))
    worst = "\n".join(["{{ ሰላም ለዓለም"] * args.lines)
    seconds, digest = timed([worst], args.repeats)
    what = f"strip_wikitext, {args.lines:,} unclosed `{{{{` lines (out {digest})"
    print(markdown_row(what, command, seconds, "s"))


if __name__ == "__main__":
    main()
