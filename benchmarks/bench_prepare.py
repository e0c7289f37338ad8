"""Wall time of `fidellm data prepare` over every pretraining source (target: <= 3 minutes on 2 cores).

Usage: python benchmarks/bench_prepare.py [--repeats 3] [--workers 2] [--out runs/bench_prepare]
Prints one markdown row for benchmarks/RESULTS.md: commit, machine, command, median and spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import MARKDOWN_HEADER, machine_description, markdown_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_prepare")
    args = parser.parse_args()
    command = [
        sys.executable, "-m", "fidellm", "data", "prepare", args.out,
        "--workers", str(args.workers), "--overwrite",
    ]  # fmt: skip
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    report = json.loads((Path(args.out) / "data" / "report.json").read_text())
    kept_mb = report["totals"]["kept_bytes"] / 1e6
    print(MARKDOWN_HEADER)
    print(
        markdown_row(
            what=f"data prepare, all pretraining sources ({report['totals']['records_read']:,} records, "
            f"{kept_mb:.1f} MB kept), {args.workers} workers",
            command=f"python benchmarks/bench_prepare.py --repeats {args.repeats} --workers {args.workers}",
            values=times,
            unit="s",
        )
    )
    print(f"stage timings of the last run (s): {report['timings_s']}", file=sys.stderr)
    print(f"machine: {machine_description()}", file=sys.stderr)
    print(
        f"all runs (s): {[round(t, 1) for t in times]}; median {statistics.median(times):.1f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
