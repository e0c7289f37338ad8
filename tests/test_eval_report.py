"""The report card (`fidellm report`): run labels, paths `fidellm eval` records, damaged training files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fidellm.cli import main
from fidellm.errors import FidelError
from fidellm.eval.report import build_report, load_run, validation_curves
from fidellm.eval.suite import TASKS, EvalContext, default_out_dir, run_suite
from fidellm.tokenizer.bytes import ByteTokenizer


def write_results(path: Path, value: float, **changes: Any) -> Path:
    """A minimal valid results.json at `path` with one FLORES figure `value`."""
    entry = {"task": "flores", "metric": "bits_per_char", "value": value, "n": 3, "split": "dev",
             "higher_is_better": False, "details": {}}  # fmt: skip
    results = {"model": "m", "run": None, "parameters": 10, "results": [entry],
               "tokenizer": {"kind": "bpe", "vocab_size": 512, "flores": None}, **changes}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return path


def test_runs_of_the_same_name_keep_their_own_columns(tmp_path: Path) -> None:
    first = write_results(tmp_path / "x" / "demo" / "eval" / "results.json", 1.0)
    second = write_results(tmp_path / "y" / "demo" / "eval" / "results.json", 2.0)
    build_report([first, second], tmp_path / "card")
    record = json.loads((tmp_path / "card" / "report.json").read_text())
    values = record["metrics"][0]["values"]
    assert sorted(values.values()) == [1.0, 2.0]  # one run's figure silently dropped before
    assert [run["label"] for run in record["runs"]] == list(values)
    assert all(label.startswith("demo") for label in values)  # RUN/eval/results.json is RUN, not "eval"
    card = (tmp_path / "card" / "report.md").read_text()
    assert "| flores | bits_per_char | lower | 1.0000 | 2.0000 |" in card


def test_a_relative_run_path_finds_the_training_metrics_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "runs" / "demo"
    (run / "train").mkdir(parents=True)
    (run / "train" / "metrics.jsonl").write_text('{"kind": "val", "step": 1, "val_loss": 2.0}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(TASKS, "nothing", lambda ctx: [])
    context = EvalContext(
        torch.nn.Linear(2, 2), ByteTokenizer(), torch.device("cpu"), tmp_path, Path("runs/demo")
    )
    run_suite(context, ["nothing"], Path("runs/demo"), run / "eval", echo=lambda _: None)
    assert json.loads((run / "eval" / "results.json").read_text())["run"] == str(run)
    # a results.json of an older eval that recorded "runs/demo", read from elsewhere
    write_results(run / "eval" / "results.json", 1.0, run="runs/demo")
    monkeypatch.chdir(run)
    assert load_run(Path("eval")).train_records == [{"kind": "val", "step": 1, "val_loss": 2.0}]


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        ("metrics.jsonl", '{"kind": "val", "step": 1, "val_loss": 2.0}\n{"step": 2}\n',
         r"metrics\.jsonl:2: missing field 'kind'"),
        ("metrics.jsonl", "[1, 2]\n", r"metrics\.jsonl:1: expected an object, got \[1, 2\]"),
        ("metrics.jsonl", '{"kind": "val", "step": 3}\n', r"metrics\.jsonl:1: missing field 'val_loss'"),
        ("config.json", '{"train": {"seq_len": 8}}', r"config\.json: train: missing field 'batch_size'"),
        ("config.json", '{"train": {}, "world_size": "2"}', r"config\.json: field 'world_size' must be an"),
    ],
)  # fmt: skip
def test_damaged_training_files_are_named_not_a_traceback(
    tmp_path: Path, file: str, text: str, message: str
) -> None:
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / "train" / file).write_text(text)
    write_results(run / "eval" / "results.json", 1.0, run=str(run))
    with pytest.raises(FidelError, match=message):
        build_report([run], tmp_path / "card")


PROBES = {"task": "probes", "metric": "distinct_1", "value": 0.5, "n": 1, "split": "prompts",
          "higher_is_better": True}  # fmt: skip
VALIDITY = {"task": "tool-calls", "metric": "validity", "value": 0.5, "n": 2, "split": "eval",
            "higher_is_better": True}  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"results": [{**PROBES, "details": {}}]}, r"results\[0\]: details: missing field 'probes'"),
        ({"results": [{**PROBES, "details": {"probes": [{"prompt": "ቡና", "seeds": [0], "samples": []}]}}]},
         r"details\.probes\[0\]: 'samples' must be one string per seed \(1 seeds\)"),
        ({"results": [{**VALIDITY, "details": {"valid": 1}}]}, r"details: missing field 'total'"),
        ({"results": [{**VALIDITY, "details": {"valid": 1, "total": 2, "generations": 3}}]},
         r"details: field 'generations' must be a string"),
        ({"command": [1, 2]}, r"field 'command' must be a list of strings"),
    ],
)  # fmt: skip
def test_details_the_card_shows_are_checked(tmp_path: Path, changes: dict, message: str) -> None:
    path = write_results(tmp_path / "run" / "eval" / "results.json", 1.0, **changes)
    with pytest.raises(FidelError, match=message):
        build_report([path], tmp_path / "card")


def test_optional_fields_may_be_null(tmp_path: Path) -> None:
    nulls = {"anchors": None, "command": None, "provenance": None, "limit": None}
    path = write_results(tmp_path / "run" / "eval" / "results.json", 1.0, **nulls)
    assert (
        "| flores | bits_per_char | lower | 1.0000 |" in build_report([path], tmp_path / "card").read_text()
    )


def test_an_export_inside_a_run_is_evaluated_into_its_own_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for folder in ("train/checkpoints/step_00000002", "train/best", "tokenizer", "export/hf"):
        (run / folder).mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (run / "export" / "hf" / name).write_text("{}")
    assert default_out_dir(run / "export" / "hf") == run / "export" / "hf" / "eval"  # was RUN/eval
    assert default_out_dir(run) == default_out_dir(run / "train" / "best") == run / "eval"
    assert default_out_dir(run / "train" / "checkpoints" / "step_00000002") == run / "eval"


def test_the_default_card_lies_beside_the_first_runs_eval(tmp_path: Path) -> None:
    results = write_results(tmp_path / "run" / "eval" / "results.json", 1.0)
    for given in (results, results.parent, tmp_path / "run"):
        main(["report", str(given)])
        assert (tmp_path / "run" / "report" / "report.md").is_file(), given  # was RUN/eval/report
        assert not (tmp_path / "run" / "eval" / "report").exists()


def test_runs_of_different_tokenizers_are_compared_per_byte(tmp_path: Path) -> None:
    runs = {}
    for name, kind, vocab, loss in (("bpe", "bpe", 32000, 8.0), ("bytes", "bytes", 256, 1.3)):
        run = tmp_path / name
        (run / "train").mkdir(parents=True)
        (run / "train" / "metrics.jsonl").write_text(
            json.dumps({"kind": "val", "step": 10, "val_loss": loss, "val_bpb": loss / 4}) + "\n"
        )
        tokenizer = {"kind": kind, "vocab_size": vocab, "flores": None}
        write_results(run / "eval" / "results.json", 1.0, run=str(run), tokenizer=tokenizer)
        runs[name] = load_run(run)
    # nats per BPE token and nats per byte on one axis made the byte model look six times better
    assert validation_curves([runs["bpe"], runs["bytes"]]) == (
        "validation bits/byte",
        {"bpe": ([10], [2.0]), "bytes": ([10], [0.325])},
    )
    assert validation_curves([runs["bpe"]]) == ("validation loss (nats/token)", {"bpe": ([10], [8.0])})


def test_a_relative_checkpoint_path_is_evaluated_into_its_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    for folder in ("train/checkpoints/step_00000002", "train/best", "tokenizer"):
        (run / folder).mkdir(parents=True)
    monkeypatch.chdir(run / "train")
    # was train/best/eval, and checkpoints/step_00000002/eval: deleted with the checkpoint by keep_last
    assert default_out_dir(Path("best")) == run / "eval"
    assert default_out_dir(Path("checkpoints/step_00000002")) == run / "eval"


def test_a_moved_run_still_finds_its_training_metrics(tmp_path: Path) -> None:
    run = tmp_path / "moved" / "demo"
    (run / "train").mkdir(parents=True)
    (run / "train" / "metrics.jsonl").write_text('{"kind": "val", "step": 1, "val_loss": 2.0}\n')
    write_results(run / "eval" / "results.json", 1.0, run=str(tmp_path / "old" / "demo"))  # gone
    assert load_run(run).train_records == [{"kind": "val", "step": 1, "val_loss": 2.0}]


SCRIPT = """
import sys
from pathlib import Path
import torch
from fidellm.eval.report import build_report
from fidellm.eval.results import TaskResult
from fidellm.eval.suite import TASKS, EvalContext, run_suite
from fidellm.tokenizer.bytes import ByteTokenizer
out = Path(sys.argv[1])
sample = {"sample": "\\u1230 \\U0001f600"}
TASKS["ethiopic"] = lambda ctx: [TaskResult("\\u1261\\u1293", "m", 1.0, 1, details=sample)]
ctx = EvalContext(torch.nn.Linear(2, 2), ByteTokenizer(), torch.device("cpu"), out, None)
run_suite(ctx, ["ethiopic"], Path("m"), out / "run" / "eval", echo=lambda _: None)
build_report([out / "run"], out / "card")
"""


def test_results_and_report_are_utf8_whatever_the_locale(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C"}  # ASCII locale
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-600:]  # was a UnicodeEncodeError writing results.json
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_bytes())
    assert results["results"][0]["details"]["sample"] == "ሰ 😀"
    assert json.loads((tmp_path / "card" / "report.json").read_bytes())["metrics"][0]["task"] == "ቡና"


def test_compute_counts_the_positions_trained_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compute.png's D: a BPE run's tokens and a byte run's bytes, each one position of the network
    (report.json called both "training_tokens" and the axis said nothing of bytes)."""
    import matplotlib.axes

    drawn: list[tuple[float, float]] = []
    labels: list[str] = []
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", lambda ax, x, y, **kw: drawn.append((x, y)))
    original = matplotlib.axes.Axes.set
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "set",
        lambda ax, **kw: labels.append(kw.get("xlabel", "")) or original(ax, **kw),
    )
    paths = []
    for name, kind, seq_len, world, bits in (("bpe", "bpe", 64, 1, 300.0), ("hnet", "bytes", 256, 2, 250.0)):
        run = tmp_path / name
        (run / "train").mkdir(parents=True)
        (run / "train" / "metrics.jsonl").write_text(
            "".join(json.dumps({"kind": "train", "step": step}) + "\n" for step in (5, 10))
        )
        train = {"batch_size": 4, "grad_accum": 2, "seq_len": seq_len}
        (run / "train" / "config.json").write_text(json.dumps({"train": train, "world_size": world}))
        entry = {"task": "flores", "metric": "second_half_bits", "value": bits, "n": 3, "split": "dev",
                 "higher_is_better": False, "details": {}}  # fmt: skip
        tokenizer = {"kind": kind, "vocab_size": 512 if kind == "bpe" else 256, "flores": None}
        paths.append(write_results(run / "eval" / "results.json", 1.0, run=str(run), tokenizer=tokenizer,
                                   parameters=1000, results=[entry]))  # fmt: skip
    build_report(paths, tmp_path / "card")
    runs = json.loads((tmp_path / "card" / "report.json").read_text())["runs"]
    positions = {"bpe": 10 * 4 * 2 * 64, "hnet": 10 * 4 * 2 * 256 * 2}
    assert [(r["label"], r["position"], r["training_positions"], r["training_flops"]) for r in runs] == [
        ("bpe", "token", positions["bpe"], 6.0 * 1000 * positions["bpe"]),
        ("hnet", "byte", positions["hnet"], 6.0 * 1000 * positions["hnet"]),
    ]
    assert drawn == [(6.0 * 1000 * positions["bpe"], 300.0), (6.0 * 1000 * positions["hnet"], 250.0)]
    axis = next(label for label in labels if "6·N·D" in label)
    assert "positions trained" in axis and "bytes for byte-level models" in axis
