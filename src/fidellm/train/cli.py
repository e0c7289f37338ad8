"""`fidellm train`: pretrain a model on a run's token shards (resumes by default)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fidellm.errors import FidelError
from fidellm.train.curriculum import DEFAULT_SPAN


def given(name: str) -> bool:
    """Whether the current command's option `name` came from the user, not its default (so an explicit
    value equal to the default counts as given)."""
    source = click.get_current_context().get_parameter_source(name)
    return source is not None and source is not click.core.ParameterSource.DEFAULT


def curriculum_options(what: str, note: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The --curriculum and --curriculum-span options `fidellm train` and `fidellm sft` share; a span
    given without --curriculum is refused (it would be silently ignored)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def checked(**options: Any) -> Any:
            if given("curriculum_span") and not options["curriculum"]:
                raise FidelError(
                    "--curriculum-span applies with --curriculum only (the data is drawn shuffled"
                    " without it): add --curriculum, or leave it out"
                )
            return command(**options)

        with_span = click.option(
            "--curriculum-span",
            type=float,
            default=DEFAULT_SPAN,
            show_default=True,
            help="With --curriculum: the share of the steps over which the five stages are unlocked; all"
            " data is drawn after it.",
        )(checked)
        return click.option(
            "--curriculum/--no-curriculum",
            default=False,
            show_default=True,
            help=f"Easy to hard: draw {what} by complexity stage, beginner first (docs/curriculum.md){note}.",
        )(with_span)

    return decorate


def optimizer_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The optimizer, AdamW, clipping, schedule-floor, weight-average and checkpoint-count options
    `fidellm train` and `fidellm sft` share (TrainConfig's defaults)."""
    options = [
        click.option(
            "--optimizer",
            type=click.Choice(["adamw", "muon"]),
            default="adamw",
            show_default=True,
            help="muon: Muon (fidellm.train.muon) on the hidden weight matrices, AdamW on the"
            " embeddings, output head, norms and vectors, at the same --lr and --weight-decay (Muon's update"
            " is scaled to AdamW's size).",
        ),
        click.option(
            "--min-lr-ratio",
            type=click.FloatRange(0, 1),
            default=0.1,
            show_default=True,
            help="The schedule ends at this fraction of the peak learning rate.",
        ),
        click.option("--beta1", type=click.FloatRange(0, 1, max_open=True), default=0.9, show_default=True),
        click.option("--beta2", type=click.FloatRange(0, 1, max_open=True), default=0.95, show_default=True),
        click.option(
            "--grad-clip",
            type=click.FloatRange(min=0),
            default=1.0,
            show_default=True,
            help="Clip the global gradient norm to this (0: no clipping).",
        ),
        click.option(
            "--ema-decay",
            type=float,
            default=None,
            help="Keep an exponential moving average of the weights with this decay (0.99: about the last"
            " 100 steps, 0.999: 1,000); validation, train/best, generation and export then use the average.",
        ),
        click.option(
            "--keep-last",
            type=click.IntRange(min=0),
            default=3,
            show_default=True,
            help="Checkpoints kept (the newest; 0 keeps all). The best-validation weights are kept apart.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def check_base_arch(base: str, arch: str) -> None:
    """A FidelError when an explicit --arch is not the base model's own architecture, which is what
    trains (it was silently overridden). Loads the base once more: only when --arch is given."""
    from fidellm.models.factory import arch_of
    from fidellm.models.load import load_model

    model, _ = load_model(base)
    own = arch_of(model.config)
    if arch != own:
        raise FidelError(
            f"--arch {arch}: the base model {base} is {own}, and --base trains the base's own architecture;"
            f" leave out --arch (or pass --arch {own})"
        )


@click.command("train")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--arch",
    type=click.Choice(["llama", "hnet"]),
    default="llama",
    show_default=True,
    help="llama (on the run's tokenizer, BPE or bytes) or hnet (bytes; the run's tokenizer must be"
    " `--kind bytes`). With --base:"
    " the base's own (an explicit --arch must match it).",
)
@click.option(
    "--preset",
    default=None,
    help="Model size. llama: tiny (default), 25m, chat-512, 85m, 125m, 300m; hnet: hnet-tiny (default),"
    " hnet-2s-tiny, hnet-small, hnet-2s-small, hnet-300m, hnet-760m.",
)
@click.option(
    "--base",
    default=None,
    help="Continue pretraining this model (exported dir, checkpoint or run dir; its tokenizer must be the"
    " run's) instead of random weights; its own config is trained, so --preset and --dropout are refused"
    " (the run records no preset).",
)
@click.option(
    "--unfreeze",
    type=click.Choice(["hnet-design-notes"]),
    default=None,
    help="Progressive unfreezing preset (embeddings → chunking → main bottom-up → output → all).",
)
@click.option(
    "--stage-lr-multipliers",
    default="",
    help="H-Net: comma-separated learning-rate factors per stage, outermost first (e.g. 2,1.5,1).",
)
@click.option("--seq-len", default=256, show_default=True, help="Tokens per training window.")
@click.option("--batch-size", default=8, show_default=True, help="Windows per micro-batch.")
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option(
    "--steps", "max_steps", default=1000, show_default=True, help="Optimizer steps the schedule spans."
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Train for this many passes over the train split instead of --steps (the schedule spans them).",
)
@click.option(
    "--stop-at-step",
    type=int,
    default=None,
    help="Stop (with a checkpoint) after this step although the schedule spans --steps; resume later.",
)
@click.option(
    "--lr",
    default=3e-3,
    show_default=True,
    help="Peak learning rate. Measured (benchmarks/RESULTS.md): with AdamW, tiny trains best at 1.5e-3 of"
    " 7.5e-4, 1.5e-3 and 3e-3 on CPU; with --optimizer muon at 3e-3 or 6e-3 (equal; the demo's 3e-3); the"
    " H100 quality runs used AdamW at 2e-3 for 25m and 1e-3 for 125m, with no sweep yet.",
)
@click.option("--schedule", type=click.Choice(["cosine", "wsd"]), default="cosine", show_default=True)
@click.option(
    "--decay-fraction",
    type=click.FloatRange(0, 1),
    default=0.2,
    show_default=True,
    help="--schedule wsd only: the share of the steps spent decaying at the end.",
)
@click.option("--warmup", "warmup_steps", default=100, show_default=True, help="Linear warmup steps.")
@click.option("--weight-decay", default=0.1, show_default=True, help="AdamW decay of the weight matrices.")
@click.option("--dropout", default=0.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="auto: bf16 autocast on CUDA, fp32 on CPU.",
)
@click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA if available, else CPU), cpu, cuda…"
)
@click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile the model.")
@click.option(
    "--compile-mode",
    type=click.Choice(["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]),
    default="default",
    show_default=True,
    help="torch.compile mode (reduce-overhead and max-autotune use CUDA graphs).",
)
@click.option(
    "--document-mask/--no-document-mask",
    default=False,
    show_default=True,
    help="Llama: attention stays inside each document of a packed window (BOS starts the next one).",
)
@click.option(
    "--loss-chunk",
    default=4096,
    show_default=True,
    help="Llama: tokens per chunk of the fused output-projection loss; 0 materializes all logits.",
)
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=False,
    show_default=True,
    help="Recompute block activations in the backward pass (less memory, ~30% more compute).",
)
@click.option(
    "--strategy",
    type=click.Choice(["ddp", "fsdp"]),
    default="ddp",
    show_default=True,
    help="Under torchrun: replicate the model (ddp) or shard it per block (fsdp, FSDP2).",
)
@click.option(
    "--tensorboard/--no-tensorboard", default=False, show_default=True, help="Also log to TensorBoard."
)
@click.option(
    "--eval-every", default=200, show_default=True, help="Validation loss and bits/byte every N steps."
)
@click.option(
    "--eval-batches",
    default=20,
    show_default=True,
    help="Validation batches per evaluation (spread over the val split when it holds more).",
)
@click.option(
    "--best-by-sources",
    default="",
    help="Keep as train/best the weights with the lowest val bits/byte over these comma-separated sources"
    " (e.g. the modern ones) instead of the lowest val loss. Every log records each source's bits/byte.",
)
@click.option("--log-every", default=10, show_default=True)
@click.option(
    "--save-every", default=500, show_default=True, help="Checkpoint every N steps (and at the end)."
)
@click.option(
    "--resume/--no-resume", default=True, show_default=True, help="Continue from the latest checkpoint."
)
@optimizer_options
@curriculum_options("the data", "; needs `fidellm data tokenize RUN --curriculum`")
def train_command(
    run_dir: Path,
    dropout: float,
    preset: str | None,
    base: str | None,
    stage_lr_multipliers: str,
    **options: object,
) -> None:
    """Pretrain on RUN_DIR/tokens; writes RUN_DIR/train/ (metrics.jsonl, curves.png, checkpoints/).

    Every log line shows step, loss, lr, tok/s, MFU (GPU), ETA and memory. For several GPUs (or CPU
    processes) launch it with torchrun, e.g.
    `torchrun --standalone --nproc-per-node 8 -m fidellm train RUN --preset 125m`;
    --batch-size is then per process and the data of one step is split across the processes.
    """
    from fidellm.train.config import TrainConfig
    from fidellm.train.loop import train

    try:
        multipliers = [float(x) for x in stage_lr_multipliers.split(",") if x.strip()]
    except ValueError:
        raise FidelError(f"--stage-lr-multipliers {stage_lr_multipliers!r}: expected e.g. 2,1.5,1") from None
    if stage_lr_multipliers.strip() and not multipliers:
        raise FidelError(f"--stage-lr-multipliers {stage_lr_multipliers!r} names no factor (e.g. 2,1.5,1)")
    if given("decay_fraction") and options["schedule"] != "wsd":
        raise FidelError(
            f"--decay-fraction applies to --schedule wsd only (the {options['schedule']} schedule has no"
            " decay phase): add --schedule wsd, or leave it out"
        )
    if base is not None and (preset is not None or dropout):
        raise FidelError("--base trains the base model's own config; leave out --preset and --dropout")
    if base is not None and given("arch"):
        check_base_arch(base, str(options["arch"]))
    default_preset = "hnet-tiny" if options["arch"] == "hnet" else "tiny"
    overrides = {"dropout": dropout} if dropout else {}
    chosen = None if base is not None else preset or default_preset  # a base is no preset's fresh model
    named = str(options.pop("best_by_sources"))
    sources = [name.strip() for name in named.split(",") if name.strip()]
    if named.strip() and not sources:
        raise FidelError(f"--best-by-sources {named!r} names no source")
    config = TrainConfig(
        **options,
        preset=chosen,
        model_overrides=overrides,
        best_by_sources=sources,
        base=str(Path(base).resolve()) if base else None,  # a resumed run compares it from anywhere
    )
    config.stage_lr_multipliers = multipliers
    summary = train(run_dir, config)
    if os.environ.get("RANK", "0") != "0":
        return
    val = summary.get("val_loss")
    click.echo(
        f"step {summary['step']}: {summary['parameters']:,} parameters, "
        + (f"val loss {val:.4f}, val bits/byte {summary['val_bpb']:.4f}; " if val is not None else "")
        + f"checkpoint {summary['checkpoint']}"
    )
