"""`fidellm generate`: continue prompts with a trained or exported model, streaming one prompt."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from fidellm.errors import FidelError


def check_utf8(name: str, text: str) -> None:
    """FidelError naming the command-line argument `name` when `text` holds bytes that are not UTF-8:
    Python passes them on as lone surrogates (surrogateescape), which no tokenizer can encode."""
    bad = next((index for index, char in enumerate(text) if "\ud800" <= char <= "\udfff"), None)
    if bad is not None:
        code = ord(text[bad])
        what = f"byte 0x{code - 0xDC00:02x}" if code >= 0xDC80 else f"lone surrogate U+{code:04X}"
        raise FidelError(
            f"{name} is not valid UTF-8 ({what} at character {bad + 1}); check the encoding of the"
            " terminal or of the file it came from"
        )


def default_repetition_penalty(tokenizer_kind: str) -> float:
    """1.1 over BPE tokens; off over bytes, where every Ethiopic character starts with the byte 0xE1, so
    penalizing seen bytes would push the model away from Ethiopic after its first character."""
    return 1.0 if tokenizer_kind == "bytes" else 1.1


@click.command("generate")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("prompts", nargs=-1, required=True)
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.8, show_default=True, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, help="0 = off.")
@click.option("--top-p", default=0.95, show_default=True)
@click.option(
    "--repetition-penalty",
    type=float,
    default=None,
    help="Default: 1.1 for a BPE model; 1.0 (off) for a byte-level one, where it would penalize the lead"
    " byte 0xE1 that every Ethiopic character shares.",
)
@click.option("--stop", "stop_strings", multiple=True, help="Stop string (repeatable).")
@click.option("--seed", default=None, type=int, help="Same seed, same text.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def generate_command(
    model: Path,
    prompts: tuple[str, ...],
    device: str | None,
    stop_strings: tuple[str, ...],
    **options: object,
) -> None:
    """Continue PROMPTS with MODEL: a run directory (latest checkpoint), a checkpoint or an exported HF
    directory. One prompt streams as it is generated; several run as one batch."""
    import torch

    from fidellm.generate.engine import BatchDecoder, GenerationConfig, generate
    from fidellm.models.load import load_model
    from fidellm.tokenizer.base import load_tokenizer

    for index, prompt in enumerate(prompts, 1):
        check_utf8(f"prompt {index}", prompt)
    for stop in stop_strings:
        check_utf8("--stop", stop)
    penalty = options.pop("repetition_penalty")
    config = GenerationConfig(  # bad settings fail before loading
        stop_strings=stop_strings, repetition_penalty=1.0 if penalty is None else penalty, **options
    )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    network, tokenizer_dir = load_model(model, device)
    tokenizer = load_tokenizer(tokenizer_dir)
    if penalty is None:
        config = dataclasses.replace(config, repetition_penalty=default_repetition_penalty(tokenizer.kind))
    if len(prompts) == 1:
        decoder = BatchDecoder(network, tokenizer, prompts, config)  # a bad prompt fails before any output
        click.echo(prompts[0], nl=False)
        while not decoder.done:
            click.echo(decoder.step()[0], nl=False)
        click.echo()
        return
    for prompt, result in zip(prompts, generate(network, tokenizer, list(prompts), config), strict=True):
        click.echo(f"{prompt}{result.text}\n  [{result.finish_reason}, {len(result.token_ids)} tokens]")
