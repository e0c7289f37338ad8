"""Seconds to compute MinHash shingles and signatures of a prepared run's filtered documents: datatrove's
string shingles (SHA-1 of each joined n-gram) against ours (`AmharicMinhashSignature`, word hashes
combined with numpy). Median of --repeats runs over the first --docs documents.

    python benchmarks/bench_minhash.py runs/demo --docs 6000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import orjson
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

from fidellm.data.config import DedupConfig
from fidellm.data.dedup import AmharicMinhashSignature, AmharicWordTokenizer, minhash_config


def _seconds(signer: MinhashDedupSignature, texts: list[str]) -> float:
    started = time.perf_counter()
    for text in texts:
        shingles = signer.get_shingles(text)
        if shingles.size:
            signer.get_signature(shingles)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a run prepared by `fidellm data prepare` (RUN/data/work)")
    parser.add_argument("--docs", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    texts = []
    for path in sorted((args.run / "data" / "work" / "filtered").glob("*.jsonl")):
        with path.open("rb") as handle:
            texts += [orjson.loads(line)["text"] for line in handle]
    texts = texts[: args.docs]
    config = minhash_config(DedupConfig())
    folder = "/tmp/bench_minhash"  # the signers write nothing here: only shingles and signatures are timed
    signers = {
        "datatrove (sha1 per shingle)": MinhashDedupSignature(folder, config, AmharicWordTokenizer()),
        "fidellm (word hashes, numpy)": AmharicMinhashSignature(folder, config),
    }
    print(f"{len(texts):,} documents, {sum(map(len, texts)):,} characters")
    for name, signer in signers.items():
        runs = [_seconds(signer, texts) for _ in range(args.repeats)]
        print(f"| {name} | {statistics.median(runs):.2f} s | {', '.join(f'{r:.2f}' for r in runs)} |")


if __name__ == "__main__":
    main()
