"""Bad input to `fidellm data chat`, `fidellm sft` and `fidellm chat` is one clear error line (exit code
2) that says what to change, never a traceback, a silent no-op or an option quietly ignored."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fidellm.chat.session import ChatSession, read_tools
from fidellm.chat.template import encode_chat, render_chat
from fidellm.cli import main
from fidellm.errors import FidelError
from fidellm.generate.config import GenerationConfig
from fidellm.sft.data import chat_data
from fidellm.tokenizer.bytes import ByteTokenizer
from fixtures.cli import fails_with


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
        f"{chat / 'eval.jsonl'}: no conversations to validate on; make the chat data again with a larger"
        " `fidellm data chat --eval-split` (0 puts none there)"
    )


class ContextOnly(nn.Module):
    """A model as far as ChatSession looks before generating: a config with its context length."""

    def __init__(self, context: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=256, max_position_embeddings=context, eos_token_id=None)


def test_chat_max_new_tokens_that_leave_no_room_are_refused_at_start() -> None:
    """Not at every message, with advice to shorten a message that is not the problem."""
    tokenizer = ByteTokenizer()
    empty = [{"role": "user", "content": ""}]
    floor = len(encode_chat(tokenizer, render_chat(empty, add_generation_prompt=True)))
    fits = GenerationConfig(max_new_tokens=64 - floor)
    assert ChatSession(ContextOnly(64), tokenizer, fits).context == 64
    with pytest.raises(FidelError) as error:
        ChatSession(ContextOnly(64), tokenizer, GenerationConfig(max_new_tokens=64))
    assert str(error.value) == (
        f"--max-new-tokens 64 leaves no room for a message: the chat prompt takes {floor} tokens before"
        f" any message is typed, and the model's context is 64 tokens; use --max-new-tokens {64 - floor}"
        " or less"
    )
    with pytest.raises(FidelError, match=r"; shorten the system prompt or the tools$"):
        ChatSession(ContextOnly(64), tokenizer, fits, system="ሰላም" * 30)


def test_sft_rerun_with_nothing_to_train_prints_no_nan_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished run resumed at its last step evaluates nothing: no "val loss nan" is printed."""
    import fidellm.sft.cli
    import fidellm.train.loop

    checkpoint = str(tmp_path / "sft" / "train" / "checkpoints" / "step_00000002")
    monkeypatch.setattr(fidellm.sft.cli, "prepare_output", lambda output, base: None)
    monkeypatch.setattr(
        fidellm.train.loop, "train", lambda output, config: {"step": 2, "checkpoint": checkpoint}
    )
    main(["sft", str(tmp_path), "--base", str(tmp_path), "--device", "cpu"])
    assert capsys.readouterr().out == f"step 2: checkpoint {checkpoint}\n"


def test_a_lora_checkpoint_points_to_the_merged_model(tmp_path: Path) -> None:
    """`fidellm chat|generate|export OUTPUT` on a LoRA SFT run: its checkpoints hold adapters, not plain
    weights; the error says where the merged model is instead of listing mismatched weight names."""
    from fidellm.models.factory import config_to_dict
    from fidellm.models.load import load_model
    from fidellm.sft.lora import lora_spec
    from fixtures.models import gqa_config

    step = tmp_path / "sft" / "train" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    state = {
        "step": 1,
        "model_config": config_to_dict(gqa_config()),
        "train_config": {"lora": lora_spec(4, 8.0)},
    }
    (step / "state.json").write_text(json.dumps(state), encoding="utf-8")
    ByteTokenizer().save(tmp_path / "sft" / "tokenizer")
    for path in (tmp_path / "sft", step):
        with pytest.raises(FidelError) as error:
            load_model(path)
        assert str(error.value) == (
            f"{step}: LoRA adapters, not a whole model: use the merged model {tmp_path / 'sft' / 'merged'}"
            " (`fidellm sft` writes it unless --no-merge)"
        )


