"""The load test's bookkeeping (benchmarks/serve_load.py): the checks that turn a wrong usage count into an
error, the per-request rates and the per-window throughput it reports."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

MODULE = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


@pytest.fixture(scope="module")
def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_load", MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("tokens", "chunks", "finish", "problem"),
    [
        (16, 16, "length", None),
        (5, 3, "stop", None),  # EOS after 5 tokens; partial characters held back merged chunks
        (None, 16, "length", "no usage chunk"),
        (16, 16, None, "no finish_reason"),
        (17, 16, "length", "usage says 17 completion tokens, max_tokens is 16"),
        (0, 0, "stop", "usage says 0 completion tokens, max_tokens is 16"),
        (12, 12, "length", "finish_reason length after 12 of 16 tokens"),
        (6, 7, "stop", "7 text chunks for 6 tokens"),
    ],
)
def test_usage_problems_are_named(
    load: ModuleType, tokens: int | None, chunks: int, finish: str | None, problem: str | None
) -> None:
    assert load.usage_problem(tokens, chunks, finish, max_tokens=16) == problem


def test_rates_exclude_the_first_token_and_failed_requests(load: ModuleType) -> None:
    record = load.RequestRecord(start=10.0, end=12.0, ttft_s=0.5, tokens=31)
    assert record.latency_s == 2.0
    assert record.decode_tok_s == pytest.approx(30 / 1.5)
    assert load.RequestRecord(10.0, 12.0, 0.5, 31, error="no usage chunk").decode_tok_s is None
    assert load.RequestRecord(10.0, 12.0, 0.5, 1).decode_tok_s is None
    window = load.Window(clients=2, start=10.0, records=[record, load.RequestRecord(10.0, 14.0, 0.2, 9)])
    assert (window.seconds, window.tokens, window.tok_s) == (4.0, 40, 10.0)


def test_distribution_interpolates_percentiles(load: ModuleType) -> None:
    stats = load.distribution([float(v) for v in range(1, 102)])  # 1..101
    assert (stats["p50"], stats["p99"], stats["min"], stats["max"], stats["n"]) == (
        51.0,
        100.0,
        1.0,
        101.0,
        101,
    )
    assert load.distribution([]) is None
    summary = load.load_summary([load.Window(1, 0.0, [load.RequestRecord(0.0, 1.0, None, 0, error="E: x")])])
    assert (summary["requests"], summary["errors"], summary["error_examples"]) == (1, 1, ["E: x"])
    assert summary["latency_s"] is None and summary["decode_tok_s_values"] == []
