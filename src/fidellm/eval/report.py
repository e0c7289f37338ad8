"""`fidellm report RUN…`: one markdown page and PNG plots comparing runs with each other and with baselines.

Inputs are each run's eval/results.json (from `fidellm eval`) and, where present, its training metrics
(train/metrics.jsonl, train/config.json). Output: OUT/report.md (a table of every metric per run, the
compressor baselines and the published anchors labelled as published, tokenizer fertility),
OUT/curves.png (validation loss per step; bits per byte when the runs' tokenizers differ),
OUT/compute.png (FLORES second-half bits against training compute ≈ 6·N·D FLOPs, D the positions trained:
tokens, or bytes for a byte-level model, each one position of the network), for chat models a chat
section (translation chrF++/BLEU per set and direction, tool-call validity, SFT held-out loss, where the
answers were saved), and OUT/report.json (the same numbers, the sha256 of every results.json read, the
commit and the command), so each figure traces back to the command that made it.
"""

from __future__ import annotations

import json
import reprlib
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fidellm.errors import FidelError
from fidellm.eval.results import RESULTS_FILE, git_commit
from fidellm.hashing import file_sha256

BASELINE_PREFIXES = ("flores/gzip", "flores/bz2", "flores/xz", "flores/zstd")


@dataclass
class RunSummary:
    """One evaluated model: its label, results.json content and training records (if it was trained here)."""

    label: str
    results_path: Path
    results: dict[str, Any]
    train_records: list[dict[str, Any]]
    train_config: dict[str, Any] | None

    def metric(self, task: str, metric: str) -> float | None:
        found = [r["value"] for r in self.results["results"] if r["task"] == task and r["metric"] == metric]
        return found[-1] if found else None

    @property
    def position(self) -> str:
        """What one position of the model is: a "byte" (byte tokenizer, e.g. H-Net) or a "token"."""
        return "byte" if self.results["tokenizer"]["kind"] == "bytes" else "token"

    @property
    def training_positions(self) -> int | None:
        """Positions the model was trained on (steps × batch × accumulation × sequence × processes):
        tokens, or bytes for a byte-level model (`position`)."""
        if not self.train_config:
            return None
        train = self.train_config["train"]
        steps = max((r["step"] for r in self.train_records if r["kind"] == "train"), default=0)
        world = self.train_config.get("world_size", 1)
        return steps * train["batch_size"] * train["grad_accum"] * train["seq_len"] * world

    @property
    def training_flops(self) -> float | None:
        """Training compute ≈ 6·N·D with D the positions trained: every position, a token or a byte, is
        one pass through the network (for an H-Net an upper bound: its inner stages run per chunk)."""
        positions = self.training_positions
        return 6.0 * self.results["parameters"] * positions if positions else None


def locate_results(path: Path) -> Path:
    """results.json of a run directory (RUN/eval/), an eval directory, or the file itself."""
    for candidate in (path, path / RESULTS_FILE, path / "eval" / RESULTS_FILE):
        if candidate.is_file():
            return candidate
    raise FidelError(
        f"{path}: no {RESULTS_FILE} here or in {path / 'eval'} (run `fidellm eval {path}` first)"
    )


_KINDS: dict[str, Callable[[Any], bool]] = {
    "a string": lambda v: isinstance(v, str),
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "true or false": lambda v: isinstance(v, bool),
    "an object": lambda v: isinstance(v, dict),
    "a list": lambda v: isinstance(v, list),
}
"""What a field must be -> its test (JSON numbers: bool is not one)."""
RESULTS_FIELDS = {
    "model": "a string",
    "parameters": "an integer",
    "tokenizer": "an object",
    "results": "a list",
}
OPTIONAL_FIELDS = {"run": "a string", "anchors": "a list", "command": "a list", "provenance": "an object"}
"""Top-level fields of results.json the report reads; the optional ones may be missing or null."""
ENTRY_FIELDS = {
    "task": "a string",
    "metric": "a string",
    "value": "a number",  # TaskResult.value is a float: `fidellm eval` never writes null
    "n": "an integer",
    "higher_is_better": "true or false",
    "details": "an object",
}
TOKENIZER_FIELDS = {"kind": "a string", "vocab_size": "an integer"}
FERTILITY_FIELDS = {"tokens_per_word": "a number", "bytes_per_token": "a number"}
ANCHOR_FIELDS = {"model": "a string", "value": "a number", "source": "a string"}
PROBE_FIELDS = {"prompt": "a string", "seeds": "a list", "samples": "a list"}
VALIDITY_FIELDS = {"valid": "an integer", "total": "an integer"}
CHAT_DETAIL_FIELDS = {"signature": "a string", "generations": "a string"}
"""Details of probe, tool-call validity and chat results the report reads (the chat ones where present)."""
RECORD_FIELDS = {"kind": "a string", "step": "an integer"}
VAL_RECORD_FIELDS = {"val_loss": "a number"}
TRAIN_CONFIG_FIELDS = {"batch_size": "an integer", "grad_accum": "an integer", "seq_len": "an integer"}
"""What the report reads of a run's train/metrics.jsonl records (val ones: the loss) and train/config.json."""


