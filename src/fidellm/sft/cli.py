"""`fidellm sft`: supervised chat fine-tuning of a trained model on RUN/chat (full or LoRA)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import click

from fidellm.errors import FidelError
from fidellm.train.cli import curriculum_options, optimizer_options


def prepare_output(output: Path, base: str) -> None:
    """Give OUTPUT its tokenizer: the base model's, saved into OUTPUT/tokenizer (an existing one must be
    the same tokenizer), so checkpoints in OUTPUT load with the tokenizer they were trained with."""
    from fidellm.models.load import load_model
    from fidellm.tokenizer.base import load_tokenizer

    _, tokenizer_dir = load_model(base)
    tokenizer = load_tokenizer(tokenizer_dir)
    target = output / "tokenizer"
    if target.exists():
        if load_tokenizer(target).fingerprint() != tokenizer.fingerprint():
            raise FidelError(
                f"{target}: another tokenizer than the base's ({tokenizer_dir}); use a new --output-dir"
            )
        return
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file where a folder should be, no permission, ...
        raise FidelError(f"--output-dir {output}: cannot create it: {error.strerror}") from error
    tokenizer.save(target)


def _first_missing(path: Path) -> Path | None:
    """The outermost of `path` and its parents that does not exist yet (what `mkdir(parents=True)`
    creates), or None when `path` exists."""
    missing = [p for p in (path, *path.parents) if not (p.exists() or p.is_symlink())]
    return missing[-1] if missing else None


@contextlib.contextmanager
def removed_on_failure(output: Path) -> Iterator[None]:
    """When the run is refused (a FidelError) before it saved a checkpoint, remove what it created, so a
    rerun starts clean (no tokenizer/ of a failed start to refuse or confuse it): OUTPUT itself, and the
    parents made for it, when it did not exist; else only the tokenizer/ and train/ it added. A directory
    the user had is never removed, a run with a checkpoint is kept whole (a rerun resumes it), and an
    interrupted or crashed run keeps its logs for the user to read."""
    from fidellm.train.checkpoint import latest_checkpoint

    created = _first_missing(output)
    had = {child.name for child in output.iterdir()} if created is None and output.is_dir() else set()
    try:
        yield
    except FidelError:
        if latest_checkpoint(output / "train" / "checkpoints") is None:
            added = [output / name for name in ("tokenizer", "train") if name not in had]
            for path in [created] if created is not None else added:
                shutil.rmtree(path, ignore_errors=True)
        raise


def _refuse_lora_options(merge: bool) -> None:
    """FidelError naming the LoRA-only options given on the command line of a full fine-tuning, which
    would otherwise be silently ignored."""
    context = click.get_current_context()
    given = [
        ("--merge" if merge else "--no-merge") if name == "merge" else "--" + name.replace("_", "-")
        for name in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "merge")
        if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    if given:
        raise FidelError(
            f"{', '.join(given)} apply to LoRA only, and this is full fine-tuning: add --use-lora (or"
            " --qlora), or leave them out"
        )


@click.command("sft")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--base", required=True, help="Model to fine-tune: exported dir, checkpoint or run dir.")
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the SFT run goes (its tokenizer/, train/, merged/).  [default: RUN_DIR/sft]",
)
@click.option("--use-lora/--full", default=False, show_default=True, help="LoRA adapters or all weights.")
@click.option("--lora-rank", default=16, show_default=True)
@click.option("--lora-alpha", default=32.0, show_default=True)
@click.option("--lora-dropout", default=0.0, show_default=True)
@click.option(
    "--lora-targets",
    default=None,
    help="Comma-separated Linear layer names that get adapters [default: the architecture's attention,"
    " mixer and MLP projections: q/k/v/o_proj,gate/up/down_proj (Llama); Wqkv,out_proj,in_proj,fc1,fc2"
    " (H-Net)].",
)
@click.option(
    "--qlora",
    is_flag=True,
    help="QLoRA: LoRA on a frozen 4-bit NF4 base (bitsandbytes: pip install 'fidel-lm[qlora]'; meant for"
    " CUDA, also runs on CPU). Implies --use-lora.",
)
@click.option(
    "--merge/--no-merge",
    default=True,
    show_default=True,
    help="LoRA: after training, merge the adapters into OUTPUT/merged (a plain model).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Passes over the packed training rows.",
)
@click.option("--batch-size", default=8, show_default=True, help="Packed rows per micro-batch.")
@click.option("--grad-accum", default=1, show_default=True)
@click.option("--seq-len", default=1024, show_default=True, help="Tokens per packed row.")
@click.option("--lr", default=2e-4, show_default=True, help="Peak learning rate (cosine schedule).")
@click.option("--warmup", "warmup_steps", default=20, show_default=True, help="Linear warmup steps.")
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option(
    "--max-samples", type=click.IntRange(min=1), default=None, help="Train on the first N conversations only."
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True
)
@click.option("--device", default="auto", show_default=True)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True)
@click.option("--eval-every", default=200, show_default=True, help="Masked eval.jsonl loss every N steps.")
@click.option("--eval-batches", default=20, show_default=True)
@click.option("--log-every", default=10, show_default=True)
@click.option("--save-every", default=500, show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True)
@optimizer_options
@curriculum_options("the conversations")
def sft_command(
    run_dir: Path,
    base: str,
    output_dir: Path | None,
    use_lora: bool,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    lora_targets: str | None,
    qlora: bool,
    merge: bool,
    **options: object,
) -> None:
    """Fine-tune BASE on RUN_DIR/chat/{train,eval}.jsonl (from `fidellm data chat`), loss on assistant
    tokens only; writes OUTPUT/train/ like `fidellm train` (metrics, checkpoints, best) and, with LoRA,
    the merged model OUTPUT/merged. Reruns resume; export with `fidellm export hf OUTPUT[/merged]`."""
    from fidellm.sft.lora import lora_spec, merge_run
    from fidellm.train.config import TrainConfig
    from fidellm.train.loop import train

    if not (use_lora or qlora):
        _refuse_lora_options(merge)
    output = output_dir or run_dir / "sft"
    quantize = "nf4" if qlora else None
    spec = (
        lora_spec(lora_rank, lora_alpha, lora_targets, lora_dropout, quantize) if use_lora or qlora else None
    )
    config = TrainConfig(
        data="chat",
        chat_dir=str((run_dir / "chat").resolve()),  # absolute: eval finds it from any directory
        base=str(Path(base).resolve()),  # a resumed run compares it, from whatever directory
        preset=None,  # the base's own config trains
        lora=spec,
        max_steps=1,
        **options,  # type: ignore[arg-type]
    )
    with removed_on_failure(output):
        prepare_output(output, base)
        summary = train(output, config)
    val = summary.get("val_loss")  # none when a finished run is resumed with nothing left to train
    click.echo(
        f"step {summary['step']}: "
        + (f"val loss {val:.4f} (assistant tokens); " if val is not None else "")
        + f"checkpoint {summary['checkpoint']}"
    )
    if spec is not None and merge:
        click.echo(f"merged LoRA model: {merge_run(output)}")
