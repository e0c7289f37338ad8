"""The chat evaluations: translation chrF++/BLEU, tool-call validity, SFT held-out loss, saved answers,
their registration in `fidellm eval` and the report card (tiny BPE, tiny random Llama, hand-made data)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from fidellm.chat.template import TOOLS_INTRO, TOOLS_OUTRO
from fidellm.chat.translation import translation_request
from fidellm.cli import cli
from fidellm.errors import FidelError
from fidellm.eval import chat as chat_eval
from fidellm.eval.chat import (
    CHAT_TASKS,
    Answer,
    ChatPrompt,
    ModelGenerator,
    bench_answers,
    corpus_scores,
    evaluate_translation,
    heldout_loss,
    instruction_answers,
    tool_call_validity,
    tool_call_verdict,
    tool_turns,
)
from fidellm.eval.chat_data import read_bench, read_eval_split, read_parallel, sft_chat_dir
from fidellm.eval.report import build_report
from fidellm.eval.sampling import limited
from fidellm.eval.suite import EvalContext, expand_groups, run_suite
from fidellm.export.hf import export_hf
from fidellm.models.hnet import HNetForCausalLM
from fidellm.models.hnet import preset as hnet_preset
from fidellm.paths import resolve_data_dir
from fidellm.sft.data import encode_conversation
from fidellm.tokenizer.bpe import BPETokenizer, train_bpe
from fidellm.tokenizer.bytes import ByteTokenizer
from fixtures.chats import WEATHER_TOOL, tool_chat
from fixtures.models import gqa_config, random_llama

VOCAB = 768
AMHARIC = [
    "ኮሚቴው ከረጅም ክርክር በኋላ ለገጠር መንገድ ግንባታ አዲሱን በጀት አጸደቀ።",
    "የኢትዮጵያ ቡና በዓለም ገበያ ላይ በጣም ታዋቂ ነው ይባላል።",
    "ተማሪዎቹ ዛሬ ጠዋት ወደ ቤተ መጻሕፍት ሄደው መጻሕፍት አነበቡ።",
]
ENGLISH = [
    "After a long debate the committee approved the new budget for rural roads.",
    "Ethiopian coffee is said to be very famous on the world market.",
    "This morning the students went to the library and read books.",
]
MT_BENCH = [
    {
        "question_id": 81,
        "category": "writing",
        "turns": ["Write a short poem about rain.", "Now make it rhyme."],
    },
    {"question_id": 82, "category": "math", "turns": ["What is 2 + 2?", "And times 3?"]},
]
VICUNA = [{"question_id": 1, "category": "generic", "turns": ["How can I sleep better?"]}]


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """The three MT test sets (every registry file of each side), the two benches, FLORES for fertility."""
    root = tmp_path / "data"
    for name in ("flores200/amh_Ethi.dev", "flores200/amh_Ethi.devtest", "ntrex128/newstest2019-ref.amh.txt",
                 "mafand_mt_en_amh/dev.amh", "mafand_mt_en_amh/test.amh"):  # fmt: skip
        _write(root, name, "\n".join(AMHARIC) + "\n")
    for name in ("flores200/eng_Latn.dev", "flores200/eng_Latn.devtest", "ntrex128/newstest2019-src.eng.txt",
                 "mafand_mt_en_amh/dev.en", "mafand_mt_en_amh/test.en"):  # fmt: skip
        _write(root, name, "\n".join(ENGLISH) + "\n")
    _write(root, "chat_eval_en/mt_bench/question.jsonl", _jsonl(MT_BENCH))
    reference = {"question_id": 82, "choices": [{"index": 0, "turns": ["4", "12"]}]}
    _write(root, "chat_eval_en/mt_bench/reference_answer_gpt-4.jsonl", _jsonl([reference]))
    _write(root, "chat_eval_en/vicuna_bench/question.jsonl", _jsonl(VICUNA))
    return root


def eval_split() -> list[dict[str, Any]]:
    """Amharic instructions, an English chat and a tool chat with two calling turns."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "ሐረር"}'}}
    second_call = {"role": "assistant", "content": None, "tool_calls": [call]}
    tool_messages = [*tool_chat()[:-1], second_call, {"role": "tool", "content": "ደመናማ"},
                     {"role": "assistant", "content": "ሐረር ደመናማ ናት።"}]  # fmt: skip
    return [
        {"id": "amharicir_instr/1", "source": "amharicir_instr", "messages": [
            {"role": "user", "content": "የኢትዮጵያ ዋና ከተማ ማን ናት?"},
            {"role": "assistant", "content": "የኢትዮጵያ ዋና ከተማ አዲስ አበባ ናት።"}]},
        {"id": "amharicir_instr/2", "source": "amharicir_instr", "messages": [
            {"role": "system", "content": "አጭር መልስ ስጥ።"},
            {"role": "user", "content": "ቡና ከየት መጣ?"},
            {"role": "assistant", "content": "ቡና ከኢትዮጵያ ከፋ ክልል እንደመጣ ይነገራል።"}]},
        {"id": "fastchat/1", "source": "fastchat", "messages": [
            {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Fidel."},
            {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]},
        {"id": "tools/1", "source": "gpteacher", "messages": tool_messages, "tools": [WEATHER_TOOL]},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    directory = tmp_path_factory.mktemp("tokenizer")
    english = [*ENGLISH, TOOLS_INTRO, TOOLS_OUTRO, json.dumps(WEATHER_TOOL)]  # short tool prompts
    train_bpe(lines + english * 20, VOCAB, show_progress=False).save(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> BPETokenizer:
    return BPETokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_llama(gqa_config(vocab_size=VOCAB, max_position_embeddings=512), random_norms=False)


@pytest.fixture()
def short_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers of at most 4 tokens: the end-to-end tests check wiring and counts, not answers."""
    for name in ("TRANSLATION", "INSTRUCTION", "ANSWER", "TOOL"):
        monkeypatch.setattr(chat_eval, f"{name}_MAX_NEW_TOKENS", 4)


class Scripted:
    """A stand-in model: answers from `answer(prompt)`, recording every prompt and max_new_tokens."""

    def __init__(self, answer):
        self.answer, self.prompts, self.limits = answer, [], []

    def __call__(self, prompts: Sequence[ChatPrompt], max_new_tokens: int) -> list[Answer]:
        self.prompts += prompts
        self.limits.append(max_new_tokens)
        return [Answer(self.answer(p), "stop") for p in prompts]


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_translation_scores_perfect_and_wrong_answers(data_dir: Path, tmp_path: Path):
    lines = read_parallel("flores", data_dir)
    assert (lines[0].id, lines[0].amharic, lines[0].english) == (
        "flores200/devtest:1",
        AMHARIC[0],
        ENGLISH[0],
    )
    by_source = {**dict(zip(ENGLISH, AMHARIC, strict=True)), **dict(zip(AMHARIC, ENGLISH, strict=True))}

    def reference(prompt: ChatPrompt) -> str:
        return by_source[prompt.messages[0]["content"].split("\n\n", 1)[1]]

    perfect = Scripted(lambda p: "  " + reference(p) + "\n")
    results = evaluate_translation(lines, "flores", "devtest", perfect, tmp_path)
    scores = {(r.task, r.metric): r for r in results}
    assert set(scores) == {
        (f"translation/flores/{d}", m) for d in ("en-am", "am-en") for m in ("chrF++", "BLEU")
    }
    assert all(r.value == pytest.approx(100.0) and r.n == 3 and r.split == "devtest" for r in results)
    assert "nc:6|nw:2" in scores["translation/flores/en-am", "chrF++"].details["signature"]
    assert "tok:13a" in scores["translation/flores/am-en", "BLEU"].details["signature"]
    # the prompts are the training data's: same instruction choice, no system prompt
    assert perfect.prompts[0].messages == [translation_request("en-am", ENGLISH[0], "flores200/devtest:1")]
    saved = _records(tmp_path / "generations/translation-flores-en-am.jsonl")
    assert (
        len(saved) == 3 and saved[1]["reference"] == AMHARIC[1] and saved[1]["answer"].strip() == AMHARIC[1]
    )
    assert saved[1]["prompt"].endswith("\n\n" + ENGLISH[1]) and saved[1]["finish_reason"] == "stop"

    wrong = evaluate_translation(lines, "flores", "devtest", Scripted(lambda p: "zzz qqq"), tmp_path)
    assert all(r.value < 5.0 for r in wrong)
    half = evaluate_translation(lines, "flores", "devtest", Scripted(lambda p: reference(p)[:30]), tmp_path)
    assert all(5.0 < r.value < 100.0 for r in half if r.metric == "chrF++")
    with pytest.raises(FidelError, match="2 translations for 3 references"):
        corpus_scores(["a", "b"], AMHARIC)


def test_tool_call_verdicts_on_scripted_outputs():
    tools = {"get_weather", "search"}
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "ጎንደር"}}</tool_call>'
    assert tool_call_verdict(call, tools) == ("valid", ["get_weather"])
    assert tool_call_verdict("እሺ።\n" + call, tools)[0] == "valid"
    assert tool_call_verdict(call.replace("get_weather", "get_time"), tools) == ("unknown_tool", ["get_time"])
    assert tool_call_verdict(call + "\n" + call.replace("get_weather", "nope"), tools)[0] == "unknown_tool"
    broken = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    assert tool_call_verdict(broken, tools) == ("malformed_call", [])
    assert tool_call_verdict('<tool_call>{"arguments": {}}</tool_call>', tools)[0] == "malformed_call"
    assert tool_call_verdict('<tool_call>{"name": "search", "arguments": [1]}</tool_call>', tools)[0] == (
        "arguments_not_object")  # fmt: skip
    assert tool_call_verdict("ዛሬ ፀሐያማ ነው።", tools) == ("no_call", [])


def test_tool_call_validity_counts_every_calling_turn(tmp_path: Path):
    turns = tool_turns(eval_split())
    assert [t.id for t in turns] == ["tools/1#2", "tools/1#5"]
    assert turns[0].reference_names == ("get_weather", "get_weather")
    assert turns[1].prompt.messages[-1]["role"] == "tool" and turns[1].prompt.tools == [WEATHER_TOOL]
    replies = iter(['<tool_call>{"name": "get_weather", "arguments": {"city": "x"}}</tool_call>', "ፀሐያማ"])
    result = tool_call_validity(turns, Scripted(lambda p: next(replies)), tmp_path)
    assert (result.value, result.n, result.details["valid"], result.details["total"]) == (0.5, 2, 1, 2)
    assert result.details["reasons"] == {"no_call": 1, "valid": 1}
    assert result.details["same_tools_as_reference"] == 0  # one call where the reference made two
    saved = _records(tmp_path / "generations/tool-calls.jsonl")
    assert [r["verdict"] for r in saved] == ["valid", "no_call"] and saved[0]["tools"] == ["get_weather"]
    with pytest.raises(FidelError, match="no assistant turn that calls a tool"):
        tool_call_validity(tool_turns(eval_split()[:3]), Scripted(str), tmp_path)


def test_heldout_loss_equals_a_direct_computation(model, tokenizer):
    conversations = eval_split()
    result = heldout_loss(model, tokenizer, conversations, "cpu", seq_len=512)
    nats, count, per_source = 0.0, 0, {}
    for record in conversations:
        ids, mask = encode_conversation(tokenizer, record["messages"], record.get("tools"))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
        picked = -logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        kept = torch.tensor(mask[1:], dtype=torch.bool)
        nats += picked[kept].sum().item()
        count += int(kept.sum())
        total = per_source.setdefault(record["source"], [0.0, 0])
        total[0] += picked[kept].sum().item()
        total[1] += int(kept.sum())
    assert result.value == pytest.approx(nats / count, rel=1e-5) and result.n == 4
    assert not result.higher_is_better and result.details["target_tokens"] == count
    for source, (n, t) in per_source.items():
        assert result.details["by_source"][source]["loss"] == pytest.approx(n / t, rel=1e-5)
    short = heldout_loss(
        model, tokenizer, conversations, "cpu", seq_len=60
    )  # the tool chat's system turn is longer
    assert (short.n, short.details["dropped"]) == (3, 1) and short.details["truncated"] >= 1
    with pytest.raises(FidelError, match="no conversation keeps an assistant token"):
        heldout_loss(model, tokenizer, conversations, "cpu", seq_len=2)


def test_bench_second_turn_follows_the_models_own_first_answer(data_dir: Path, tmp_path: Path):
    questions = read_bench("mt_bench", data_dir)
    assert questions[1].references == ("4", "12") and questions[0].references is None
    generator = Scripted(lambda p: f"answer {len(p.messages)} to {p.messages[-1]['content']}")
    result = bench_answers(questions, generator, tmp_path)
    assert [len(p.messages) for p in generator.prompts] == [1, 1, 3, 3]
    assert generator.prompts[2].messages[1] == {
        "role": "assistant",
        "content": "answer 1 to " + MT_BENCH[0]["turns"][0],
    }
    assert (result.task, result.metric, result.value, result.n) == ("chat/mt_bench", "finished", 1.0, 4)
    saved = _records(tmp_path / "generations/mt_bench.jsonl")
    assert [r["id"] for r in saved] == ["mt_bench/81", "mt_bench/82"] and len(saved[0]["turns"]) == 2
    expected = {"prompt": "And times 3?", "reference": "12", "answer": "answer 3 to And times 3?"}
    assert saved[1]["turns"][1] == {**expected, "finish_reason": "stop"}


def test_amharic_instructions_answers_and_scores(tmp_path: Path):
    conversations = eval_split()
    references = {c["messages"][-2]["content"]: c["messages"][-1]["content"] for c in conversations[:2]}
    results = instruction_answers(
        conversations, Scripted(lambda p: references[p.messages[-1]["content"]]), tmp_path
    )
    values = {r.metric: r.value for r in results}
    assert (
        values["chrF++"] == pytest.approx(100.0)
        and values["finished"] == 1.0
        and values["ethiopic_share"] > 0.9
    )
    saved = _records(tmp_path / "generations/instructions-am.jsonl")
    assert [r["id"] for r in saved] == ["amharicir_instr/1", "amharicir_instr/2"]
    assert saved[1]["prompt"][0]["role"] == "system" and saved[1]["reference"] == saved[1]["answer"]
    english = instruction_answers(conversations, Scripted(lambda p: "I do not know."), tmp_path)
    assert {r.metric: r.value for r in english}["ethiopic_share"] == 0.0
    with pytest.raises(FidelError, match="no conversation from amharicir_instr"):
        instruction_answers(conversations[2:], Scripted(str), tmp_path)


def test_model_generator_is_greedy_and_respects_the_context(model, tokenizer):
    prompts = [
        ChatPrompt([{"role": "user", "content": AMHARIC[0]}]),
        ChatPrompt(eval_split()[3]["messages"][:2], [WEATHER_TOOL]),
    ]
    first = ModelGenerator(model, tokenizer, batch_size=1)(prompts, 6)
    again = ModelGenerator(model, tokenizer, batch_size=2)(prompts, 6)
    assert first == again and all(a.finish_reason in ("stop", "length") for a in first)
    small = random_llama(gqa_config(vocab_size=VOCAB, max_position_embeddings=96), random_norms=False)
    long = ChatPrompt([{"role": "user", "content": " ".join(AMHARIC * 4)}])
    answers = ModelGenerator(small, tokenizer)([long, prompts[0]], 100)  # 45 tokens of room
    assert answers[0] == Answer("", "prompt_too_long") and answers[1].finish_reason in ("stop", "length")


def test_bad_inputs_are_clear_errors(data_dir: Path, tmp_path: Path):
    _write(data_dir, "mafand_mt_en_amh/test.en", "\n".join(ENGLISH[:2]) + "\n")
    with pytest.raises(FidelError, match=r"test\.amh has 3 lines but .*test\.en has 2: not aligned"):
        read_parallel("mafand", data_dir)
    _write(data_dir, "ntrex128/newstest2019-ref.amh.txt", AMHARIC[0] + "\n\n" + AMHARIC[1] + "\n")
    with pytest.raises(FidelError, match=r"newstest2019-ref\.amh\.txt:2: empty line"):
        read_parallel("ntrex", data_dir)
    with pytest.raises(FidelError, match="unknown translation set 'wmt'"):
        read_parallel("wmt", data_dir)
    _write(
        data_dir,
        "chat_eval_en/vicuna_bench/question.jsonl",
        _jsonl([*VICUNA, {"question_id": 2, "turns": []}]),
    )
    with pytest.raises(FidelError, match=r"question\.jsonl:2: field 'turns'"):
        read_bench("vicuna_bench", data_dir)
    with pytest.raises(FidelError, match="no chat eval split"):
        read_eval_split(tmp_path / "nowhere")
    chat = tmp_path / "chat"
    bad = {"id": "x/1", "source": "x", "messages": [{"role": "assistant", "content": "hi"}]}
    _write(chat, "eval.jsonl", _jsonl([eval_split()[0], bad]))
    with pytest.raises(
        FidelError, match="conversation x/1: messages\\[0\\]: role 'assistant' cannot come first"
    ):
        read_eval_split(chat)
    with pytest.raises(FidelError, match="limit must be a positive"):
        limited([1, 2], 0, seed=0)
    assert limited(list(range(10)), 3, seed=1) == limited(list(range(10)), 3, seed=1) == sorted(
        limited(list(range(10)), 3, seed=1))  # fmt: skip
    assert limited(list(range(10)), 3, seed=1) == sorted(random.Random(1).sample(range(10), 3))


def test_limited_by_group_keeps_every_group_it_can():
    docs = [("big", i) for i in range(95)] + [("small", 95), ("tiny", 96), ("small", 97)]
    for seed in range(20):
        sample = limited(docs, 10, seed, group=lambda doc: doc[0])
        assert len(sample) == 10 and sample == sorted(sample, key=lambda doc: doc[1])  # file order
        assert {name for name, _ in sample} == {"big", "small", "tiny"}
        assert sample == limited(docs, 10, seed, group=lambda doc: doc[0])
    assert len({tuple(limited(docs, 10, seed, group=lambda doc: doc[0])) for seed in range(5)}) > 1
    two = limited(docs, 2, seed=0, group=lambda doc: doc[0])  # fewer places than groups
    assert len(two) == 2 and len({name for name, _ in two}) == 2
    assert limited(docs, 200, 0, group=lambda doc: doc[0]) == docs


def test_chat_group_and_sft_detection(tmp_path: Path):
    assert expand_groups(["flores", "chat", "translation"]) == ["flores", *CHAT_TASKS]
    sft = tmp_path / "run" / "sft"
    config = {"train": {"data": "chat", "chat_dir": str(tmp_path / "run" / "chat")}}
    _write(sft, "train/config.json", json.dumps(config))
    assert sft_chat_dir(sft / "merged") == tmp_path / "run" / "chat"
    _write(sft, "train/config.json", json.dumps({"train": {"data": "chat", "chat_dir": None}}))
    assert sft_chat_dir(sft / "train" / "best") == sft / "chat"
    _write(tmp_path / "base", "train/config.json", json.dumps({"train": {"data": "tokens"}}))
    assert sft_chat_dir(tmp_path / "base" / "export" / "hf") is None
    for damaged, message in (('{"train": ', "not valid JSON"), ('{"train": [1]}', "no 'train' object")):
        _write(sft, "train/config.json", damaged)
        with pytest.raises(
            FidelError, match=rf"sft/train/config.json: (not a training config )?\(?{message}"
        ):
            sft_chat_dir(sft / "merged")


@pytest.mark.usefixtures("short_answers")
def test_chat_tasks_through_the_suite_and_the_report_card(data_dir, model, tokenizer_dir, tmp_path):
    chat = tmp_path / "chat"
    _write(chat, "eval.jsonl", _jsonl(eval_split()))
    ctx = EvalContext(model, BPETokenizer.load(tokenizer_dir), torch.device("cpu"), data_dir, None, limit=2,
                      seed=3, chat_dir=chat)  # fmt: skip
    out = tmp_path / "eval"
    report = run_suite(ctx, ["chat"], Path("tiny"), out, echo=lambda line: None)
    assert report["tasks"] == list(CHAT_TASKS)
    found = {(r["task"], r["metric"]): r for r in report["results"]}
    for set_name in ("flores", "ntrex", "mafand"):
        for direction in ("en-am", "am-en"):
            assert found[f"translation/{set_name}/{direction}", "chrF++"]["n"] == 2
            assert len(_records(out / f"generations/translation-{set_name}-{direction}.jsonl")) == 2
    assert found["sft-heldout", "loss"]["n"] == 2 and math.isfinite(found["sft-heldout", "loss"]["value"])
    assert found["tool-calls", "validity"]["details"]["total"] == 2
    assert found["chat/mt_bench", "finished"]["n"] == 4 and found["chat/vicuna_bench", "finished"]["n"] == 1
    assert len(_records(out / "generations/instructions-am.jsonl")) == 2
    assert any(path.endswith("eval.jsonl") for path in report["data_files"])

    card = build_report([out], tmp_path / "card").read_text()
    validity = found["tool-calls", "validity"]["details"]
    assert "## Chat evaluations" in card and f"| tool-calls | validity | {validity['valid']}/2 (" in card
    assert "sacrebleu chrF++ signature: `nrefs:1|case:mixed|eff:yes|nc:6|nw:2" in card
    assert "translation-mafand-am-en.jsonl" in card


@pytest.mark.usefixtures("short_answers")
def test_eval_command_runs_the_chat_tasks_of_an_exported_model(data_dir, model, tokenizer_dir, tmp_path):
    hf = export_hf(model, model.config, tokenizer_dir, tmp_path / "hf", dtype="float32")
    args = ["eval", str(hf), "--data-dir", str(data_dir), "--tasks", "tool-calls", "--device", "cpu"]
    missing = CliRunner().invoke(cli, args)
    assert isinstance(missing.exception, FidelError) and "pass --chat-dir" in str(missing.exception)
    chat = tmp_path / "chat"
    _write(chat, "eval.jsonl", _jsonl(eval_split()))
    result = CliRunner().invoke(cli, [*args, "--chat-dir", str(chat), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "tool-calls" in result.output and (tmp_path / "out/generations/tool-calls.jsonl").is_file()
    unknown = CliRunner().invoke(cli, [*args[:-4], "--tasks", "chats", "--device", "cpu"])
    assert isinstance(unknown.exception, FidelError) and "chat (group)" in str(unknown.exception)


def test_byte_models_take_the_chat_tasks() -> None:
    """H-Net (byte tokenizer): the held-out loss scores the assistant bytes, and batched greedy answers
    equal one-at-a-time ones."""
    torch.manual_seed(0)
    hnet = HNetForCausalLM(hnet_preset("hnet-tiny", max_position_embeddings=2048)).eval()
    tokenizer = ByteTokenizer()
    result = heldout_loss(hnet, tokenizer, eval_split(), "cpu", seq_len=2048)
    assert result.n == 4 and 0 < result.value < 20
    prompts = [ChatPrompt([{"role": "user", "content": text}]) for text in AMHARIC[:2]]
    together = ModelGenerator(hnet, tokenizer, batch_size=2)(prompts, 8)
    alone = ModelGenerator(hnet, tokenizer, batch_size=1)(prompts, 8)
    assert together == alone and all(a.finish_reason in ("stop", "length") for a in together)
