"""`fidellm data chat`: every input shape converted, bad records rejected with file:line and field, counts
add up, dedup, chat and MT decontamination, deterministic split/cap, and a capped run on the real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fidellm.chat.data import build_chat_data
from fidellm.chat.formats import RecordError, convert_record
from fidellm.chat.schema import Conversation, conversation_error
from fidellm.chat.template import render_chat
from fidellm.cli import cli, main
from fidellm.errors import FidelError
from fidellm.paths import resolve_data_dir

MT_BENCH_PROMPT = (
    "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
    "experiences and must-see attractions."
)
NTREX_EN = "The committee approved the new budget for rural road construction after a long debate on Tuesday."
ALL = "amharicir_instr,alpaca_seed_tasks,codealpaca_2k,gpteacher,fastchat_dummy_conversation"
TOOLFORMER = {
    "instruction": "toolformer: enabled\ntoolformer access: wikipedia, weather\nA wrapper around Wikipedia.\n"
    "wikipedia(query)\nWeather from OpenMeteo.\nweather(querywithlocation)\n"
    "Summarize the event and the weather",
    "input": "French Revolution",
    "response": "Summary: wikipedia('French Revolution'); today: weather('What's the weather in Paris?').",
}


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _eval_sets(root: Path) -> None:
    """Tiny chat eval prompts and MT test sets at their registry paths."""
    _write(root, "chat_eval_en/mt_bench/question.jsonl", _jsonl([{"turns": [MT_BENCH_PROMPT]}]))
    _write(
        root,
        "chat_eval_en/vicuna_bench/question.jsonl",
        _jsonl([{"turns": ["How can I improve my time management skills at work and home?"]}]),
    )
    _write(
        root,
        "chat_eval_en/self_instruct_user_oriented/user_oriented_instructions.jsonl",
        _jsonl(
            [
                {
                    "instruction": "Write a haiku about the quiet winter morning in the mountains.",
                    "instances": [{"input": ""}],
                }
            ]
        ),
    )
    _write(
        root,
        "chat_eval_en/alpaca_eval/text_davinci_003_model_outputs.json",
        json.dumps(
            [
                {
                    "instruction": "What are the names of some famous actors that started their careers "
                    "on Broadway?"
                }
            ]
        ),
    )
    for rel, line in {
        "flores200/amh_Ethi.dev": "ይህ የፍሎሬስ የሙከራ ዓረፍተ ነገር ነው እና ለስልጠና መዋል የለበትም በፍጹም አይደለም።",
        "flores200/amh_Ethi.devtest": "ሁለተኛው የፍሎሬስ ዓረፍተ ነገር ደግሞ ለግምገማ ብቻ የተቀመጠ ነው ይባላል።",
        "flores200/eng_Latn.dev": "This is a FLORES test sentence that must never be used for training.",
        "flores200/eng_Latn.devtest": "The second FLORES sentence is kept for evaluation only, they say.",
        "ntrex128/newstest2019-ref.amh.txt": "ኮሚቴው ከረጅም ክርክር በኋላ ለገጠር መንገድ ግንባታ አዲሱን በጀት አጸደቀ።",
        "ntrex128/newstest2019-src.eng.txt": NTREX_EN,
        "mafand_mt_en_amh/dev.amh": "የማፋንድ የልማት ዓረፍተ ነገር ስለ ዓለም አቀፍ ድምፆች ዜና ይናገራል።",
        "mafand_mt_en_amh/test.amh": "የማፋንድ የሙከራ ዓረፍተ ነገር ስለ ሌላ ዜና ይናገራል እንደገና።",
        "mafand_mt_en_amh/dev.en": "The MAFAND dev sentence talks about Global Voices news stories.",
        "mafand_mt_en_amh/test.en": "The MAFAND test sentence talks about other news stories again.",
        "gezmu_am_en_parallel_v1/dev.am-en.base.am": "የገዝሙ የልማት ዓረፍተ ነገር ከድሮ ጋዜጦች የተወሰደ ነው።",
        "gezmu_am_en_parallel_v1/test.am-en.base.am": "የገዝሙ የሙከራ ዓረፍተ ነገር ሌላ የድሮ ጋዜጣ ዜና ነው።",
        "gezmu_am_en_parallel_v1/dev.am-en.base.en": "Gezmu dev: taken from newspapers of the nineties.",
        "gezmu_am_en_parallel_v1/test.am-en.base.en": "Gezmu test: another old newspaper story.",
    }.items():
        _write(root, rel, line + "\n")


def _sources(root: Path) -> None:
    """One small file per input shape, at the registry paths, each with one or two bad records."""
    amharic = [
        {"number": 1, "prompt": "ኢትዮጵያ ዋና ከተማ ማን ናት?", "response": "አዲስ አበባ ናት።"},
        {"number": 2, "prompt": "ሰላም በል", "response": float("nan")},
        {"number": 3, "response": "መልስ ብቻ"},
    ]
    _write(
        root,
        "sft_am/amharicir_instr/amharic_gpt_dataset.json",
        json.dumps(amharic, ensure_ascii=False, indent=1),
    )
    seed = [
        {
            "id": "seed_task_0",
            "instruction": "Name a colour.",
            "instances": [{"input": "", "output": "Blue."}],
        },
        {"id": "seed_task_1", "instruction": "Add.", "instances": [{"input": "2+2", "output": 4}]},
    ]
    _write(root, "sft_en/alpaca_seed_tasks/seed_tasks.jsonl", _jsonl(seed))
    code = [
        {"instruction": "Reverse a string in Python.", "input": "s = 'abc'", "output": "s[::-1]"},
        {"instruction": "Write a loop.", "input": "", "output": ""},
        {"instruction": f"Please answer: {MT_BENCH_PROMPT}", "input": "", "output": "Aloha!"},
        ["not", "an", "object"],
    ]
    _write(root, "sft_en/codealpaca/code_alpaca_2k.json", json.dumps(code, indent=1))
    codegen = [{"instruction": "Print hello in C.", "input": "", "response": 'printf("hello");'}]
    _write(root, "sft_en/gpteacher/codegen-instruct.json", json.dumps(codegen))
    bad_call = {**TOOLFORMER, "response": "Result: wikipedia(topic, 3)."}
    _write(root, "sft_en/gpteacher/toolformer-dedupe-only-dataset.json", json.dumps([TOOLFORMER, bad_call]))
    chats = [
        {
            "id": "identity_0",
            "conversations": [
                {"from": "human", "value": "Who are you?"},
                {"from": "gpt", "value": "I am Fidel."},
            ],
        },
        {
            "id": "identity_1",
            "conversations": [
                {"from": "human", "value": "who are  you?"},
                {"from": "gpt", "value": "I am  Fidel."},
            ],
        },
        {"id": "identity_2", "conversations": [{"from": "robot", "value": "Hi"}]},
        {
            "id": "identity_3",
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
                {"from": "human", "value": "Bye"},
            ],
        },
    ]
    _write(root, "sft_en/fastchat/dummy_conversation.json", json.dumps(chats, indent=1))
    am = ["የኢትዮጵያ ቡና በዓለም ታዋቂ ነው።", "ኮሚቴው በጀቱን አጸደቀ።", "", "ተጨማሪ መስመር"]
    en = [
        "Ethiopian coffee is famous in the world.",
        NTREX_EN,
        "An orphan English line.",
        "An extra line",
        "Only English",
    ]
    _write(root, "marspanther_am_en_parallel/Amharic_English_News/amharic.txt", "\n".join(am) + "\n")
    _write(root, "marspanther_am_en_parallel/Amharic_English_News/english.txt", "\n".join(en) + "\n")


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _eval_sets(root)
    _sources(root)
    return root


def _read(run: Path) -> tuple[list[dict], list[dict], dict, list[dict]]:
    chat = run / "chat"
    rows = {
        s: [json.loads(x) for x in (chat / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "eval")
    }
    rejected = [json.loads(x) for x in (chat / "rejected.jsonl").read_text().splitlines()]
    return rows["train"], rows["eval"], json.loads((chat / "report.json").read_text()), rejected


def _assert_counts_add_up(report: dict) -> None:
    for name, s in report["sources"].items():
        assert s["records_read"] == s["records_accepted"] + sum(s["rejected"].values()), name
        assert s["conversations"] == s["kept"] + sum(s["dropped"].values()), name
        assert s["kept"] == s["train"] + s["eval"], name


def test_every_format_converted_validated_and_counted(tmp_path, data_dir):
    build_chat_data(tmp_path / "run", data_dir, sources=[*ALL.split(","), "marspanther_am_en_parallel"])
    train, evals, report, rejected = _read(tmp_path / "run")
    rows = {r["id"]: r for r in train + evals}
    for row in rows.values():
        assert render_chat(row["messages"], tools=row.get("tools")).startswith("<|bos|><|im_start|>")
        assert set(row) <= {"id", "source", "messages", "tools"}
    assert rows["amharicir_instr/1"]["messages"] == [
        {"role": "user", "content": "ኢትዮጵያ ዋና ከተማ ማን ናት?"},
        {"role": "assistant", "content": "አዲስ አበባ ናት።"},
    ]
    assert rows["alpaca_seed_tasks/seed_task_0/0"]["messages"][1]["content"] == "Blue."
    assert rows["codealpaca_2k/code_alpaca_2k.json:0"]["messages"][0]["content"] == (
        "Reverse a string in Python.\n\ns = 'abc'"
    )
    assert rows["gpteacher/codegen-instruct.json:0"]["messages"][1]["content"] == 'printf("hello");'
    tool = rows["gpteacher/toolformer-dedupe-only-dataset.json:0"]
    assert tool["messages"][0]["content"] == "Summarize the event and the weather\n\nFrench Revolution"
    calls = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in tool["messages"][1]["tool_calls"]
    ]
    assert calls == [
        ("wikipedia", {"query": "French Revolution"}),
        ("weather", {"querywithlocation": "What's the weather in Paris?"}),
    ]
    assert [t["function"]["name"] for t in tool["tools"]] == ["wikipedia", "weather"]
    assert tool["tools"][1]["function"]["description"] == "Weather from OpenMeteo."
    assert (
        '<tool_call>{"name": "wikipedia", "arguments": {"query": "French Revolution"}}</tool_call>'
        in render_chat(tool["messages"], tools=tool["tools"])
    )
    assert rows["fastchat_dummy_conversation/identity_0"]["messages"][1] == {
        "role": "assistant",
        "content": "I am Fidel.",
    }
    coffee = "marspanther_am_en_parallel/Amharic_English_News:1"
    en_am, am_en = rows[f"{coffee}/en-am"], rows[f"{coffee}/am-en"]
    assert en_am["messages"][0]["content"].endswith("\n\nEthiopian coffee is famous in the world.")
    assert (
        en_am["messages"][1]["content"]
        == am_en["messages"][0]["content"].split("\n\n")[1]
        == "የኢትዮጵያ ቡና በዓለም ታዋቂ ነው።"
    )
    _assert_counts_add_up(report)
    sources = report["sources"]
    assert (
        sources["gpteacher"]["license"] == "MIT"
        and sources["codealpaca_2k"]["license_family"] == "noncommercial"
    )
    assert sum(s["kept"] for s in sources.values()) == len(rows)
    assert sum(sum(s["rejected"].values()) for s in sources.values()) == len(rejected) == 10


def test_bad_records_name_file_line_and_field(tmp_path, data_dir):
    build_chat_data(tmp_path / "run", data_dir, sources=ALL.split(","))
    _, _, report, rejected = _read(tmp_path / "run")
    by = {(r["source"], r["line"]): r for r in rejected}
    amharic = "sft_am/amharicir_instr/amharic_gpt_dataset.json"
    nan = next(r for r in rejected if r["source"] == "amharicir_instr" and r["reason"] == "bad_field_type")
    assert (
        nan["path"].endswith(amharic)
        and nan["line"] == 7
        and "field 'response' is float nan" in nan["detail"]
    )
    shape = next(r for r in rejected if r["reason"] == "unknown_shape")
    assert shape["source"] == "amharicir_instr" and "(keys: number, response)" in shape["detail"]
    assert "instances[0]: field 'output' is int" in by[("alpaca_seed_tasks", 2)]["detail"]
    empty = next(
        r for r in rejected if r["source"] == "codealpaca_2k" and r["reason"] == "invalid_conversation"
    )
    assert "messages[1].content is empty" in empty["detail"]
    assert any(r["reason"] == "not_an_object" and r["source"] == "codealpaca_2k" for r in rejected)
    robot = next(r for r in rejected if r["reason"] == "bad_role")
    assert "conversations[0].from is 'robot'" in robot["detail"] and robot["line"] is not None
    last = next(
        r
        for r in rejected
        if r["source"] == "fastchat_dummy_conversation" and r["reason"] == "invalid_conversation"
    )
    assert "messages[2]: the last message is user, not assistant" in last["detail"]
    call = next(r for r in rejected if r["reason"] == "bad_tool_call")
    assert (
        "wikipedia(topic, 3)" in call["detail"] and "toolformer-dedupe-only-dataset.json:1" in call["detail"]
    )
    assert report["sources"]["amharicir_instr"]["rejected"] == {"bad_field_type": 1, "unknown_shape": 1}
    assert report["sources"]["fastchat_dummy_conversation"]["rejected"] == {
        "bad_role": 1,
        "invalid_conversation": 1,
    }
    _assert_counts_add_up(report)


def test_a_lone_surrogate_escape_is_a_rejected_record_not_a_crash(tmp_path, data_dir):
    seeds = data_dir / "sft_en/alpaca_seed_tasks/seed_tasks.jsonl"
    bad = '{"id": "seed_task_9", "instruction": "Name \\ud83d.", "instances": [{"input": "", "output": "x"}]}'
    seeds.write_text(seeds.read_text(encoding="utf-8") + bad + "\n", encoding="utf-8")
    build_chat_data(tmp_path / "run", data_dir, sources=["alpaca_seed_tasks"])
    _, _, report, rejected = _read(tmp_path / "run")
    (surrogate,) = [r for r in rejected if r["reason"] == "invalid_utf8"]
    assert surrogate["path"] == str(seeds) and surrogate["line"] == 3
    assert "field 'instruction' holds the lone surrogate \\ud83d" in surrogate["detail"]
    assert report["sources"]["alpaca_seed_tasks"]["records_read"] == 3
    _assert_counts_add_up(report)


def test_dedup_and_chat_decontamination(tmp_path, data_dir):
    build_chat_data(tmp_path / "run", data_dir, sources=ALL.split(","))
    train, evals, report, _ = _read(tmp_path / "run")
    ids = {r["id"] for r in train + evals}
    # identity_1 differs from identity_0 only in case and spacing: the smaller id stays.
    assert (
        "fastchat_dummy_conversation/identity_0" in ids
        and "fastchat_dummy_conversation/identity_1" not in ids
    )
    assert report["sources"]["fastchat_dummy_conversation"]["dropped"] == {"duplicate": 1}
    # The planted MT-bench prompt is removed, the rest of the source kept.
    assert "codealpaca_2k/code_alpaca_2k.json:2" not in ids and "codealpaca_2k/code_alpaca_2k.json:0" in ids
    assert report["sources"]["codealpaca_2k"]["dropped"] == {"chat_eval_overlap": 1}
    assert report["sources"]["codealpaca_2k"]["overlap_by_set"] == {"mt_bench": 1}


def test_translation_pairs_overlap_and_alignment(tmp_path, data_dir):
    build_chat_data(tmp_path / "run", data_dir, sources=["marspanther_am_en_parallel"], eval_split=0.5)
    train, evals, report, rejected = _read(tmp_path / "run")
    stats = report["sources"]["marspanther_am_en_parallel"]
    # Line 2's English side is the NTREX source sentence: both directions go, counted for ntrex128_eng.
    assert stats["overlap_by_set"] == {"ntrex128_eng": 1}
    assert stats["dropped"] == {"mt_eval_overlap": 2}
    assert {r["reason"] for r in rejected} == {"empty", "unaligned"}
    assert any("amharic.txt has no line 5" in r["detail"] for r in rejected)
    assert stats["records_read"] == 5 and stats["conversations"] == 6 and stats["kept"] == 4
    split_of = {r["id"]: split for split, rows in (("train", train), ("eval", evals)) for r in rows}
    pair = "marspanther_am_en_parallel/Amharic_English_News:"
    assert split_of[f"{pair}4/en-am"] == split_of[f"{pair}4/am-en"]  # both directions share a split
    assert NTREX_EN not in (tmp_path / "run" / "chat" / "train.jsonl").read_text()
    _assert_counts_add_up(report)


def test_split_and_cap_are_deterministic(tmp_path, data_dir):
    sources = [*ALL.split(","), "marspanther_am_en_parallel"]
    for name in ("a", "b"):
        build_chat_data(tmp_path / name, data_dir, sources=sources, max_samples=1, eval_split=0.3)
    for split in ("train", "eval", "rejected"):
        assert (tmp_path / "a/chat" / f"{split}.jsonl").read_bytes() == (
            tmp_path / "b/chat" / f"{split}.jsonl"
        ).read_bytes()
    _, _, report, _ = _read(tmp_path / "a")
    assert all(s["kept"] == 1 for s in report["sources"].values())
    assert report["sources"]["gpteacher"]["dropped"] == {"over_max_samples": 1}
    _assert_counts_add_up(report)
    with pytest.raises(FidelError, match="--eval-split"):
        build_chat_data(tmp_path / "c", data_dir, sources=sources, eval_split=1.0)
    with pytest.raises(FidelError, match="not an sft/parallel source"):
        build_chat_data(tmp_path / "c", data_dir, sources=["flores200"])


def test_existing_chat_dir_is_replaced_only_with_overwrite(tmp_path, data_dir, capsys):
    args = ["data", "chat", str(tmp_path / "run"), "--sources", "gpteacher", "--data-dir", str(data_dir)]
    main(args)
    stale = tmp_path / "run" / "chat" / "stale.txt"
    stale.write_text("from an earlier run")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    chat_dir = tmp_path / "run" / "chat"
    assert capsys.readouterr().err == f"error: {chat_dir} already exists; pass --overwrite to replace it\n"
    assert stale.exists()
    main([*args, "--overwrite"])
    assert not stale.exists() and (chat_dir / "report.json").exists()


@pytest.mark.parametrize(
    ("messages", "tools", "error"),
    [
        ([], None, "messages must be a non-empty list"),
        ([{"role": "bot", "content": "x"}], None, "messages[0].role is 'bot'"),
        ([{"role": "assistant", "content": "x"}], None, "messages[0]: role 'assistant' cannot come first"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}],
            None,
            "messages[1].content is empty",
        ),
        (
            [{"role": "user", "content": "x", "extra": 1}, {"role": "assistant", "content": "y"}],
            None,
            "unknown key 'extra'",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
                },
            ],
            None,
            "messages[1].tool_calls[0].function.arguments is not valid JSON",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "g", "arguments": "{}"}}],
                },
            ],
            [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "'g' is not one of the tools (f)",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}],
            None,
            "messages[1]: role 'tool' cannot come after a user message",
        ),
    ],
)
def test_conversation_errors_name_the_field(messages, tools, error):
    problem = conversation_error(Conversation("s/1", "s", messages, tools))
    assert problem is not None and error in problem


def test_tool_conversation_with_results_is_valid():
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": '{"q": "Addis"}'}}],
        },
        {"role": "tool", "content": "22C"},
        {"role": "assistant", "content": "It is 22C."},
    ]
    assert (
        conversation_error(
            Conversation("s/1", "s", messages, [{"type": "function", "function": {"name": "w"}}])
        )
        is None
    )


def test_unknown_shape_is_a_record_error():
    with pytest.raises(RecordError, match="none of the keys") as info:
        convert_record({"question": "q", "answer": "a"})
    assert info.value.reason == "unknown_shape"


def test_cli_on_real_data_reports_every_source(tmp_path):
    try:
        data = resolve_data_dir()
    except FidelError:
        pytest.skip("shared data not available")
    result = CliRunner().invoke(
        cli, ["data", "chat", str(tmp_path), "--max-samples", "20", "--data-dir", str(data)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "chat" / "report.json").read_text())
    # the FastChat identity chats ("I am Vicuna, ... LMSYS") are trained on only when named
    expected = {*ALL.split(","), "marspanther_am_en_parallel"} - {"fastchat_dummy_conversation"}
    assert set(report["sources"]) == expected and all(name in result.output for name in expected)
    assert "fastchat_dummy_conversation" not in result.output
    _assert_counts_add_up(report)
    assert all(s["kept"] == 20 for s in report["sources"].values())
    assert report["sources"]["amharicir_instr"]["rejected"] == {"bad_field_type": 1}  # the bare NaN response
    assert report["sources"]["gpteacher"]["records_read"] == 4535 + 1923 + 7673
    assert report["sources"]["marspanther_am_en_parallel"]["license"] == "MIT"
    for split in ("train", "eval"):
        for line in (tmp_path / "chat" / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            render_chat(row["messages"], tools=row.get("tools"))
            assert "Vicuna" not in line, row["id"]
