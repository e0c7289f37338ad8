"""Bad input to the stages (data prepare config, SFT chat data, report, export, eval, tokenizer report) is
one clear error naming the file, line, field or option: never a traceback, never silently ignored."""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from fidellm.cli import cli, main
from fidellm.data.boilerplate import merge_examples
from fidellm.data.config import load_prepare_config
from fidellm.data.pipeline import PrepareLayout
from fidellm.data.report import collect
from fidellm.errors import FidelError
from fidellm.eval.report import load_run, render_markdown
from fidellm.eval.suite import EvalContext
from fidellm.export.hf import export_hf, load_hf_dir
from fidellm.models.factory import config_to_dict
from fidellm.paths import resolve_data_dir
from fidellm.sft.data import chat_data, encode_conversation, read_conversations
from fidellm.tokenizer.base import META_FILE, load_tokenizer
from fidellm.tokenizer.bpe import BPETokenizer, train_bpe
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.train.checkpoint import save_checkpoint
from fixtures.cli import fails_with
from fixtures.models import gqa_config, random_llama


def usage_error(args: list[str]) -> str:
    """click's output for a rejected option value (exit code 2, the option named)."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    return result.output


# data prepare --config


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("workers: one\n", r"cfg\.yaml: workers: expected an integer, got 'one'"),
        ("filters: {min_chars: abc}\n", r"cfg\.yaml: filters\.min_chars: expected an integer, got 'abc'"),
        ("sources: {weights: [1, 2]}\n", r"cfg\.yaml: sources\.weights: expected a mapping, got \[1, 2\]"),
        ('split: {val_fraction: "0.1"}\n', r"cfg\.yaml: split\.val_fraction: expected a number, got '0\.1'"),
        ("sources: {include: [a, 1]}\n", r"cfg\.yaml: sources\.include\[1\]: expected a string, got 1"),
        ("tasks: true\n", r"cfg\.yaml: tasks: expected an integer, got True"),
        ("normalize: 3\n", r"cfg\.yaml: normalize: expected a mapping, got 3"),
        ("dedup: {num_buckets: 0}\n", r"cfg\.yaml: dedup\.num_buckets must be >= 1, got 0"),
    ],
)
def test_prepare_config_values_are_type_checked(tmp_path: Path, yaml_text: str, message: str) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml_text)
    with pytest.raises(FidelError, match=message):
        load_prepare_config(config)


def test_prepare_config_accepts_ints_for_floats_and_null_for_optional(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("filters: {min_quality: 60}\nsplit: {val_fraction: 0}\nsources: {include: null}\n")
    loaded = load_prepare_config(config)
    assert loaded.filters.min_quality == 60 and loaded.sources.include is None


def test_prepare_workers_must_be_positive(tmp_path: Path) -> None:
    assert "--workers" in usage_error(["data", "prepare", str(tmp_path / "run"), "--workers", "0"])


# sft chat data


def write_chat(path: Path, lines: list[str | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


GOOD = {
    "id": "x",
    "messages": [{"role": "user", "content": "ሰላም"}, {"role": "assistant", "content": "ሰላም ነው"}],
}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {
                "id": "y",
                "messages": [{"role": "user", "content": 123}, {"role": "assistant", "content": None}],
            },
            r"train\.jsonl:2: conversation y: messages\[0\]\.content is int",
        ),
        (
            {"id": "w", "messages": [{"role": "wizard", "content": "hi"}]},
            r"train\.jsonl:2: conversation w: messages\[0\]\.role is 'wizard'",
        ),
        ({"id": "e", "messages": []}, r"train\.jsonl:2: conversation e: messages must be a non-empty list"),
        ({"messages": "hi"}, r"train\.jsonl:2: conversation train\.jsonl:2: messages must be a non-empty"),
        (
            {"id": "s", "messages": [{"role": "user", "content": "broken \ud83d emoji"}]},
            r"train\.jsonl:2: field 'messages\[0\]\.content' holds the lone surrogate \\ud83d, which UTF-8",
        ),
    ],
)
def test_sft_reads_chat_records_with_their_file_and_line(
    tmp_path: Path, bad: dict[str, Any], message: str
) -> None:
    path = write_chat(tmp_path / "train.jsonl", [json.dumps(GOOD), json.dumps(bad)])
    with pytest.raises(FidelError, match=message):
        read_conversations(path)


def test_sft_reports_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    path = write_chat(tmp_path / "train.jsonl", [json.dumps(GOOD), b'{"id": "z", "messages": "\xff\xfe"}'])
    with pytest.raises(FidelError, match=r"train\.jsonl:2: not UTF-8"):
        read_conversations(path)
    assert [r["id"] for r in read_conversations(path, max_samples=1)] == ["x"]


def test_chat_template_errors_name_the_conversation() -> None:
    with pytest.raises(FidelError, match="conversation w: chat template: unknown chat role wizard"):
        encode_conversation(ByteTokenizer(), [{"role": "wizard", "content": "hi"}], None, "w")
    with pytest.raises(FidelError, match="conversation e: a chat needs at least one message"):
        encode_conversation(ByteTokenizer(), [], None, "e")


def test_sft_says_when_every_conversation_is_longer_than_seq_len(tmp_path: Path) -> None:
    chat = tmp_path / "chat"
    write_chat(chat / "train.jsonl", [json.dumps({**GOOD, "id": f"c{i}"}) for i in range(3)])
    write_chat(chat / "eval.jsonl", [json.dumps(GOOD)])
    message = r"train\.jsonl: 3 of 3 conversations are longer than --seq-len 8 .* raise --seq-len"
    with pytest.raises(FidelError, match=message):
        chat_data(chat, ByteTokenizer(), seq_len=8, batch_size=1, seed=0, eval_batches=1)


@pytest.mark.parametrize("option", ["--epochs", "--max-samples"])
def test_sft_counts_must_be_positive(tmp_path: Path, option: str) -> None:
    assert option in usage_error(["sft", str(tmp_path), "--base", str(tmp_path), option, "0"])


# report


def results_file(tmp_path: Path, **changes: Any) -> Path:
    """A minimal valid results.json with `changes` applied (a value of ... deletes the key)."""
    entry = {"task": "flores", "metric": "bits_per_char", "value": 1.5, "n": 3, "split": "dev",
             "higher_is_better": False, "details": {}}  # fmt: skip
    fertility = {"tokens_per_word": 2.0, "bytes_per_token": 3.0}
    results = {
        "model": "m", "run": None, "parameters": 10, "results": [entry],
        "tokenizer": {"kind": "bpe", "vocab_size": 512, "flores": fertility},
    }  # fmt: skip
    for key, value in changes.items():
        if value is ...:
            del results[key]
        else:
            results[key] = value
    path = tmp_path / "eval" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return path


ENTRY = {"task": "t", "metric": "m", "value": 1.0, "n": 1, "higher_is_better": True, "details": {}}
NO_METRIC = {k: v for k, v in ENTRY.items() if k != "metric"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"results": [NO_METRIC]}, r"results\[0\]: missing field 'metric'"),
        ({"results": [ENTRY, {**ENTRY, "value": "high"}]}, r"results\[1\]: field 'value' must be a number"),
        ({"results": [ENTRY, ENTRY, 7]}, r"results\[2\]: expected an object, got 7"),
        ({"results": [{**ENTRY, "value": None}]}, r"results\[0\]: field 'value' must be a number, got None"),
        ({"model": ...}, r"results\.json: missing field 'model'"),
        ({"results": {}}, r"results\.json: field 'results' must be a list"),
        ({"tokenizer": {"kind": "bpe"}}, r"results\.json: tokenizer: missing field 'vocab_size'"),
        ({"anchors": [{"model": "x"}]}, r"results\.json: anchors\[0\]: missing field 'value'"),
    ],
)  # fmt: skip
def test_report_names_the_bad_entry_and_field(tmp_path: Path, changes: dict, message: str) -> None:
    results_file(tmp_path, **changes)
    with pytest.raises(FidelError, match=message):
        load_run(tmp_path)


def test_report_reads_a_valid_minimal_file_and_names_cut_metrics(tmp_path: Path) -> None:
    results_file(tmp_path / "a")
    card = render_markdown([load_run(tmp_path / "a")], [])
    assert "| flores | bits_per_char | lower | 1.5000 |" in card and "--limit" not in card
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / "train" / "metrics.jsonl").write_text('{"kind": "val", "step": 1}\n{"kind": "tr')
    results_file(tmp_path / "b", run=str(run))
    with pytest.raises(FidelError, match=r"metrics\.jsonl:2: not JSON"):
        load_run(tmp_path / "b")


# export


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run with a tokenizer and one checkpoint of a tiny Llama, and an HF export of it."""
    root = tmp_path_factory.mktemp("export")
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    run = root / "run"
    train_bpe(lines[:200], 512, show_progress=False).save(run / "tokenizer")
    config = gqa_config(vocab_size=512, num_hidden_layers=1)
    model = random_llama(config)
    state = {"data": {}, "model_config": config_to_dict(config)}
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoints = run / "train" / "checkpoints"
    save_checkpoint(checkpoints, 2, model, optimizer, state, keep_last=1)
    checkpoint = next(checkpoints.iterdir())
    hf = export_hf(model, config, run / "tokenizer", root / "hf", "float32")
    return {"run": run, "checkpoint": checkpoint, "hf": hf}


