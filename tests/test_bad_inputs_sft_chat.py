"""Bad input to `fidellm data chat`, `fidellm sft` and `fidellm chat` is one clear error line (exit code
2) that says what to change, never a traceback, a silent no-op or an option quietly ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fidellm.cli import main
from fidellm.errors import FidelError
from fidellm.sft.data import chat_data
from fidellm.tokenizer.bytes import ByteTokenizer


def fails_with(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one stderr line `fidellm ARGS` prints when it exits with code 2."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("sources", [",", " , ", ""])
def test_data_chat_sources_naming_no_source_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sources: str
) -> None:
    err = fails_with(["data", "chat", str(tmp_path / "run"), "--sources", sources], capsys)
    assert err == f"error: --sources {sources!r} names no source; leave it out for the default sources\n"
    assert not (tmp_path / "run" / "chat").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [("--lora-alpha", "nan"), ("--lora-alpha", "inf"), ("--lora-alpha", "0"), ("--lora-rank", "0")],
)
def test_sft_lora_settings_out_of_range_are_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    args = ["sft", str(tmp_path), "--base", str(tmp_path / "none"), "--use-lora", option, value]
    err = fails_with(args, capsys)
    assert err.startswith("error: LoRA: rank must be >= 1, alpha a finite number > 0 and dropout in [0, 1)")
    assert f"{option.removeprefix('--lora-')} {float(value) if 'alpha' in option else value}" in err


@pytest.mark.parametrize(
    "options",
    [["--lora-rank", "4"], ["--lora-targets", "q_proj"], ["--full", "--lora-alpha", "8", "--no-merge"]],
)
def test_sft_lora_options_without_lora_are_refused_not_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str]
) -> None:
    err = fails_with(["sft", str(tmp_path), "--base", str(tmp_path / "none"), *options], capsys)
    named = ", ".join(option for option in options if option.startswith(("--lora", "--no-merge")))
    assert err == (
        f"error: {named} apply to LoRA only, and this is full fine-tuning: add --use-lora (or --qlora),"
        " or leave them out\n"
    )
    assert not (tmp_path / "sft").exists()


def test_sft_with_an_empty_eval_file_says_so(tmp_path: Path) -> None:
    """`data chat --eval-split 0` writes an empty eval.jsonl: the error names it, instead of telling the
    user to raise --seq-len."""
    chat = tmp_path / "chat"
    chat.mkdir()
    record = {
        "id": "c1",
        "messages": [{"role": "user", "content": "ሰላም"}, {"role": "assistant", "content": "ሰላም ነው።"}],
    }
    (chat / "train.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    (chat / "eval.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(FidelError) as error:
        chat_data(chat, ByteTokenizer(), seq_len=256, batch_size=1, seed=0, eval_batches=1)
    assert str(error.value) == (
        f"{chat / 'eval.jsonl'}: no conversations to validate on (`fidellm data chat --eval-split 0`"
        " writes none); make the chat data again with --eval-split > 0"
    )
