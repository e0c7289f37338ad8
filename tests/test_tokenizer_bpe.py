"""Byte-level BPE: exact round trip, reserved ids, Ethiopic pre-tokenization, determinism, HF loading."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, pre_tokenizers, processors

from fidellm.data.split_files import read_split_file, split_files
from fidellm.errors import FidelError
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.bpe import (
    BPETokenizer,
    sample_train_split,
    train_bpe,
    train_from_run,
    truncate_bpe,
)
from fidellm.tokenizer.special import BOS, IM_END, IM_START, RESERVED_TOKENS, TOOL_TOKENS
from fixtures.tokenizer.build_run import build_run

VOCAB = 1024


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def trained(run_dir: Path) -> BPETokenizer:
    tokenizer = train_from_run(run_dir, VOCAB, sample_mb=None, show_progress=False)
    tokenizer.save(run_dir / "tokenizer")
    return tokenizer


def flores_raw_lines() -> list[str]:
    """Every line of FLORES-200 Amharic dev and devtest exactly as in the files (not stripped)."""
    lines: list[str] = []
    for name in ("amh_Ethi.dev", "amh_Ethi.devtest"):
        lines += (resolve_data_dir() / "flores200" / name).read_text(encoding="utf-8").split("\n")
    return lines


def test_reserved_tokens_have_fixed_ids_and_flags(trained: BPETokenizer) -> None:
    added = trained.hf.get_added_tokens_decoder()
    assert [(added[t.id].content, added[t.id].special) for t in RESERVED_TOKENS] == [
        ("<|bos|>", True),
        ("<|pad|>", True),
        ("<|im_start|>", True),
        ("<|im_end|>", True),
        ("<tool_call>", False),
        ("</tool_call>", False),
        ("<tool_response>", False),
        ("</tool_response>", False),
    ]
    assert (trained.bos_id, trained.eos_id, trained.pad_id) == (0, 0, 1)
    assert trained.vocab_size == VOCAB
    for token in TOOL_TOKENS:
        assert trained.encode(token) == [trained.hf.token_to_id(token)]


def test_tokenizer_json_has_no_normalizer_and_adds_bos(trained: BPETokenizer, run_dir: Path) -> None:
    data = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["normalizer"] is None
    assert data["post_processor"]["type"] == "TemplateProcessing"
    assert data["model"]["type"] == "BPE"
    text = "ሰላም ለዓለም።"
    assert trained.encode(text, add_bos=True) == [0, *trained.encode(text)]
    assert trained.decode(trained.encode(text, add_bos=True), skip_special_tokens=True) == text


def test_all_256_bytes_in_vocabulary(trained: BPETokenizer) -> None:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256
    vocab = trained.hf.get_vocab()
    assert all(char in vocab for char in alphabet)
    assert sorted(vocab[char] for char in alphabet) == list(range(8, 264))  # right after the reserved ids


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
@example("")
@example(" ")
@example("   \n\n \t ")
@example("𝕏😀🇪🇹 𐍈 \U0010fffd")
@example("e\u0301 ሀ\u135d ्क")
@example("\x00\x01\x1b[0m\x7f\u200b\ufeff")
@example("\r\n\r")
@example("<|bos|> <|im_start|>user\nሰላም<|im_end|> <tool_call>{}</tool_call>")
@example("ቃል፡ቃል፡፡ 12,345.67 ፲፱፻")
def test_round_trip_any_string(trained: BPETokenizer, text: str) -> None:
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert b"".join(trained.token_bytes(i) for i in ids) == text.encode("utf-8")  # token by token


def test_token_bytes_are_parts_of_characters_and_skip_control_tokens(trained: BPETokenizer) -> None:
    """Every id's bytes decode (lossily) as the id alone does (partial characters included); special
    tokens give none when skipped, as in `decode`."""
    for token in range(trained.vocab_size):
        assert trained.token_bytes(token).decode("utf-8", errors="replace") == trained.decode([token])
    ids = trained.encode("<|im_start|>ሰላም<tool_call>", add_bos=True)
    assert (
        b"".join(trained.token_bytes(i, skip_special_tokens=True) for i in ids) == "ሰላም<tool_call>".encode()
    )
    assert trained.token_bytes(trained.vocab_size + 5) == b""  # dropped by decode too


def test_round_trip_every_flores_line(trained: BPETokenizer) -> None:
    lines = flores_raw_lines()
    assert len([line for line in lines if line.strip()]) == 2009
    for ids, line in zip(trained.encode_batch(lines), lines, strict=True):
        assert trained.decode(ids) == line
    assert trained.encode_batch(lines[:50]) == [trained.encode(line) for line in lines[:50]]


def pieces(tokenizer: BPETokenizer, text: str) -> list[str]:
    """Pre-tokenizer pieces of `text`, mapped back from the byte-level alphabet to text."""
    decoder = decoders.ByteLevel()
    return [decoder.decode([piece]) for piece, _ in tokenizer.hf.pre_tokenizer.pre_tokenize_str(text)]


def test_pre_tokenization_suits_ethiopic(trained: BPETokenizer) -> None:
    assert pieces(trained, "ሰላም፣ ዓለም። ቃል፡ቃል፤ እንዴት ነህ፧") == [
        "ሰላም", "፣", " ዓለም", "።", " ቃል", "፡", "ቃል", "፤", " እንዴት", " ነህ", "፧",
    ]  # fmt: skip
    assert pieces(trained, "በ2016 ዓ.ም") == ["በ", "2", "0", "1", "6", " ዓ", ".", "ም"]
    assert pieces(trained, "፠ ፥፦፨") == ["፠", " ፥፦፨"]
    assert pieces(trained, "a  b\n\nc") == ["a", " ", " b", "\n", "\n", "c"]  # GPT-2 whitespace rules


def test_training_is_deterministic(run_dir: Path, trained: BPETokenizer) -> None:
    again = train_from_run(run_dir, VOCAB, sample_mb=None, show_progress=False)
    assert again.fingerprint() == trained.fingerprint()
    assert again.hf.to_str() == trained.hf.to_str()


@pytest.mark.parametrize("size", [512, 576, 960])
def test_cutting_a_larger_bpe_equals_training_at_that_size(
    run_dir: Path, trained: BPETokenizer, size: int
) -> None:
    cut = truncate_bpe(trained, size)
    direct = train_from_run(run_dir, size, sample_mb=None, show_progress=False)
    assert cut.hf.to_str() == direct.hf.to_str()  # same ids, merges, added tokens and pipeline
    assert cut.vocab_size == size and cut.fingerprint() == direct.fingerprint()
    assert cut.meta["vocab_size_requested"] == size and cut.meta["cut_from_vocab_size"] == VOCAB
    line = "ኢትዮጵያ በምሥራቅ አፍሪካ 2024 ዓ.ም. ትገኛለች።"
    assert cut.encode(line) == direct.encode(line) and cut.decode(cut.encode(line)) == line


def test_cutting_to_the_same_or_a_bad_size(trained: BPETokenizer) -> None:
    assert truncate_bpe(trained, VOCAB) is trained and truncate_bpe(trained, 2 * VOCAB) is trained
    with pytest.raises(FidelError, match="multiple of 64"):
        truncate_bpe(trained, 600)


def test_save_and_load_round_trip(trained: BPETokenizer, run_dir: Path) -> None:
    loaded = load_tokenizer(run_dir / "tokenizer")
    assert isinstance(loaded, BPETokenizer)
    assert loaded.fingerprint() == trained.fingerprint()
    assert loaded.meta["training"]["docs"] == trained.meta["training"]["docs"]
    assert loaded.meta["gguf_pre"] == "starcoder"


def test_loads_in_transformers_with_same_ids(trained: BPETokenizer, run_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = run_dir / "tokenizer"
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    assert config["clean_up_tokenization_spaces"] is False
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, BOS, "<|pad|>")
    assert (hf.bos_token_id, hf.pad_token_id) == (0, 1)
    lines = [line for line in flores_raw_lines() if line]
    for line in lines:
        encoded = hf(line)
        assert set(encoded) == {"input_ids", "attention_mask"}
        assert encoded["input_ids"] == trained.encode(line, add_bos=True)
        assert hf.decode(encoded["input_ids"], skip_special_tokens=True) == line
    chat = f'{IM_START}assistant\n<tool_call>{{"name": "f"}}</tool_call>{IM_END}'
    ids = hf(chat, add_special_tokens=False)["input_ids"]
    assert ids == trained.encode(chat)
    assert hf.decode(ids, skip_special_tokens=True) == 'assistant\n<tool_call>{"name": "f"}</tool_call>'
    assert hf.decode(ids) == chat


def test_vocab_size_must_be_multiple_of_64() -> None:
    with pytest.raises(FidelError, match="multiple of 64"):
        train_bpe(["ሰላም"], vocab_size=1000, show_progress=False)


def test_sample_respects_budget_and_weights(run_dir: Path) -> None:
    everything = sample_train_split(run_dir, None)
    half = sample_train_split(run_dir, everything.bytes / 2e6)
    assert half.bytes <= everything.bytes / 2 and half.docs < everything.docs
    assert half.bytes == sum(len(text.encode("utf-8")) for text in half)
    assert sample_train_split(run_dir, everything.bytes / 2e6).threshold == half.threshold
    docs = [doc for path in split_files(run_dir, "train") for doc in read_split_file(path)]
    weighted = [doc for doc in docs if doc.weight > 0]
    assert len(weighted) < len(docs)
    assert everything.docs == everything.total_docs == len(weighted)  # weight-0 documents never count
    assert sorted(everything) == sorted(doc.text for doc in weighted)


def test_missing_split_and_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(FidelError, match="does not exist"):
        train_from_run(tmp_path, VOCAB, show_progress=False)
    with pytest.raises(FidelError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FidelError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path)
    foreign = train_bpe(["ሰላም ለዓለም"] * 10, vocab_size=512, show_progress=False)
    data = json.loads(foreign.hf.to_str())
    data["added_tokens"][0]["content"] = "<s>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(FidelError, match="should be '<\\|bos\\|>'"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_without_the_chat_tokens_is_named(tmp_path: Path) -> None:
    data = json.loads(train_bpe(["ሰላም ለዓለም"] * 10, vocab_size=512, show_progress=False).hf.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|im_start|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(FidelError) as error:
        load_tokenizer(tmp_path)
    assert str(error.value).startswith(
        f"{tmp_path / 'tokenizer.json'}: id 2 should be '<|im_start|>' (special=True), found no added token"
    )


def test_encoding_a_long_text_lets_other_threads_run(trained: BPETokenizer) -> None:
    """`encode` releases the GIL while it works (`tokenizers`' single-sequence encode holds it for the
    whole call): the server tokenizes a prompt of megabytes in a worker thread while its event loop goes
    on answering. Here the loop ticks all along the encoding, not just before and after it."""
    text = "\n".join(flores_raw_lines()) * 3

    async def ticks_while_encoding() -> tuple[int, list[int]]:
        encoding = asyncio.ensure_future(asyncio.to_thread(trained.encode, text))
        ticks = 0
        while not encoding.done():
            await asyncio.sleep(0.005)
            ticks += 1
        return ticks, await encoding

    ticks, ids = asyncio.run(ticks_while_encoding())
    assert trained.decode(ids) == text
    assert ticks >= 10, ticks


@pytest.mark.parametrize("bos_last", [False, True])
def test_a_tokenizer_whose_add_bos_adds_no_leading_bos_is_named(tmp_path: Path, bos_last: bool) -> None:
    """Without the BOS post-processor, encode(add_bos=True) silently gave no BOS: every token shard
    document started without one and document boundaries vanished."""
    hf = train_bpe(["ሰላም ለዓለም"] * 10, vocab_size=512, show_progress=False).hf
    hf.post_processor = (
        processors.TemplateProcessing(single="$A <|bos|>", special_tokens=[("<|bos|>", 0)])
        if bos_last
        else processors.ByteLevel(trim_offsets=False)
    )
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(FidelError) as error:
        load_tokenizer(tmp_path)
    assert str(error.value).startswith(
        f"{tmp_path / 'tokenizer.json'}: its post-processor does not put <|bos|> (alone) before the text"
    )
