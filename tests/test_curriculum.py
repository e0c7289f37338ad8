"""Curriculum learning: the complexity score, stages and schedule, the staged sampler (unlocked stages
only, every item once per pass, exact resume), pretraining and SFT wiring, and unchanged runs without
the flag."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fidellm.cli import cli
from fidellm.errors import FidelError
from fidellm.export.hf import export_hf
from fidellm.paths import resolve_data_dir
from fidellm.sft.data import (
    ConversationBatches,
    CurriculumConversations,
    Example,
    chat_data,
)
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.bpe import train_bpe
from fidellm.tokenizer.shards import COMPLEXITY_FILE, TokenShards, tokenize_splits
from fidellm.tokenizer.special import PAD_ID
from fidellm.train.config import TrainConfig
from fidellm.train.curriculum import (
    STAGES,
    StagedSampler,
    assign_stages,
    conversation_complexity,
    stage_boundaries,
    text_complexity,
    text_terms,
    unlock_draws,
    unlocked_stages,
    window_scores,
)
from fidellm.train.data import CurriculumWindows, PackedBatches, windows_to_tensors
from fidellm.train.loop import train
from fixtures.chats import WEATHER_TOOL, tool_chat
from fixtures.models import gqa_config, random_llama
from fixtures.train.build_run import build_flores_run, flores_lines

SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 32}  # fmt: skip


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return flores_lines()


# --- the score -------------------------------------------------------------------------------------


def test_score_is_bounded_and_deterministic(lines: list[str]) -> None:
    texts = ["", "   ", "።", "123 456", "😀" * 50, "ሀ", lines[0], "\n".join(lines[:400]), "a" * 5000,
             "ሰላም hello " * 300, "x. " * 1000]  # fmt: skip
    for text in texts:
        score = text_complexity(text)
        assert 0.0 <= score <= 100.0, (text[:20], score)
        assert all(0.0 <= value <= 1.0 for value in text_terms(text).values())
        assert text_complexity(text) == score
    assert text_complexity("") == 0.0
    assert text_complexity("\n".join(lines[:400])) > 40  # real news prose sits mid-scale, far from 0


def test_each_term_moves_the_obvious_way(lines: list[str]) -> None:
    short, longer = lines[0], " ".join(lines[:20])
    assert text_terms(longer)["length"] > text_terms(short)["length"]
    assert text_complexity(longer) > text_complexity("ሰላም ነው።")
    words = ["ቤት", "ልጅ", "ውሃ", "እናት", "አባት", "ገበያ", "መንገድ", "ከተማ", "ትምህርት", "ቤተሰብ", "ወንድም", "እህት"]
    one_sentence = " ".join(words) + "።"
    many_sentences = "። ".join(" ".join(words[i : i + 2]) for i in range(0, len(words), 2)) + "።"
    assert text_terms(one_sentence)["sentences"] > text_terms(many_sentences)["sentences"]
    assert text_terms("ኢትዮጵያዊያን ተማሪዎቻችን ")["word_length"] > text_terms("ቤት ልጅ ")["word_length"]
    assert text_terms(" ".join(["ቤት"] * 100))["diversity"] == 0.0
    distinct = " ".join(dict.fromkeys(re.findall(r"[^\W\d_]+", " ".join(lines[:10]))))
    assert text_terms(distinct)["diversity"] == 1.0
    assert text_terms("ቤት ልጅ")["diversity"] < text_terms(distinct)["diversity"]  # short: shrunk to ~0
    clean = lines[1]
    noisy = clean + " http://example.com/a?b=1 2024-05-06 #ሰላም @user 12345 ABC"
    assert text_terms(noisy)["noise"] > text_terms(clean)["noise"]
    assert text_terms("ሰላም ነው")["noise"] == 0.0 and text_terms("hello world")["noise"] == 0.0
    assert text_terms("ሰላም world")["noise"] == pytest.approx(0.5 * 2 * 3 / 8)  # 3 Ethiopic, 5 Latin


def test_conversation_score_grows_with_turns_and_tools(lines: list[str]) -> None:
    one_turn = [{"role": "user", "content": lines[0]}, {"role": "assistant", "content": lines[1]}]
    more_turns = [{"role": ("user", "assistant")[i % 2], "content": lines[i]} for i in range(8)]
    assert conversation_complexity(more_turns) > conversation_complexity(one_turn)
    with_system = [{"role": "system", "content": ""}, *one_turn]
    assert conversation_complexity(with_system) == conversation_complexity(one_turn)
    tools = tool_chat()
    plain = [m for m in tools if m["role"] != "tool" and not m.get("tool_calls")]
    assert conversation_complexity(tools, [WEATHER_TOOL]) > conversation_complexity(plain)
    parts = [{"role": "user", "content": [{"type": "text", "text": lines[0]}]}, one_turn[1]]
    assert conversation_complexity(parts) == conversation_complexity(one_turn)
    assert 0.0 <= conversation_complexity([]) <= conversation_complexity(tools, [WEATHER_TOOL]) <= 100.0


# --- stages and schedule ---------------------------------------------------------------------------


def test_stage_boundaries_are_weighted_quintiles() -> None:
    scores = np.arange(10, dtype=float)
    cuts = stage_boundaries(scores)
    assert cuts.tolist() == [2, 4, 6, 8]
    assert assign_stages(scores, cuts).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    weighted = stage_boundaries(np.array([1.0, 2.0, 3.0]), np.array([1.0, 8.0, 1.0]))
    assert weighted.tolist() == [2, 2, 2, 2]  # the heavy middle item holds all four cut points
    assert assign_stages(np.array([1.0, 2.0, 3.0]), weighted).tolist() == [0, 4, 4]  # ties go up
    with pytest.raises(FidelError, match="no items"):
        stage_boundaries(np.zeros(0))


def test_schedule_unlocks_one_stage_per_quarter_span() -> None:
    # 100 draws, span 0.4: stages join at draws 0, 10, 20, 30, 40
    assert unlock_draws(100, 0.4) == [0, 10, 20, 30, 40]
    got = [unlocked_stages(d, 100, 0.4) for d in (0, 9, 10, 19, 20, 39, 40, 99)]
    assert got == [1, 1, 2, 2, 3, 4, 5, 5]
    assert unlock_draws(10, 1.0) == [0, 3, 5, 8, 10]  # span 1: expert joins at the very end


def test_window_scores_are_token_weighted_means() -> None:
    offsets = np.array([0, 3, 4, 10])  # documents of 3, 1 and 6 tokens
    scores = np.array([10.0, 40.0, 70.0])
    got = window_scores(offsets, scores, seq_len=3, n_windows=3)
    # windows cover tokens [0,4), [3,7), [6,10)
    assert got.tolist() == pytest.approx([(3 * 10 + 40) / 4, (40 + 3 * 70) / 4, 70.0])
    with pytest.raises(FidelError, match="2 scores for 3 documents"):
        window_scores(offsets, scores[:2], 3, 3)


def stage_of_each(items: int) -> np.ndarray:
    """Items 0..n-1 in five stages of equal size, stage k holding the k-th fifth."""
    return np.arange(items) * len(STAGES) // items


def test_sampler_draws_only_unlocked_stages_then_everything() -> None:
    stages = stage_of_each(200)
    sampler = StagedSampler(stages, 4, seed=3)
    sampler.start_schedule(100, 0.4)
    firsts = unlock_draws(100, 0.4)
    seen_after_span = set()
    for draw in range(100):
        picked = sampler.next_indices()
        assert len(picked) == 4 and len(set(picked.tolist())) == 4
        allowed = sum(1 for first in firsts if first <= draw)
        assert stages[picked].max() < allowed, draw
        if draw >= 40:
            seen_after_span.update(stages[picked].tolist())
    assert seen_after_span == set(range(5))
    with pytest.raises(FidelError, match="start_schedule"):
        StagedSampler(stages, 4, 0).next_indices()


def test_a_pass_draws_every_item_once_like_a_shuffle() -> None:
    stages = stage_of_each(40)
    sampler = StagedSampler(stages, 4, seed=0)
    sampler.start_schedule(10, 0.2)
    drawn = np.concatenate([sampler.next_indices() for _ in range(10)])
    assert sorted(drawn.tolist()) == list(range(40))
    assert drawn[:4].max() < 8  # the first batch is beginner items only
    again = StagedSampler(stages, 4, seed=0)
    again.start_schedule(10, 0.2)
    assert np.concatenate([again.next_indices() for _ in range(10)]).tolist() == drawn.tolist()
    other = StagedSampler(stages, 4, seed=1)
    other.start_schedule(10, 0.2)
    assert np.concatenate([other.next_indices() for _ in range(10)]).tolist() != drawn.tolist()


def test_sampler_resumes_exactly_and_refills_used_up_stages() -> None:
    stages = stage_of_each(30)  # beginner has 6 items but is alone for 10 draws of 2: it must refill
    straight = StagedSampler(stages, 2, seed=5)
    straight.start_schedule(40, 1.0)
    draws = [straight.next_indices().tolist() for _ in range(25)]
    assert all(i < 6 for batch in draws[:10] for i in batch)
    first_pass = [i for batch in draws[:3] for i in batch]
    assert sorted(first_pass) == list(range(6))  # without replacement until the stage is used up
    stopped = StagedSampler(stages, 2, seed=5)
    stopped.start_schedule(40, 1.0)
    for _ in range(11):
        stopped.next_indices()
    resumed = StagedSampler(stages, 2, seed=5)
    resumed.start_schedule(40, 1.0)
    resumed.load_state_dict(json.loads(json.dumps(stopped.state_dict())))
    assert [resumed.next_indices().tolist() for _ in range(14)] == draws[11:]
    with pytest.raises(FidelError, match="without --curriculum"):
        resumed.load_state_dict({"epoch": 0, "step": 3})


# --- pretraining -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The FLORES fixture run tokenized twice: without (plain) and with complexity scores (scored)."""
    plain = build_flores_run(tmp_path_factory.mktemp("plain") / "run")
    scored = tmp_path_factory.mktemp("scored") / "run"
    shutil.copytree(plain, scored, ignore=shutil.ignore_patterns("tokens"))
    tokenize_splits(scored, workers=1, show_progress=False, curriculum=True)
    return {"plain": plain, "scored": scored}