def test_export_refuses_to_overwrite_its_source(llama_run: dict[str, Path], capsys, tmp_path: Path) -> None:
    hf, checkpoint, run = llama_run["hf"], llama_run["checkpoint"], llama_run["run"]
    weights = (hf / "model.safetensors").read_bytes()
    assert "would overwrite the model being exported" in fails_with(
        ["export", "hf", str(hf), str(hf)], capsys
    )
    assert (hf / "model.safetensors").read_bytes() == weights  # still float32
    err = fails_with(["export", "hf", str(checkpoint), str(checkpoint)], capsys)
    assert err.startswith(f"error: {checkpoint}: lies inside {run / 'train'}") and err.count("\n") == 1
    assert "would overwrite" in fails_with(["export", "hf", str(run), str(run)], capsys)
    assert "would overwrite" in fails_with(["export", "hf", str(run), str(run / "tokenizer")], capsys)
    gguf = ["export", "gguf", str(hf), str(hf / "model.safetensors")]
    assert "would overwrite the model being exported" in fails_with(gguf, capsys)
    assert "lies inside" in fails_with(["export", "gguf", str(run), str(checkpoint / "m.gguf")], capsys)
    assert (hf / "model.safetensors").read_bytes() == weights
    main(["export", "hf", str(checkpoint), str(tmp_path / "out")])  # elsewhere: fine
    assert (tmp_path / "out" / "model.safetensors").is_file()