def _check_fields(record: Any, fields: dict[str, str], where: str, optional: bool = False) -> None:
    """FidelError naming `where` and the field when `record` lacks one of `fields` or has it of another
    kind (`optional`: missing or null is fine)."""
    if not isinstance(record, dict):
        raise FidelError(f"{where}: expected an object, got {reprlib.repr(record)}")
    for key, kind in fields.items():
        if optional and record.get(key) is None:
            continue
        if key not in record:
            raise FidelError(f"{where}: missing field {key!r}")
        if not _KINDS[kind](record[key]):
            raise FidelError(f"{where}: field {key!r} must be {kind}, got {reprlib.repr(record[key])}")


def check_results(results: Any, path: Path) -> None:
    """Check every part of a results.json the report card reads, so a malformed file is one FidelError
    naming the file, the entry and the field instead of a KeyError or TypeError while rendering."""
    _check_fields(results, RESULTS_FIELDS, str(path))
    _check_fields(results, OPTIONAL_FIELDS, str(path), optional=True)
    _check_fields(results["tokenizer"], TOKENIZER_FIELDS, f"{path}: tokenizer")
    if results["tokenizer"].get("flores") is not None:  # null: evaluated without the FLORES files
        _check_fields(results["tokenizer"]["flores"], FERTILITY_FIELDS, f"{path}: tokenizer.flores")
    for index, anchor in enumerate(results.get("anchors") or []):
        _check_fields(anchor, ANCHOR_FIELDS, f"{path}: anchors[{index}]")
    if not all(isinstance(word, str) for word in results.get("command") or []):
        raise FidelError(
            f"{path}: field 'command' must be a list of strings, got {reprlib.repr(results['command'])}"
        )
    for index, entry in enumerate(results["results"]):
        where = f"{path}: results[{index}]"
        _check_fields(entry, ENTRY_FIELDS, where)
        _check_details(entry, where)


def _check_details(entry: dict[str, Any], where: str) -> None:
    """The details the report card shows: each probe's prompt, seeds and samples (as many), tool-call
    validity's valid/total, and the chat results' sacrebleu signature and generations path."""
    details = entry["details"]
    if entry["task"] == "probes":
        _check_fields(details, {"probes": "a list"}, f"{where}: details")
        for number, probe in enumerate(details["probes"]):
            here = f"{where}: details.probes[{number}]"
            _check_fields(probe, PROBE_FIELDS, here)
            if len(probe["seeds"]) != len(probe["samples"]) or not all(
                isinstance(t, str) for t in probe["samples"]
            ):
                raise FidelError(
                    f"{here}: 'samples' must be one string per seed ({len(probe['seeds'])} seeds)"
                )
    if entry["task"].startswith(CHAT_TASK_PREFIXES):
        _check_fields(details, CHAT_DETAIL_FIELDS, f"{where}: details", optional=True)
        if entry["metric"] == "validity":
            _check_fields(details, VALIDITY_FIELDS, f"{where}: details")


def _json(text: bytes, where: str) -> Any:
    """Parsed JSON; bad JSON or UTF-8 is a FidelError naming `where` (a training run killed mid-write
    leaves a cut last line in metrics.jsonl)."""
    try:
        return json.loads(text)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise FidelError(f"{where}: not JSON: {error}") from None


def load_run(path: Path) -> RunSummary:
    """A run's results.json (checked: `check_results`) with its training metrics and config, if any."""
    results_path = locate_results(path)
    results = _json(results_path.read_bytes(), f"{results_path}: not a fidellm results file")
    check_results(results, results_path)
    records, config = training_files(run_directory(results.get("run"), results_path))
    return RunSummary(run_label(path), results_path, results, records, config)


