"""`fidellm export …`: hand a trained model to the tools people already use."""

from __future__ import annotations

from pathlib import Path

import click

GGUF_TYPES = ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""`export gguf --type` choices (fidellm.export.gguf.QTYPES; listed here so the CLI starts without gguf)."""


@click.group()
def export() -> None:
    """Export a trained model: a Hugging Face directory (transformers, vLLM), a GGUF file (llama.cpp) or,
    for byte-level H-Nets, the project's own H-Net directory."""


def _require_llama(network: object, target: str) -> None:
    """H-Nets have no transformers / llama.cpp architecture: point to `export hnet` instead."""
    from fidellm.errors import FidelError
    from fidellm.models.llama import LlamaForCausalLM

    if not isinstance(network, LlamaForCausalLM):
        raise FidelError(
            f"{target} export needs a Llama model; this is {type(network).__name__}"
            " (use `fidellm export hnet MODEL OUT_DIR`)"
        )


def _refuse_overwrite(model: Path, tokenizer_dir: Path, out: Path, is_file: bool = False) -> None:
    """Refuse an output that would overwrite what is being exported (silently replacing the source
    weights, e.g. with bf16 ones): MODEL or its tokenizer directory itself, anything inside a run's
    train/ (checkpoints, best), a directory above either (RUN itself: its config.json and weights would
    make RUN load as the export) and, for a file (GGUF), a file already in either directory that is not
    a previous .gguf."""
    from fidellm.errors import FidelError

    target, sources = out.resolve(), (model.resolve(), tokenizer_dir.resolve())
    train = next(
        (p for p in (target, *target.parents) if p.name == "train" and (p / "checkpoints").is_dir()), None
    )
    if train is not None:
        raise FidelError(f"{out}: lies inside {train} (training checkpoints); write the export elsewhere")
    if is_file:
        clobbers = target.parent in sources and target.exists() and target.suffix != ".gguf"
    else:
        clobbers = target in sources
    if clobbers:
        raise FidelError(f"{out}: would overwrite the model being exported ({model}); write it elsewhere")
    if not is_file and any(target in source.parents for source in sources):
        raise FidelError(
            f"{out}: holds the model being exported ({model}); an export there would shadow it (every"
            " fidellm command would load the export instead of its run or checkpoint); write it elsewhere"
        )


@export.command("hf")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True
)
def export_hf_command(model: Path, out_dir: Path, dtype: str) -> None:
    """Write MODEL (a run directory or checkpoint) as a directory that transformers' AutoModelForCausalLM
    and AutoTokenizer load with no remote code (LlamaForCausalLM, safetensors)."""
    from fidellm.export.hf import export_hf
    from fidellm.models.load import load_model

    network, tokenizer_dir = load_model(model)
    _require_llama(network, "HF")
    _refuse_overwrite(model, tokenizer_dir, out_dir)
    export_hf(network, network.config, tokenizer_dir, out_dir, dtype=dtype)
    click.echo(f"wrote {out_dir} ({dtype}, {network.num_parameters():,} parameters)")


@export.command("gguf")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--type",
    "qtype",
    type=click.Choice(GGUF_TYPES),
    default="f16",
    show_default=True,
    help="Type of the weight matrices (norms stay f32; quantized rows not a multiple of 32 fall back to"
    " f16; with the 4- and 5-bit types the embedding and output head stay q8_0).",
)
def export_gguf_command(model: Path, out_file: Path, qtype: str) -> None:
    """Write MODEL (a run directory, checkpoint or exported HF directory) as one GGUF file that llama.cpp
    runs (`llama-cli -m OUT_FILE`), tokenizer and chat template included."""
    from fidellm.errors import FidelError
    from fidellm.export.gguf import export_gguf
    from fidellm.models.load import load_model

    network, tokenizer_dir = load_model(model)
    _require_llama(network, "GGUF")
    _refuse_overwrite(model, tokenizer_dir, out_file, is_file=True)
    if out_file.exists() and not out_file.is_file():  # replacing /dev/null or a pipe with the file
        raise FidelError(f"{out_file}: exists and is not a regular file; write the GGUF file elsewhere")
    export_gguf(network, network.config, tokenizer_dir, out_file, qtype=qtype, name=model.resolve().name)
    size = out_file.stat().st_size
    click.echo(f"wrote {out_file} ({qtype}, {size / 1e6:.1f} MB, {network.num_parameters():,} parameters)")


@export.command("hnet")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True
)
def export_hnet_command(model: Path, out_dir: Path, dtype: str) -> None:
    """Write MODEL (an H-Net run directory, checkpoint or export) as an H-Net directory: model.safetensors,
    config.json and the byte tokenizer, loadable by every fidellm command (generate, eval, chat)."""
    from fidellm.export.hnet import export_hnet
    from fidellm.models.load import load_model

    network, tokenizer_dir = load_model(model)
    _refuse_overwrite(model, tokenizer_dir, out_dir)
    export_hnet(network, tokenizer_dir, out_dir, dtype=dtype)
    click.echo(f"wrote {out_dir} ({dtype}, {network.num_parameters():,} parameters)")