def test_tokenize_without_the_flag_is_unchanged(curriculum_run: dict[str, Path]) -> None:
    for split in ("train", "val", "test"):
        plain, scored = (curriculum_run[k] / "tokens" / split for k in ("plain", "scored"))
        for name in ("tokens.bin", "offsets.npy", "doc_source.npy"):
            assert (plain / name).read_bytes() == (scored / name).read_bytes(), (split, name)
        plain_meta, scored_meta = (json.loads((d / "meta.json").read_text()) for d in (plain, scored))
        assert "complexity" not in plain_meta and not (plain / COMPLEXITY_FILE).exists()
        assert scored_meta.pop("complexity") == {"file": COMPLEXITY_FILE, "score_version": 1}
        for meta in (plain_meta, scored_meta):
            meta["tokenizer"].pop("dir")  # the two runs' own directories
        assert scored_meta == plain_meta
    shards = TokenShards(curriculum_run["scored"] / "tokens" / "train")
    scores = shards.complexity()
    assert scores.dtype == np.float32 and len(scores) == len(shards)
    tokenizer = load_tokenizer(curriculum_run["scored"] / "tokenizer")
    assert scores[3] == pytest.approx(text_complexity(tokenizer.decode(shards.document(3)[1:].tolist())))
    with pytest.raises(FidelError, match="--curriculum"):
        TokenShards(curriculum_run["plain"] / "tokens" / "train").complexity()


