"""Time of the decontamination step (`fidellm.data.decontam.Decontaminate.filter`) on real pretraining
documents against every default evaluation set, median of repeats; also what it removed, so a faster
version can be checked to remove exactly the same lines.

Usage: python benchmarks/bench_decontam.py [--sources amwiki_2015_dennis_sell,amharic_bible_wordproject,...]
       [--repeats 3]   (reads $FIDELLM_DATA, default ../shared/data)
"""

from __future__ import annotations

import argparse
import sys
import time

from common import markdown_row
from datatrove.data import Document

from fidellm.data.decontam import Decontaminate, EvalNgramIndex
from fidellm.data.registry import load_registry
from fidellm.data.sources import iter_documents
from fidellm.paths import resolve_data_dir

DEFAULT_SOURCES = "amwiki_2015_dennis_sell,amharic_bible_wordproject,ena_am_2022_2023"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", default=DEFAULT_SOURCES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data_dir, registry = resolve_data_dir(), load_registry()
    names = [name.strip() for name in args.sources.split(",") if name.strip()]
    docs = [d for name in names for d in iter_documents(registry[name], data_dir) if isinstance(d, Document)]
    index = EvalNgramIndex.from_data_dir(data_dir)
    seconds, removed, dropped = [], 0, 0
    for _ in range(args.repeats):
        step = Decontaminate(index=index)
        copies = [Document(text=d.text, id=d.id, metadata={}) for d in docs]
        started = time.perf_counter()
        verdicts = [step.filter(doc) for doc in copies]
        seconds.append(time.perf_counter() - started)
        removed = sum(doc.metadata.get("decontam_lines", 0) for doc in copies)
        dropped = sum(verdict is not True for verdict in verdicts)
    chars = sum(len(d.text) for d in docs)
    what = (
        f"decontaminate {len(docs):,} documents ({chars / 1e6:.2f}M chars; {', '.join(names)}) against"
        f" {len(index.set_names)} eval sets: {removed} lines removed, {dropped} documents dropped"
    )
    print(markdown_row(what, "python " + " ".join(sys.argv), seconds, "s"))


if __name__ == "__main__":
    main()
