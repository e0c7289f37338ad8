"""Tokenizer report: FLORES counts, the vocabulary sweep, anchors labelled published, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import fidellm.tokenizer.bpe as bpe
from fidellm.errors import FidelError
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.tokenizer.cli import tokenizer as tokenizer_cli
from fidellm.tokenizer.report import (
    PUBLISHED_ANCHORS,
    build_report,
    flores_lines,
    locate,
    measure,
    run_normalization,
    write_report,
)
from fixtures.cli import fails_with
from fixtures.tokenizer.build_run import build_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("run"), articles=150, book_chunks=20)


def test_flores_lines_match_the_published_word_count() -> None:
    lines = flores_lines(resolve_data_dir())
    assert len(lines) == 2009
    assert sum(len(line.split()) for line in lines) == 34_221
    folded = flores_lines(resolve_data_dir(), fold_homophones=True)
    assert folded != lines and len(folded) == len(lines)


def test_measure_counts() -> None:
    row = measure("bytes", ByteTokenizer(), ["ሰላም ለዓለም", "ok"])
    assert (row.lines, row.words, row.chars, row.bytes, row.tokens) == (2, 3, 10, 24, 24)
    assert row.roundtrip_rate == 1.0 and row.bytes_per_token == 1.0
    assert row.tokens_per_word == 8.0


def test_report_sweep(run_dir: Path, tmp_path: Path) -> None:
    report = build_report(run_dir, (512, 1024), show_progress=False)
    names = [row["name"] for row in report["measured"]]
    assert names == ["bytes (UTF-8, 256 ids)", "BPE 512", "BPE 1024"]  # no tokenizer trained in this run yet
    rows = {row["name"]: row for row in report["measured"]}
    assert all(row["roundtrip_rate"] == 1.0 for row in rows.values())
    assert (
        rows["BPE 1024"]["tokens_per_word"]
        < rows["BPE 512"]["tokens_per_word"]
        < rows["bytes (UTF-8, 256 ids)"]["tokens_per_word"]
    )
    assert report["eval_set"]["words"] == 34_221 and report["eval_set"]["lines"] == 2009
    assert report["target"]["met"] is None
    assert report["sweep"]["trained_vocab_size"] == 1024  # trained once; 512 is cut out of it
    assert rows["BPE 512"]["train_seconds"] is None
    assert rows["BPE 1024"]["train_seconds"] == report["sweep"]["train_seconds"] > 0
    assert [a["name"] for a in report["published"]] == [a.name for a in PUBLISHED_ANCHORS]
    md_path, json_path = write_report(report, tmp_path)
    markdown = md_path.read_text(encoding="utf-8")
    assert "| published |" in markdown and "| measured |" in markdown and "not measured" in markdown
    assert "one training at 1,024 ids" in markdown
    assert json.loads(json_path.read_text(encoding="utf-8"))["measured"] == report["measured"]


def test_sweep_sample_zero_means_the_whole_train_split(run_dir: Path) -> None:
    sweep = build_report(run_dir, (512,), sample_mb=0, show_progress=False)["sweep"]
    assert sweep["sample_mb"] is None and sweep["training"]["docs"] == sweep["training"]["total_docs"] > 1
    part = build_report(run_dir, (512,), sample_mb=0.05, show_progress=False)["sweep"]["training"]
    assert 1 < part["docs"] < part["total_docs"]


def test_normalization_follows_the_run(tmp_path: Path) -> None:
    assert run_normalization(tmp_path)["from"] == "defaults"
    (tmp_path / "data").mkdir()
    config = {"config": {"normalize": {"fold_homophones": True, "fold_labialized": False}}}
    (tmp_path / "data" / "report.json").write_text(json.dumps(config))
    assert run_normalization(tmp_path)["fold_homophones"] is True
    (tmp_path / "data" / "report.json").write_text("{}")
    with pytest.raises(FidelError, match=r"config\.normalize"):
        run_normalization(tmp_path)


def test_locate(run_dir: Path, tmp_path: Path) -> None:
    assert locate(run_dir) == (None, run_dir)
    with pytest.raises(FidelError, match="neither a tokenizer directory nor a run directory"):
        locate(tmp_path)


def test_cli_train_then_report(tmp_path: Path) -> None:
    run_dir = build_run(tmp_path, articles=150, book_chunks=20)
    runner = CliRunner()
    trained = runner.invoke(tokenizer_cli, ["train", str(run_dir), "--vocab-size", "1024", "--quiet"])
    assert trained.exit_code == 0, trained.output
    assert "BPE with 1,024 ids" in trained.output
    assert locate(run_dir / "tokenizer") == (run_dir / "tokenizer", run_dir)
    reported = runner.invoke(tokenizer_cli, ["report", str(run_dir), "--vocab-sizes", "1024", "--quiet"])
    assert reported.exit_code == 0, reported.output
    report = json.loads((run_dir / "tokenizer" / "report.json").read_text(encoding="utf-8"))
    given, _, swept = report["measured"]
    assert given["name"] == "given tokenizer (bpe)"
    assert given["tokens"] == swept["tokens"]  # same text, same size: the same tokenizer
    bad = runner.invoke(tokenizer_cli, ["report", str(run_dir), "--vocab-sizes", "8k"])
    assert isinstance(bad.exception, FidelError)
    as_bytes = runner.invoke(tokenizer_cli, ["train", str(run_dir), "--kind", "bytes"])
    assert as_bytes.exit_code == 0, as_bytes.output
    assert isinstance(load_tokenizer(run_dir / "tokenizer"), ByteTokenizer)
    assert sorted(path.name for path in (run_dir / "tokenizer").iterdir()) == ["fidellm_tokenizer.json"]


@pytest.mark.parametrize(("sizes", "named"), [("512,512", "512"), ("1024, 512,1024,512", "512, 1024")])
def test_a_vocab_size_named_twice_is_refused(tmp_path: Path, capsys, sizes: str, named: str) -> None:
    """--vocab-sizes 512,512 measured (and listed) the BPE 512 row twice."""
    from fidellm.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["tokenizer", "report", str(tmp_path), "--vocab-sizes", sizes])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err == f"error: --vocab-sizes {sizes!r} names {named} more than once\n"


def test_sizes_beyond_what_the_sample_gives_are_not_measured_under_their_names(
    run_dir: Path, tmp_path: Path
) -> None:
    """A sweep size the training text cannot reach got a row named after it holding the smaller BPE (two
    rows of one tokenizer), and the sweep said it trained at the asked size."""
    report = build_report(run_dir, (512, 64000, 128000), sample_mb=0.05, show_progress=False)
    sweep = report["sweep"]
    reached = sweep["trained_vocab_size"]
    assert 512 < reached < 64000
    assert [row["name"] for row in report["measured"]] == ["bytes (UTF-8, 256 ids)", "BPE 512"]
    assert sweep["unreached"]["vocab_sizes"] == [64000, 128000]
    assert f"gives only {reached:,} ids" in sweep["unreached"]["reason"]
    markdown = write_report(report, tmp_path)[0].read_text(encoding="utf-8")
    assert f"one training at {reached:,} ids" in markdown and "Vocabulary sizes 64,000, 128,000:" in markdown
    run_copy = shutil.copytree(run_dir, tmp_path / "run")  # the report goes into RUN/tokenizer
    result = CliRunner().invoke(
        tokenizer_cli,
        ["report", str(run_copy), "--vocab-sizes", "512,64000", "--sample-mb", "0.05", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert f"vocabulary sizes 64,000: the training sample gives only {reached:,} ids" in result.output
    assert "BPE 64000" not in result.output


def test_flores_files_without_text_are_named(tmp_path: Path) -> None:
    """Blank FLORES files crashed the report with a ZeroDivisionError (tokens per word of no words)."""
    (tmp_path / "flores200").mkdir()
    (tmp_path / "flores200" / "amh_Ethi.dev").write_text("  \n\n", encoding="utf-8")
    (tmp_path / "flores200" / "amh_Ethi.devtest").write_text("", encoding="utf-8")
    with pytest.raises(FidelError, match=r"amh_Ethi\.dev and .*amh_Ethi\.devtest hold no text"):
        flores_lines(tmp_path)
    with pytest.raises(FidelError, match="no evaluation lines with text"):
        measure("bytes", ByteTokenizer(), ["", "  "])


def test_a_bad_sweep_size_is_refused_before_training(run_dir: Path, monkeypatch) -> None:
    """--vocab-sizes 1000,2048 trained the 2,048-id BPE (minutes at real sizes) and only then refused 1000."""

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the sizes")

    monkeypatch.setattr(bpe, "train_from_run", no_training)
    monkeypatch.setattr(bpe, "sample_train_split", no_training)
    with pytest.raises(FidelError, match="vocab size 1000 must be a multiple of 64"):
        build_report(run_dir, (1000, 2048), show_progress=False)


@pytest.mark.parametrize("skip", ["none", ""])
def test_a_sample_size_without_a_sweep_is_refused_not_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], skip: str
) -> None:
    err = fails_with(
        ["tokenizer", "report", str(tmp_path), "--vocab-sizes", skip, "--sample-mb", "5", "--quiet"], capsys
    )
    assert err == f"error: --sample-mb sizes the vocabulary sweep, which --vocab-sizes {skip!r} skips\n"


def test_train_says_when_the_text_gives_fewer_ids_than_asked(run_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        tokenizer_cli,
        ["train", str(run_dir), "--vocab-size", "64000", "--out", str(tmp_path / "t"), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    size = load_tokenizer(tmp_path / "t").vocab_size
    assert size < 64000
    assert f"BPE with {size:,} ids (not the 64,000 asked: the text has no more" in result.output