def test_curriculum_windows_follow_the_schedule(curriculum_run: dict[str, Path]) -> None:
    shards = TokenShards(curriculum_run["scored"] / "tokens" / "train")
    batches = CurriculumWindows(shards, 64, 4, seed=0, rank=1, world_size=2)
    assert np.bincount(batches.stages, minlength=5).min() > 0.15 * batches.n_windows  # quintiles
    batches.start_schedule(40, 0.5)
    reference = StagedSampler(batches.stages, 8, seed=0)
    reference.start_schedule(40, 0.5)
    firsts = unlock_draws(40, 0.5)
    for draw in range(40):
        inputs, targets = batches.next_batch()
        windows = reference.next_indices()[4:]  # rank 1's half of the global batch of 8
        assert torch.equal(inputs, windows_to_tensors(shards.tokens, windows * 64, 64)[0])
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        assert batches.stages[windows].max() < sum(1 for first in firsts if first <= draw)
    assert "beginner" in batches.describe() and "expert" in batches.describe()


def small_config(**changes: Any) -> TrainConfig:
    base = TrainConfig(
        model_overrides=SMALL, seq_len=64, batch_size=4, grad_accum=2, max_steps=8, lr=3e-3,
        warmup_steps=2, eval_every=4, eval_batches=2, log_every=2, save_every=3, echo=False, curriculum=True,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def test_curriculum_training_resumes_bit_exact(curriculum_run: dict[str, Path], tmp_path: Path) -> None:
    runs = {}
    for name in ("straight", "stopped"):
        runs[name] = tmp_path / name
        shutil.copytree(curriculum_run["scored"], runs[name])
    straight = train(runs["straight"], small_config())
    first = train(runs["stopped"], small_config(stop_at_step=5))
    second = train(runs["stopped"], small_config())
    assert second["resumed_from"] == 5
    assert first["losses"] + second["losses"] == straight["losses"]
    with pytest.raises(FidelError, match="cannot resume with curriculum true → false"):
        train(runs["stopped"], small_config(curriculum=False, max_steps=9))
    config = json.loads((runs["straight"] / "train" / "config.json").read_text())["train"]
    assert config["curriculum"] is True and config["curriculum_span"] == 0.5


def test_train_cli_flag_and_its_errors(curriculum_run: dict[str, Path], tmp_path: Path) -> None:
    common = ["--seq-len", "64", "--batch-size", "2", "--steps", "2", "--warmup", "0", "--eval-every", "2",
              "--preset", "tiny"]  # fmt: skip
    result = CliRunner().invoke(cli, ["train", str(curriculum_run["plain"]), *common, "--curriculum"])
    assert result.exit_code != 0 and "data tokenize RUN --curriculum" in str(result.exception)
    result = CliRunner().invoke(
        cli, ["train", str(curriculum_run["plain"]), "--curriculum", "--curriculum-span", "0"]
    )
    assert result.exit_code != 0 and "curriculum_span" in str(result.exception)
    run = tmp_path / "run"
    shutil.copytree(curriculum_run["plain"] / "data", run / "data")
    shutil.copytree(curriculum_run["plain"] / "tokenizer", run / "tokenizer")
    result = CliRunner().invoke(cli, ["data", "tokenize", str(run), "--workers", "1", "--curriculum"])
    assert result.exit_code == 0, result.output
    assert (run / "tokens" / "train" / COMPLEXITY_FILE).is_file()


def test_without_the_flag_the_batches_are_the_shuffled_ones(curriculum_run: dict[str, Path]) -> None:
    assert TrainConfig().curriculum is False
    shards = TokenShards(curriculum_run["scored"] / "tokens" / "train")
    plain = PackedBatches(TokenShards(curriculum_run["plain"] / "tokens" / "train"), 64, 4, 0)
    same = PackedBatches(shards, 64, 4, 0)
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(plain.next_batch(), same.next_batch(), strict=True))


