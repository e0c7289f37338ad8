"""Bad input to `fidellm tokenizer train|report` is one clear error line (exit code 2), never a traceback,
and is refused before minutes of training are spent."""

from __future__ import annotations

from pathlib import Path

import pytest

from fidellm.cli import main
from fidellm.paths import resolve_data_dir
from fixtures.cli import fails_with
from fixtures.tokenizer.build_run import write_split


@pytest.fixture
def small_run(tmp_path: Path) -> Path:
    """A run with a tiny train split of real FLORES Amharic lines."""
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    docs = [
        {"text": line, "id": f"flores/{i}", "metadata": {"source": "flores200", "weight": 1.0}}
        for i, line in enumerate(lines[:200])
    ]
    write_split(tmp_path / "run", "train", docs, files=1)
    return tmp_path / "run"


@pytest.mark.parametrize("command", ["train", "report"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_sample_size_that_is_no_number_of_mb_is_refused(
    small_run: Path, capsys: pytest.CaptureFixture[str], command: str, value: str
) -> None:
    args = ["tokenizer", command, str(small_run), "--sample-mb", value, "--quiet"]
    if command == "train":
        args += ["--vocab-size", "512"]
    else:
        args += ["--vocab-sizes", "512"]
    assert fails_with(args, capsys).startswith(
        f"error: --sample-mb must be a finite number of MB (0 = all of it), got {value}"
    )


def test_an_output_directory_that_cannot_be_made_is_refused_before_training(
    small_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a file").write_text("not a directory\n", encoding="utf-8")
    out = tmp_path / "a file" / "tokenizer"
    for kind in ("bpe", "bytes"):
        args = [
            "tokenizer",
            "train",
            str(small_run),
            "--kind",
            kind,
            "--vocab-size",
            "512",
            "--out",
            str(out),
        ]
        err = fails_with([*args, "--quiet"], capsys)
        assert (
            err
            == f"error: {out}: cannot write the tokenizer there: {out.parent} is a file, not a directory\n"
        )
    (small_run / "tokenizer").write_text("", encoding="utf-8")  # the default RUN/tokenizer
    err = fails_with(["tokenizer", "train", str(small_run), "--vocab-size", "512", "--quiet"], capsys)
    assert err.endswith(f"{small_run / 'tokenizer'} is a file, not a directory\n")


def test_a_flores_file_that_is_not_utf8_is_named_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flores = resolve_data_dir() / "flores200"
    data = tmp_path / "data"
    (data / "flores200").mkdir(parents=True)
    (data / "flores200" / "amh_Ethi.dev").write_bytes((flores / "amh_Ethi.dev").read_bytes())
    (data / "flores200" / "amh_Ethi.devtest").write_bytes("ሰላም\nዓለም\xa0\n".encode() + b"\xff\xfe bad\n")
    (tmp_path / "bytes").mkdir()
    (tmp_path / "bytes" / "fidellm_tokenizer.json").write_text(
        '{"kind": "bytes", "vocab_size": 256, "bos_id": 254, "eos_id": 255, "pad_id": 255}', encoding="utf-8"
    )
    args = ["tokenizer", "report", str(tmp_path / "bytes"), "--vocab-sizes", "none", "--data-dir", str(data)]
    assert fails_with(args, capsys) == (
        f"error: {data / 'flores200' / 'amh_Ethi.devtest'}:3: not UTF-8 (invalid start byte at byte 22)\n"
    )


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--vocab-size", "512"], "--vocab-size"),
        (["--sample-mb", "1", "--vocab-size", "512"], "--vocab-size, --sample-mb"),
    ],
)
def test_bpe_options_with_the_byte_tokenizer_are_refused_not_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], named: str
) -> None:
    err = fails_with(["tokenizer", "train", str(tmp_path), "--kind", "bytes", *options], capsys)
    assert err == f"error: {named} apply to --kind bpe only: the byte tokenizer always has 256 ids\n"
    assert not (tmp_path / "tokenizer").exists()


def test_report_says_when_the_asked_sweep_cannot_run(
    small_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tokenizer directory outside a run has no train split to train the sweep on: the command says
    so, instead of printing the other rows as if --vocab-sizes had been honoured."""
    main(
        [
            "tokenizer",
            "train",
            str(small_run),
            "--vocab-size",
            "512",
            "--out",
            str(tmp_path / "alone"),
            "--quiet",
        ]
    )
    capsys.readouterr()
    main(["tokenizer", "report", str(tmp_path / "alone"), "--vocab-sizes", "512", "--quiet"])
    out = capsys.readouterr().out
    assert (
        f"vocabulary sweep skipped: no run directory with data/splits/train next to {tmp_path / 'alone'}"
        in out
    )
