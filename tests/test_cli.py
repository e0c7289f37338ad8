"""The `fidellm` command end to end on a small real source: prepare -> tokenizer train/report -> tokenize."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fidellm.cli import cli, main
from fidellm.tokenizer.shards import TokenShards


def test_every_command_has_help():
    runner = CliRunner()
    for args in (
        [],
        ["data"],
        ["data", "prepare"],
        ["data", "tokenize"],
        ["data", "download"],
        ["data", "sources"],
        ["tokenizer"],
        ["tokenizer", "train"],
        ["tokenizer", "report"],
        ["train"],
        ["generate"],
        ["export"],
        ["export", "hf"],
    ):
        result = runner.invoke(cli, [*args, "--help"])
        assert result.exit_code == 0, (args, result.output)
        assert "Usage:" in result.output and len(result.output) > 200


def test_the_command_starts_without_torch_and_generate_names_load_on_use():
    """`fidellm --help` and the data and tokenizer stages do not pay for importing torch (about 1.5 s)."""
    code = (
        "import sys, fidellm.cli, fidellm.generate as g\n"
        "assert 'torch' not in sys.modules, 'importing the CLI imported torch'\n"
        "assert all(getattr(g, name) for name in g.__all__) and 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_sources_lists_registry():
    result = CliRunner().invoke(cli, ["data", "sources"])
    assert result.exit_code == 0
    assert "enh_corpus" in result.output and "flores200" in result.output


def test_pipeline_end_to_end_on_small_source(tmp_path):
    run = tmp_path / "run"
    runner = CliRunner()
    source = ["--sources", "african_storybook_am,amharic_fb_comments", "--workers", "1"]
    result = runner.invoke(cli, ["data", "prepare", str(run), *source], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "kept" in result.output and (run / "data" / "report.md").is_file()
    report = json.loads((run / "data" / "report.json").read_text())
    assert set(report["sources"]) == {"african_storybook_am", "amharic_fb_comments"}

    result = runner.invoke(cli, ["tokenizer", "train", str(run), "--vocab-size", "1024", "--quiet"])
    assert result.exit_code == 0, result.output
    report_args = ["tokenizer", "report", str(run / "tokenizer"), "--vocab-sizes", "none", "--quiet"]
    result = runner.invoke(cli, report_args)
    assert result.exit_code == 0, result.output
    tok_report = json.loads((run / "tokenizer" / "report.json").read_text())
    assert tok_report["measured"][0]["roundtrip_rate"] == 1.0

    result = runner.invoke(cli, ["data", "tokenize", str(run), "--workers", "1"])
    assert result.exit_code == 0, result.output
    shards = TokenShards.from_run(run, "train")
    kept_train = report["sources"]["amharic_fb_comments"]["kept_by_split"]["train"]["docs"]
    kept_train += report["sources"]["african_storybook_am"]["kept_by_split"].get("train", {}).get("docs", 0)
    assert len(shards) == kept_train

    train_args = ["train", str(run), "--steps", "6", "--seq-len", "64", "--batch-size", "2", "--warmup", "2"]
    result = runner.invoke(cli, [*train_args, "--eval-every", "3", "--save-every", "3"])
    assert result.exit_code == 0, result.output
    assert "val bits/byte" in result.output and (run / "train" / "metrics.jsonl").is_file()

    generate_args = ["--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"]
    result = runner.invoke(cli, ["generate", str(run), "ሰላም", *generate_args])
    assert result.exit_code == 0, result.output
    streamed = result.output.strip()
    assert streamed.startswith("ሰላም")

    export_dir = tmp_path / "hf"
    result = runner.invoke(cli, ["export", "hf", str(run), str(export_dir), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["generate", str(export_dir), "ሰላም", *generate_args])
    assert result.exit_code == 0 and result.output.strip() == streamed  # same weights, same greedy text


def test_user_errors_are_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["data", "prepare", str(tmp_path / "r"), "--sources", "no_such_source"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no_such_source" in err
    with pytest.raises(SystemExit) as stop:
        main(["data", "tokenize", str(tmp_path / "missing")])
    assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop:
        main(["tokenizer", "train", str(tmp_path / "missing")])
    assert stop.value.code == 2
    capsys.readouterr()
    for command in (["generate", str(tmp_path), "ሰላም"], ["chat", str(tmp_path)]):
        with pytest.raises(SystemExit) as stop:  # refused before any model is loaded
            main([*command, "--seed", str(2**64)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: generation: seed must be in")
        assert err.count("\n") == 1