# --- SFT ---------------------------------------------------------------------------------------------


def test_conversation_rows_come_easy_first() -> None:
    examples = [Example(np.full(30, i), np.full(30, i), complexity=float(i)) for i in range(20)]
    batches = CurriculumConversations(examples, 40, 2, seed=0, pad_id=PAD_ID)  # one example per row
    assert batches.steps_per_epoch == 10 and batches.row_stages.tolist() == sorted(batches.row_stages)
    batches.start_schedule(10, 0.5)  # stages join at draws 0, 2 (1.25 rounded up), 3, 4, 5
    order = [batches.next_batch()[0][:, 0].tolist() for _ in range(10)]
    flat = [i for batch in order for i in batch]
    assert sorted(flat) == list(range(20))  # one pass: each conversation once
    assert max(flat[:4]) < 4  # draws 0 and 1: beginner conversations (complexity 0-3) only
    plain = ConversationBatches(examples, 40, 2, seed=0, pad_id=PAD_ID)
    shuffled = [i for _ in range(10) for i in plain.next_batch()[0][:, 0].tolist()]
    assert sorted(shuffled) == list(range(20)) and shuffled != flat


def sft_chats(lines: list[str], count: int) -> list[dict[str, Any]]:
    """Short one-turn chats, longer multi-turn chats and tool chats: three levels of complexity."""
    chats = []
    for i in range(count):
        if i % 3 == 0:
            messages = [{"role": "user", "content": "ሰላም"}, {"role": "assistant", "content": "ሰላም ነው።"}]
        elif i % 3 == 1:
            messages = [
                {"role": "user", "content": lines[i][:60]},
                {"role": "assistant", "content": lines[i]},
            ]
            messages = messages * 3
        else:
            messages = tool_chat(json.dumps({"city": "ባህር ዳር", "days": i}, ensure_ascii=False))
        chats.append({"id": f"c{i}", "messages": messages, "tools": [WEATHER_TOOL] if i % 3 == 2 else None})
    return chats


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory: pytest.TempPathFactory, lines: list[str]) -> dict[str, Path]:
    """RUN/chat/{train,eval}.jsonl, a 640-id BPE and an exported random base model using it."""
    root = tmp_path_factory.mktemp("sft")
    tokenizer_dir = root / "tokenizer"
    dev = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    train_bpe(dev, 640, show_progress=False).save(tokenizer_dir)
    (root / "run" / "chat").mkdir(parents=True)
    chats = sft_chats(lines, 34)
    for name, part in (("train", chats[:30]), ("eval", chats[30:])):
        text = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in part)
        (root / "run" / "chat" / f"{name}.jsonl").write_text(text, encoding="utf-8")
    config = gqa_config(vocab_size=640, num_hidden_layers=1, max_position_embeddings=256)
    base = export_hf(
        random_llama(config, random_norms=False), config, tokenizer_dir, root / "base", "float32"
    )
    return {"run": root / "run", "tokenizer": tokenizer_dir, "base": base}


