"""What `fidellm sft` accepts in its conversation files: OpenAI content parts, rendered as the chat
template renders them, and clear errors naming file, line and field for what it cannot train on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fidellm.chat.template import encode_chat, render_chat
from fidellm.cli import cli
from fidellm.errors import FidelError
from fidellm.export.hf import export_hf
from fidellm.sft.cli import removed_on_failure
from fidellm.sft.data import encode_conversation, read_conversations
from fidellm.tokenizer.bpe import BPETokenizer
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.tokenizer.special import IM_END
from fixtures.bpe import flores_bpe
from fixtures.models import gqa_config, random_llama


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bpe")
    flores_bpe(directory, 512, lines=300)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> BPETokenizer:
    return BPETokenizer.load(tokenizer_dir)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def parts(*texts: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": text} for text in texts]


PARTS_CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": parts("አጭር መልስ ስጥ።")},
    {"role": "user", "content": parts("ሰላም", "እንዴት ነህ?")},
    {"role": "assistant", "content": parts("ደህና ነኝ።", "አንተስ?")},
]


def test_text_parts_train_on_the_text_the_template_renders(tokenizer: BPETokenizer, tmp_path: Path) -> None:
    """Parts are joined with "\\n" exactly as the template joins them, and the loss mask covers that
    assistant text through its `<|im_end|>`, nothing of the user's parts."""
    path = write_jsonl(tmp_path / "train.jsonl", [{"id": "p", "messages": PARTS_CHAT}])
    [record] = read_conversations(path)
    assert [m["content"] for m in record["messages"]] == ["አጭር መልስ ስጥ።", "ሰላም\nእንዴት ነህ?", "ደህና ነኝ።\nአንተስ?"]
    ids, mask = encode_conversation(tokenizer, record["messages"], None, "p")
    assert ids == encode_chat(tokenizer, render_chat(PARTS_CHAT))  # the template's own rendering of parts
    trained = [i for i, bit in zip(ids, mask, strict=True) if bit]
    assert tokenizer.decode(trained) == "ደህና ነኝ።\nአንተስ?" + IM_END
    assert "".join(map(str, mask)).strip("0") == "1" * len(trained)  # one run: the assistant's turn


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ([{"type": "image_url", "image_url": {"url": "p"}}], "messages[1].content[0].type is 'image_url'"),
        ([{"type": "text", "text": "ሀ"}, "ለ"], "messages[1].content[1] is str, not a content part object"),
        ([{"type": "text", "text": 3}], "messages[1].content[0].text is int, not a string"),
        ([], "messages[1].content is empty"),
    ],
)
def test_other_parts_are_named_by_file_line_and_field(tmp_path: Path, content: list[Any], field: str) -> None:
    good = {"id": "ok", "messages": [{"role": "user", "content": "ሀ"}, {"role": "assistant", "content": "ለ"}]}
    messages = [{"role": "system", "content": "ሐ"}, {"role": "user", "content": content}]
    bad = {"id": "bad", "messages": [*messages, {"role": "assistant", "content": "መ"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [good, bad])
    with pytest.raises(FidelError) as error:
        read_conversations(path)
    assert str(error.value).startswith(f"{path}:2: conversation bad: {field}")


def test_sft_data_renders_each_whole_conversation_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading and tokenising a chat file renders each whole conversation once (its encoding is also its
    template check); only the prefixes that place an assistant turn's start are rendered besides."""
    import fidellm.chat.schema
    import fidellm.sft.data

    rendered: list[tuple[int, bool]] = []

    def counting(messages: Any, tools: Any = None, add_generation_prompt: bool = False) -> str:
        rendered.append((len(messages), add_generation_prompt))
        return render_chat(messages, tools, add_generation_prompt)

    for module in (fidellm.chat.schema, fidellm.sft.data):
        monkeypatch.setattr(module, "render_chat", counting)
    chat = [{"role": "user", "content": "ሰላም"}, {"role": "assistant", "content": "ሰላም ነው።"}]
    for name in ("train", "eval"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"id": f"{name}{i}", "messages": chat} for i in range(3)])
    _, _, counts = fidellm.sft.data.chat_data(tmp_path, ByteTokenizer(), 64, 1, 0, 1)
    assert counts["train"]["conversations"] + counts["eval"]["conversations"] == 6
    assert rendered.count((2, False)) == 6  # the whole chat, once each
    assert rendered.count((1, True)) == 6 and len(rendered) == 12  # the prompt before the answer


@pytest.fixture(scope="module")
def base(tokenizer: BPETokenizer, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported random Llama with the module's tokenizer, to fine-tune."""
    directory = tmp_path_factory.mktemp("base")
    config = gqa_config(vocab_size=tokenizer.vocab_size, num_hidden_layers=1, max_position_embeddings=128)
    return export_hf(random_llama(config), config, tokenizer_dir, directory / "model", "float32")


@pytest.mark.parametrize("given", ["new/nested/sft", "mine"])
def test_a_failed_sft_leaves_no_output_it_created(base: Path, tmp_path: Path, given: str) -> None:
    """A conversation file refused after OUTPUT/tokenizer was written leaves nothing of the run behind:
    a new OUTPUT (and the parents made for it) is removed, a directory the user had stays as it was."""
    run = tmp_path / "run"
    (run / "chat").mkdir(parents=True)
    chat = [{"role": "user", "content": "ሰላም"}, {"role": "assistant", "content": "ሰላም ነው።"}]
    good = [{"id": f"g{i}", "messages": chat} for i in range(4)]
    write_jsonl(run / "chat" / "eval.jsonl", good)
    write_jsonl(run / "chat" / "train.jsonl", [*good, {"id": "bad", "messages": [{"role": "user"}]}])
    output = tmp_path / given
    if given == "mine":
        (output / "notes").mkdir(parents=True)
    args = ["sft", str(run), "--base", str(base), "--output-dir", str(output), "--device", "cpu"]
    args += ["--seq-len", "64", "--batch-size", "1", "--eval-batches", "1"]
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, FidelError)
    assert str(result.exception).startswith(f"{run / 'chat' / 'train.jsonl'}:5: conversation bad:")
    if given == "mine":
        assert [p.name for p in output.iterdir()] == ["notes"]
    else:
        assert not (tmp_path / "new").exists()
    write_jsonl(run / "chat" / "train.jsonl", good)  # fixed: the rerun trains where the first failed
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (output / "tokenizer").is_dir() and (output / "train" / "checkpoints").is_dir()


def test_a_failed_sft_that_saved_a_checkpoint_is_kept_for_its_resume(tmp_path: Path) -> None:
    output = tmp_path / "sft"
    with pytest.raises(FidelError), removed_on_failure(output):
        (output / "tokenizer").mkdir(parents=True)
        (output / "train" / "checkpoints" / "step_00000001").mkdir(parents=True)
        raise FidelError("non-finite loss")
    assert sorted(p.name for p in output.iterdir()) == ["tokenizer", "train"]


def test_an_interrupted_sft_keeps_its_logs(tmp_path: Path) -> None:
    """Ctrl-C (or a crash) before the first checkpoint is not a refusal: the metrics stay to be read."""
    output = tmp_path / "sft"
    with pytest.raises(KeyboardInterrupt), removed_on_failure(output):
        (output / "train").mkdir(parents=True)
        (output / "train" / "metrics.jsonl").write_text("{}\n")
        raise KeyboardInterrupt
    assert (output / "train" / "metrics.jsonl").is_file()