def test_the_best_weights_of_a_lora_run_point_to_the_merged_model(tmp_path: Path) -> None:
    """RUN/train/best of a LoRA SFT run keeps no train_config: its adapter weight names tell."""
    from safetensors.torch import save_file

    from fidellm.models.factory import config_to_dict
    from fidellm.models.load import load_model
    from fixtures.models import gqa_config

    best = tmp_path / "sft" / "train" / "best"
    best.mkdir(parents=True)
    state = {"step": 1, "model_config": config_to_dict(gqa_config())}
    (best / "state.json").write_text(json.dumps(state), encoding="utf-8")
    save_file(
        {"model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(4, 8)},
        best / "model.safetensors",
    )
    ByteTokenizer().save(tmp_path / "sft" / "tokenizer")
    with pytest.raises(FidelError, match=rf"^{best}: LoRA adapters, not a whole model: use the merged model"):
        load_model(best)


def test_data_chat_summary_lines_add_up_for_translation_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pair gives two conversations: the line shows them, so read = accepted + rejected and
    conversations = dropped + kept can both be checked on it (dropped alone exceeded read)."""
    main(["data", "chat", str(tmp_path), "--sources", "marspanther_am_en_parallel", "--max-samples", "3"])
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("marspanther"))
    numbers = dict(re.findall(r"(read|rejected|accepted|conversations|dropped|kept) +([\d,]+)", line))
    count = {key: int(value.replace(",", "")) for key, value in numbers.items()}
    assert count["read"] == count["accepted"] + count["rejected"]
    assert count["conversations"] == 2 * count["accepted"] == count["dropped"] + count["kept"]
    assert count["kept"] == 3


def test_chat_system_prompt_that_is_not_utf8_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --system argument with a byte that is not UTF-8 (a lone surrogate in argv): refused before the
    model loads, not a TypeError from `tokenizers` at the first message."""
    err = fails_with(["chat", str(tmp_path), "--system", "አንተ\udcff"], capsys)
    assert err.startswith("error: --system is not valid UTF-8 (byte 0xff at character 4); check the encoding")


def test_chat_files_with_a_lone_surrogate_are_refused_not_a_crash_at_the_next_reply(tmp_path: Path) -> None:
    """JSON can escape a lone surrogate; /load and --tools refuse it (naming the file and field) instead of
    the tokenizer raising TypeError at the next reply, which ended the chat with a traceback."""
    session = ChatSession(ContextOnly(2048), ByteTokenizer(), GenerationConfig(max_new_tokens=8))
    saved = tmp_path / "saved.json"
    for state, field in [
        ({"system": "\udcff", "messages": []}, "system"),
        ({"messages": [{"role": "user", "content": "ሰላም \ud83d"}]}, "messages[0].content"),
    ]:
        saved.write_text(json.dumps({"format": "fidellm-chat", "version": 1, **state}), encoding="utf-8")
        with pytest.raises(FidelError) as error:
            session.load(saved)
        assert str(error.value).startswith(f"{saved}: field '{field}' holds the lone surrogate \\u")
        assert session.messages == [] and session.system is None
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "f\ud83d"}}]), encoding="utf-8")
    with pytest.raises(FidelError, match=r"field '\[0\]\.function\.name' holds the lone surrogate \\ud83d"):
        read_tools(tools)


def test_output_directories_under_a_file_are_named_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`data chat RUN` and `sft --output-dir` where a folder on the way is a file: one line, no
    NotADirectoryError traceback."""
    (tmp_path / "a file").write_text("", encoding="utf-8")
    run = tmp_path / "a file" / "run"
    err = fails_with(["data", "chat", str(run), "--sources", "fastchat_dummy_conversation"], capsys)
    assert err.startswith(f"error: {run / 'chat'}: cannot create {run / 'chat.partial'}: Not a directory")
    assert prepare_output_error(tmp_path / "a file" / "sft") == (
        f"--output-dir {tmp_path / 'a file' / 'sft'}: cannot create it: Not a directory"
    )


def prepare_output_error(output: Path) -> str:
    """The FidelError `prepare_output` raises for `output`, with a random base model to read."""
    from fidellm.export.hf import export_hf
    from fidellm.sft.cli import prepare_output
    from fixtures.bpe import flores_bpe
    from fixtures.models import gqa_config, random_llama

    tokenizer = output.parents[1] / "tokenizer"
    flores_bpe(tokenizer, 512, lines=100)
    config = gqa_config(vocab_size=512)
    export_hf(random_llama(config), config, tokenizer, output.parents[1] / "base", dtype="float32")
    with pytest.raises(FidelError) as error:
        prepare_output(output, str(output.parents[1] / "base"))
    return str(error.value)
