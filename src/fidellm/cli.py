"""The `fidellm` command: one subcommand group per stage, wiring only."""

from __future__ import annotations

import sys

import click

from fidellm import __version__
from fidellm.allocator import keep_freed_memory
from fidellm.chat.cli import chat_command
from fidellm.data.cli import data
from fidellm.errors import FidelError
from fidellm.eval.cli import eval_command, report_command
from fidellm.export.cli import export
from fidellm.generate.cli import generate_command
from fidellm.serve.cli import serve_command
from fidellm.sft.cli import sft_command
from fidellm.tokenizer.cli import tokenizer
from fidellm.train.cli import train_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="fidellm")
def cli() -> None:
    """fidel-lm: raw Amharic text to a small language model, every stage measured.

    Stages read and write plain files in a run directory:
    data prepare -> tokenizer train -> data tokenize -> train -> generate / export.
    """
    keep_freed_memory()  # CPU tensor temporaries reuse freed heap blocks (fidellm/allocator.py)


cli.add_command(data)
cli.add_command(tokenizer)
cli.add_command(train_command)
cli.add_command(generate_command)
cli.add_command(export)
cli.add_command(eval_command)
cli.add_command(report_command)
cli.add_command(serve_command)
cli.add_command(sft_command)
cli.add_command(chat_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="fidellm", standalone_mode=False)
    except FidelError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
