"""`fidellm export …`: hand a trained model to the tools people already use."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def export() -> None:
    """Export a trained model (Hugging Face directory; GGUF follows)."""


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
    export_hf(network, network.config, tokenizer_dir, out_dir, dtype=dtype)
    click.echo(f"wrote {out_dir} ({dtype}, {network.num_parameters():,} parameters)")
