"""`fidellm eval MODEL` (the evaluation suite) and `fidellm report RUN…` (the report card)."""

from __future__ import annotations

from pathlib import Path

import click

from fidellm.data.cli import DATA_DIR_OPTION

DEFAULT_TASKS = "flores,heldout,baselines,probes,sib200,afrisenti,masakhanews,masakhaner"
CHAT_GROUP = "chat"
"""Added to DEFAULT_TASKS when MODEL is a chat fine-tune (fidellm.eval.chat)."""


@click.command("eval")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@DATA_DIR_OPTION
@click.option(
    "--run",
    "run_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Run directory for the held-out split and the compressors' training context (default: MODEL"
    " itself when it is a run directory).",
)
@click.option(
    "--tasks",
    default=None,
    help=f"Comma-separated tasks or groups. Default: {DEFAULT_TASKS}, plus the group {CHAT_GROUP!r}"
    " (sft-heldout,tool-calls,translation,instructions-am,chat-bench) when MODEL is a `fidellm sft` run.",
)
@click.option(
    "--chat-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="`fidellm data chat` output whose eval.jsonl the chat tasks read (default: the directory MODEL"
    " was fine-tuned on, else RUN/chat).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="At most N items per task split (quick checks).",
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Default: RUN/eval or MODEL/eval."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda…")
@click.option("--seed", default=1234, show_default=True, help="Seed of few-shot draws and trained heads.")
def eval_command(
    model: Path,
    data_dir: Path | None,
    run_dir: Path | None,
    tasks: str | None,
    chat_dir: Path | None,
    limit: int | None,
    out: Path | None,
    device: str,
    seed: int,
) -> None:
    """Evaluate MODEL (a run directory, a checkpoint or an exported HF directory): FLORES second-half
    bits, bits/byte and bits/char, held-out documents, compressor baselines, generation probes, the
    downstream tasks and, for a chat model, the chat tasks (translation chrF++/BLEU, SFT held-out loss,
    tool-call validity, answers saved to OUT/generations); writes results.json (every figure with its
    provenance)."""
    from fidellm.errors import FidelError
    from fidellm.eval.chat_data import sft_chat_dir
    from fidellm.eval.suite import EvalContext, default_out_dir, run_suite
    from fidellm.models.load import load_model
    from fidellm.paths import make_output_dir, resolve_data_dir
    from fidellm.tokenizer.base import load_tokenizer
    from fidellm.train.distributed import pick_device

    requested = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None
    if requested == []:  # checked before the model loads
        raise FidelError(f"--tasks {tasks!r} names no task; e.g. --tasks flores,probes")
    torch_device = pick_device(device)
    network, tokenizer_dir = load_model(model, torch_device)
    if run_dir is None and (tokenizer_dir.parent / "data" / "splits").is_dir():
        run_dir = tokenizer_dir.parent
    tuned_on = sft_chat_dir(model.resolve())
    names = requested or DEFAULT_TASKS.split(",") + ([CHAT_GROUP] if tuned_on is not None else [])
    if chat_dir is None:
        chat_dir = tuned_on or (
            run_dir / "chat" if run_dir is not None and (run_dir / "chat").is_dir() else None
        )
    if run_dir is None and "heldout" in names:
        names.remove("heldout")
        click.echo("heldout skipped: no run directory with data/splits (pass --run RUN)", err=True)
        if not names:
            raise FidelError("--tasks: nothing left to run (heldout needs a run directory: pass --run RUN)")
    context = EvalContext(
        network.eval(),
        load_tokenizer(tokenizer_dir),
        torch_device,
        resolve_data_dir(data_dir),
        run_dir,
        limit,
        seed,
        tokenizer_dir=tokenizer_dir,
        chat_dir=chat_dir,
    )
    out_dir = out or default_out_dir(model)
    make_output_dir(out_dir)
    run_suite(context, names, model, out_dir, echo=click.echo)
    click.echo(f"results: {out_dir / 'results.json'}")


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Default: FIRST_RUN/report (beside its eval/).",
)
def report_command(runs: tuple[Path, ...], out: Path | None) -> None:
    """Report card of RUNS (run directories or results.json files from `fidellm eval`): report.md with
    every metric side by side, the compressor baselines and published anchors, tokenizer fertility,
    curves.png and compute.png, and report.json tracing each number to its command and commit."""
    from fidellm.eval.report import build_report, run_folder
    from fidellm.paths import make_output_dir

    out_dir = out or run_folder(runs[0]) / "report"
    make_output_dir(out_dir)
    path = build_report(list(runs), out_dir)
    click.echo(f"report card: {path}")