def test_sft_chat_data_orders_by_stage(sft_setup: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(sft_setup["tokenizer"])
    chat_dir = sft_setup["run"] / "chat"
    batches, _, _ = chat_data(chat_dir, tokenizer, 256, 2, 0, 1, curriculum=True)
    assert isinstance(batches, CurriculumConversations)
    plain, _, _ = chat_data(chat_dir, tokenizer, 256, 2, 0, 1)
    assert type(plain) is ConversationBatches  # without the flag: the shuffled batches, as before
    beginner_rows = batches.inputs[batches.row_stages == 0]
    beginner_text = "".join(tokenizer.decode([t for t in row if t != PAD_ID]) for row in beginner_rows)
    assert "ሰላም ነው።" in beginner_text and "get_weather" not in beginner_text  # greetings, no tools
    batches.start_schedule(20, 0.5)
    for _ in range(3):  # stage 1 joins at draw 3 (20 draws, span 0.5)
        for row in batches.next_batch()[0].numpy():
            assert any(np.array_equal(row, easy) for easy in beginner_rows)


def test_sft_cli_curriculum(sft_setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sft"
    args = ["sft", str(sft_setup["run"]), "--base", str(sft_setup["base"]), "--output-dir", str(out),
            "--seq-len", "256", "--batch-size", "2", "--device", "cpu", "--eval-batches", "1",
            "--use-lora", "--lora-rank", "2", "--no-merge",
            "--curriculum", "--curriculum-span", "0.8"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "curriculum: cut points" in result.output and "beginner" in result.output
    config = json.loads((out / "train" / "config.json").read_text())["train"]
    assert config["curriculum"] is True and config["curriculum_span"] == 0.8