def training_files(run: Path | None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """RUN/train/metrics.jsonl's records and RUN/train/config.json, where present, with the fields the
    report reads checked, so a damaged file is one FidelError naming file:line and field."""
    if run is None:
        return [], None
    metrics, config_path = run / "train" / "metrics.jsonl", run / "train" / "config.json"
    lines = enumerate(metrics.read_bytes().splitlines(), 1) if metrics.is_file() else []
    numbered = [(number, _json(line, f"{metrics}:{number}")) for number, line in lines if line.strip()]
    for number, record in numbered:  # a cut line is named first, wherever it is
        _check_fields(record, RECORD_FIELDS, f"{metrics}:{number}")
        if record["kind"] == "val":
            _check_fields(record, VAL_RECORD_FIELDS, f"{metrics}:{number}")
    records = [record for _, record in numbered]
    if not config_path.is_file():
        return records, None
    config = _json(config_path.read_bytes(), str(config_path))
    _check_fields(config, {"train": "an object"}, str(config_path))
    _check_fields(config, {"world_size": "an integer"}, str(config_path), optional=True)
    _check_fields(config["train"], TRAIN_CONFIG_FIELDS, f"{config_path}: train")
    return records, config


def run_directory(recorded: str | None, results_path: Path) -> Path | None:
    """The run directory a results.json names. A relative one (an older `fidellm eval` recorded it as
    given, relative to its working directory) is the folder holding RUN/eval/results.json when that
    folder's path ends with it, so the training metrics are found from any directory; so is a run no
    longer where it was recorded (moved) when that folder has its name."""
    if not recorded:
        return None
    run = Path(recorded)
    above = results_path.resolve().parent.parent
    if not run.is_absolute() and run.parts and above.parts[-len(run.parts) :] == run.parts:
        return above
    if not run.is_dir() and run.name and above.name == run.name:  # the run was moved since
        return above
    return run


def run_folder(path: Path) -> Path:
    """The run a report input stands for (resolved): the directory named, or for RUN/eval (or a
    results.json in it) RUN."""
    folder = (path if path.is_dir() else path.parent).resolve()
    return folder.parent if folder.name == "eval" and folder.parent.name else folder


def run_label(path: Path) -> str:
    """A run's name in the report: its run folder's name (`run_folder`)."""
    return run_folder(path).name


def distinct_labels(runs: list[RunSummary]) -> None:
    """Number the labels that several runs share ("demo (1)", "demo (2)"): report.json keys each metric's
    values by label, so runs of the same name would otherwise keep only the last one's figure."""
    counts = Counter(run.label for run in runs)
    seen: Counter[str] = Counter()
    for run in runs:
        if counts[run.label] > 1:
            seen[run.label] += 1
            run.label = f"{run.label} ({seen[run.label]})"


def metric_rows(runs: list[RunSummary]) -> list[tuple[str, str, bool, list[float | None]]]:
    """(task, metric, higher_is_better, value per run) for every model metric any run has, in first-seen
    order; compressor baselines are left to their own table."""
    seen: dict[tuple[str, str], bool] = {}
    for run in runs:
        for r in run.results["results"]:
            if not r["task"].startswith(BASELINE_PREFIXES):
                seen.setdefault((r["task"], r["metric"]), r["higher_is_better"])
    return [
        (task, metric, better, [run.metric(task, metric) for run in runs])
        for (task, metric), better in seen.items()
    ]


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def render_markdown(runs: list[RunSummary], plots: list[str]) -> str:
    names = [run.label for run in runs]
    lines = ["# fidel-lm report card", ""]
    described = ", ".join("`{}` ({})".format(r.label, r.results["model"]) for r in runs)
    lines += [f"Runs: {described}.", ""]
    lines += ["## Every metric", "", "| task | metric | better | " + " | ".join(names) + " |"]
    lines += ["|---|---|---|" + "---|" * len(runs)]
    for task, metric, better, values in metric_rows(runs):
        arrow = "higher" if better else "lower"
        lines.append(f"| {task} | {metric} | {arrow} | " + " | ".join(map(_cell, values)) + " |")
    lines += limit_notes(runs)
    lines += ["", "## Baselines on the same FLORES text (computed here)", ""]
    lines += ["| compressor | bits/char | bits/char after the training text |", "|---|---|---|"]
    first = runs[0]
    for prefix in BASELINE_PREFIXES:
        name = prefix.split("/")[1]
        alone, primed = (
            first.metric(prefix, "bits_per_char"),
            first.metric(f"{prefix}+train", "bits_per_char"),
        )
        if alone is not None:
            lines.append(f"| {name} | {_cell(alone)} | {_cell(primed)} |")
    lines += ["", "## Published anchors (FLORES amh second-half bits; published, not recomputed)", ""]
    lines += ["| model | bits | source |", "|---|---|---|"]
    lines += [
        f"| {a['model']} | {a['value']:.2f} | {a['source']} |" for a in first.results.get("anchors") or []
    ]
    lines += ["", "## Tokenizers (FLORES amh dev + devtest)", ""]
    lines += ["| run | kind | vocab | tokens/word | bytes/token |", "|---|---|---|---|---|"]
    for run in runs:
        tok = run.results["tokenizer"]
        flores = tok.get("flores")
        fertility = (
            f"{flores['tokens_per_word']:.3f} | {flores['bytes_per_token']:.2f}" if flores else "n/a | n/a"
        )
        lines.append(f"| {run.label} | {tok['kind']} | {tok['vocab_size']:,} | {fertility} |")
    lines += probe_section(runs)
    lines += chat_section(runs)
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Provenance", ""]
    for run in runs:
        prov = run.results.get("provenance") or {}
        lines.append(
            f"- `{run.label}`: `{' '.join(run.results.get('command') or [])}` at commit {prov.get('commit')},"
            f" {prov.get('hardware')}, {prov.get('wall_seconds')} s; {run.results_path}"
        )
    return "\n".join(lines) + "\n"


def limit_notes(runs: list[RunSummary]) -> list[str]:
    """A note for each run evaluated with --limit: its sampled figures are not comparable with published
    ones (FLORES and the compressors always use every line)."""
    notes = [
        f"- `{run.label}` ran with `--limit {run.results['limit']}`: held-out, downstream and chat figures"
        " are on at most that many items per split, so they are not comparable with published ones"
        " (FLORES and the baselines use every line)."
        for run in runs
        if run.results.get("limit") is not None
    ]
    return ["", *notes] if notes else []


def probe_section(runs: list[RunSummary]) -> list[str]:
    """Every sampled probe continuation of every run, as generated (seeds 0..n-1, nothing picked)."""
    lines = []
    for run in runs:
        probes = next((r["details"]["probes"] for r in run.results["results"] if r["task"] == "probes"), None)
        if not probes:
            continue
        if not lines:
            lines = ["", "## Generation probes (all samples, seeds 0..n-1)", ""]
        lines += [f"### {run.label}", ""]
        for probe in probes:
            for seed, text in zip(probe["seeds"], probe["samples"], strict=True):
                shown = " ".join(text.split())
                lines.append(f"- {probe['prompt']} → {shown} _(seed {seed})_")
    return lines


CHAT_TASK_PREFIXES = ("sft-heldout", "tool-calls", "translation/", "instructions-am", "chat/")
"""Task names of fidellm.eval.chat's results."""


def _chat_cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "–"
    if result["metric"] == "validity":
        return f"{result['details']['valid']}/{result['details']['total']} ({result['value']:.1%})"
    return f"{_cell(result['value'])} (n={result['n']})"


def chat_section(runs: list[RunSummary]) -> list[str]:
    """The chat evaluations (fidellm.eval.chat) of the runs that have them: each figure with its item
    count (tool-call validity as valid/total), sacrebleu's signatures and where the answers were saved."""
    chat = {
        run.label: [r for r in run.results["results"] if r["task"].startswith(CHAT_TASK_PREFIXES)]
        for run in runs
    }
    chat = {label: results for label, results in chat.items() if results}
    if not chat:
        return []
    lines = ["", "## Chat evaluations", "", "| task | metric | " + " | ".join(chat) + " |"]
    lines += ["|---|---|" + "---|" * len(chat)]
    found = {label: {(r["task"], r["metric"]): r for r in results} for label, results in chat.items()}
    for task, metric in dict.fromkeys(key for results in found.values() for key in results):
        cells = [_chat_cell(results.get((task, metric))) for results in found.values()]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    signatures = {
        r["metric"]: r["details"]["signature"] for results in chat.values() for r in results
        if "signature" in r["details"]
    }  # fmt: skip
    lines += ["", *(f"sacrebleu {metric} signature: `{sig}`" for metric, sig in signatures.items())]
    lines += ["", "Answers saved for reading (JSONL: prompt, reference, answer):", ""]
    for label, results in chat.items():
        paths = dict.fromkeys(r["details"]["generations"] for r in results if "generations" in r["details"])
        lines.append(f"- `{label}`: " + ", ".join(f"`{path}`" for path in paths))
    return lines


def validation_curves(runs: list[RunSummary]) -> tuple[str, dict[str, tuple[list[int], list[float]]]]:
    """(y-axis label, run label -> (steps, values)) of the trained runs' validation records: the loss in
    nats per token, or, when the runs' tokenizers differ (a BPE model's token is not a byte model's),
    the bits per byte `val_bpb` that every validation record also holds, which compares them."""
    trained = [run for run in runs if run.train_records]
    val = {run.label: [r for r in run.train_records if r["kind"] == "val"] for run in trained}
    tokenizers = {
        (run.results["tokenizer"]["kind"], run.results["tokenizer"]["vocab_size"]) for run in trained
    }
    per_byte = len(tokenizers) > 1 and all(
        _KINDS["a number"](record.get("val_bpb")) for records in val.values() for record in records
    )
    key, ylabel = (
        ("val_bpb", "validation bits/byte") if per_byte else ("val_loss", "validation loss (nats/token)")
    )
    return ylabel, {label: ([r["step"] for r in rs], [r[key] for r in rs]) for label, rs in val.items()}


COMPUTE_AXIS = (
    "training compute ≈ 6·N·D (FLOPs), D = positions trained:\ntokens, or bytes for byte-level models"
    " (for H-Net an upper bound)"
)
"""compute.png's x-axis: a BPE model's D counts tokens and a byte model's bytes, each one position."""


def plot(runs: list[RunSummary], out_dir: Path) -> list[str]:
    """curves.png (validation loss per step) and compute.png (FLORES bits vs training compute)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ylabel, curves = validation_curves(runs)
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, (steps, values) in curves.items():
            ax.plot(steps, values, "o-", label=label)
        ax.set(xlabel="step", ylabel=ylabel, title="training curves")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "curves.png", dpi=100)
        plt.close(fig)
        written.append("curves.png")
    points = [
        (r.training_flops, r.metric("flores", "second_half_bits"), r.label)
        for r in runs
        if r.training_flops and r.metric("flores", "second_half_bits") is not None
    ]
    if points:
        fig, ax = plt.subplots(figsize=(7, 4))
        for flops, bits, label in points:
            ax.scatter(flops, bits)
            ax.annotate(label, (flops, bits))
        for anchor in runs[0].results.get("anchors") or []:
            ax.axhline(anchor["value"], linestyle=":", linewidth=0.8, color="gray")
            ax.annotate(f"{anchor['model']} (published)", (points[0][0], anchor["value"]), fontsize=7)
        ax.set(xscale="log", xlabel=COMPUTE_AXIS, ylabel="FLORES second-half bits")
        fig.tight_layout()
        fig.savefig(out_dir / "compute.png", dpi=100)
        plt.close(fig)
        written.append("compute.png")
    return written


def build_report(paths: list[Path], out_dir: Path) -> Path:
    """Write OUT/report.md, its plots and OUT/report.json for the runs at `paths`; returns report.md."""
    if not paths:
        raise FidelError("report: name at least one run directory or results.json")
    runs = [load_run(Path(p)) for p in paths]
    distinct_labels(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(runs, out_dir)
    (out_dir / "report.md").write_text(render_markdown(runs, plots), encoding="utf-8")
    record = {
        "command": sys.argv,
        "commit": git_commit(),
        "runs": [
            {"label": r.label, "results": str(r.results_path), "sha256": file_sha256(r.results_path),
             "training_positions": r.training_positions, "position": r.position,
             "training_flops": r.training_flops}
            for r in runs
        ],
        "metrics": [
            {"task": t, "metric": m, "higher_is_better": b,
             "values": dict(zip([r.label for r in runs], v, strict=True))}
            for t, m, b, v in metric_rows(runs)
        ],
        "plots": plots,
    }  # fmt: skip
    text = json.dumps(record, indent=1, ensure_ascii=False) + "\n"
    (out_dir / "report.json").write_text(text, encoding="utf-8")
    return out_dir / "report.md"
