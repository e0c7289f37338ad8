"""Time of the decontamination step (`fidellm.data.decontam.Decontaminate.filter`) on real pretraining
documents against every default evaluation set, median of repeats; also what it removed, so a faster
version can be checked to remove exactly the same lines, and the process's peak memory (the
documents it holds included).

Usage: python benchmarks/bench_decontam.py [--sources amwiki_2015_dennis_sell,amharic_bible_wordproject,...]
       [--run RUN] [--repeats 3]   (reads $FIDELLM_DATA, default ../shared/data)
--run RUN takes the documents `data prepare` kept in RUN (RUN/data/work/filtered: every source, already
clean, so nothing is removed) instead of raw sources: the step's whole share of a prepare run, on one
core. Repeats run in one process, so caches filled by the first are warm in the others; compare first
repeats (--repeats 1, one process each) when a change is about a cache.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

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
    parser.add_argument("--run", type=Path, help="Decontaminate RUN/data/work/filtered instead.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data_dir, registry = resolve_data_dir(), load_registry()
    if args.run is not None:
        names = [f"{args.run}/data/work/filtered"]
        docs = [
            Document(text=json.loads(line)["text"], id=f"{path.name}:{i}")
            for path in sorted(Path(names[0]).glob("*.jsonl"))
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())
        ]
        if not docs:
            sys.exit(f"no documents in {names[0]}/*.jsonl (run `fidellm data prepare {args.run}` first)")
    else:
        names = [name.strip() for name in args.sources.split(",") if name.strip()]
        read = (d for name in names for d in iter_documents(registry[name], data_dir))
        docs = [d for d in read if isinstance(d, Document)]
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
        f" {len(index.set_names)} eval sets: {removed} lines removed, {dropped} documents dropped;"
        f" process peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
        " (documents included)"
    )
    print(markdown_row(what, "python " + " ".join(sys.argv), seconds, "s"))


if __name__ == "__main__":
    main()