# eval and tokenizer report


def test_eval_limit_and_tasks_are_checked(tmp_path: Path, capsys) -> None:
    for limit in ("-1", "0"):
        assert "--limit" in usage_error(["eval", str(tmp_path), "--limit", limit])
    assert fails_with(["eval", str(tmp_path), "--tasks", ","], capsys).startswith(
        "error: --tasks ',' names no"
    )
    with pytest.raises(FidelError, match="--limit must be >= 1, got -1"):
        EvalContext(None, None, torch.device("cpu"), tmp_path, None, limit=-1)  # type: ignore[arg-type]


def test_tokenizer_report_rejects_a_negative_sample_size(tmp_path: Path, capsys) -> None:
    args = ["tokenizer", "report", str(tmp_path), "--sample-mb", "-3", "--vocab-sizes", "none"]
    assert fails_with(args, capsys) == "error: --sample-mb must be >= 0, got -3.0\n"


# serve


def test_serve_names_an_address_it_cannot_listen_on(tmp_path: Path, capsys) -> None:
    err = fails_with(["serve", str(tmp_path), "--host", "999.1.1.1", "--port", "8000"], capsys)
    assert err.startswith(
        "error: cannot listen on 999.1.1.1:8000: --host '999.1.1.1' is not an IP address or a name that"
        " resolves ("
    )
    assert err.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert fails_with(["serve", str(tmp_path), "--port", str(port)], capsys) == (
            f"error: cannot listen on 127.0.0.1:{port}: the port is already in use (another server? choose"
            " one with --port)\n"
        )


# damaged files the stages wrote: one line naming the file, never a JSONDecodeError


def test_a_damaged_tokenizer_meta_file_is_named(tmp_path: Path) -> None:
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    train_bpe(lines[:50], 512, show_progress=False).save(tmp_path / "bpe")
    ByteTokenizer().save(tmp_path / "bytes")
    loaders = {"bpe": BPETokenizer.load, "bytes": ByteTokenizer.load}
    for name, loader in loaders.items():
        meta = tmp_path / name / META_FILE
        meta.write_text(meta.read_text()[:15])
        damaged = rf"^{re.escape(str(meta))}: not valid JSON \(.*\); train the tokenizer again"
        with pytest.raises(FidelError, match=damaged):
            loader(tmp_path / name)
        with pytest.raises(FidelError, match=damaged):
            load_tokenizer(tmp_path / name)


def test_damaged_prepare_work_files_are_named(tmp_path: Path) -> None:
    layout = PrepareLayout(tmp_path / "run")
    for folder in (layout.read_counts, layout.boilerplate_examples):
        folder.mkdir(parents=True)
        (folder / "00000.json").write_text('{"mini": {"documents": 3', encoding="utf-8")
    advice = r"; a damaged intermediate file: re-run `fidellm data prepare RUN --overwrite`$"
    counts = layout.read_counts / "00000.json"
    with pytest.raises(FidelError, match=rf"^{re.escape(str(counts))}: not valid JSON .*{advice}"):
        collect(layout, [])
    examples = layout.boilerplate_examples / "00000.json"
    with pytest.raises(FidelError, match=rf"^{re.escape(str(examples))}: not valid JSON .*{advice}"):
        merge_examples(examples.parent)


@pytest.mark.parametrize("content", [b"[1, 2]", b'{"model_type": "ll\xe9ama"}', b'{"model_type": '])
def test_a_damaged_hf_config_is_named(llama_run: dict[str, Path], tmp_path: Path, content: bytes) -> None:
    copy = tmp_path / "hf"
    shutil.copytree(llama_run["hf"], copy)
    (copy / "config.json").write_bytes(content)
    with pytest.raises(
        FidelError, match=rf"^{re.escape(str(copy / 'config.json'))}: not (valid JSON|a JSON object)"
    ):
        load_hf_dir(copy)
