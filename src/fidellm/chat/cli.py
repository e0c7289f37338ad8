"""`fidellm chat`: talk to a model in the terminal, the reply streamed as it is generated.

Lines starting with `/` are commands (/help lists them); anything else is a user message. When the
model calls a tool, the call is shown and the user types its result. Ctrl-D (EOF) or /exit ends the
chat; Ctrl-C stops a reply or a tool-result prompt (that exchange is forgotten). Errors are printed
and the chat goes on.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.markup import escape

from fidellm.errors import FidelError

if TYPE_CHECKING:  # the session pulls in torch: imported when the command runs, not at `fidellm --help`
    from fidellm.chat.session import ChatSession, Reply

HELP = """commands:
  /system TEXT  set the system prompt (/system alone shows it, /system - removes it)
  /reset        forget the conversation (the system prompt and tools stay)
  /save PATH    write the conversation to a JSON file
  /load PATH    read a conversation written by /save
  /help         this list
  /exit         end the chat (Ctrl-D too)"""

USER_PROMPT = "you> "


def read_line(console: Console, prompt: str) -> str | None:
    """One line typed by the user; None at EOF (Ctrl-D). Ctrl-C gives an empty line. A plain
    `input(prompt)`, so that readline's line editing knows where the prompt ends."""
    try:
        return input(prompt)
    except EOFError:
        console.print()
        return None
    except KeyboardInterrupt:
        console.print()
        return ""


def run_reply(console: Console, session: ChatSession) -> Reply | None:
    """Generate and stream one assistant turn; None when the user interrupted it with Ctrl-C."""
    console.print("[bold green]model>[/] ", end="")
    try:
        reply = session.respond(lambda text: console.print(text, end="", markup=False, highlight=False))
    except KeyboardInterrupt:
        console.print("\n[dim](interrupted; this exchange is forgotten)[/]")
        session.discard_last_turn()
        return None
    console.print()
    if reply.dropped:
        console.print(
            f"[dim](dropped the {reply.dropped} oldest turn(s) to fit the context of {session.context}"
            " tokens)[/]"
        )
    if reply.finish_reason == "length":
        console.print(f"[dim](cut at --max-new-tokens {session.config.max_new_tokens})[/]")
    return reply


def converse(console: Console, session: ChatSession) -> bool:
    """One user turn and the replies it leads to, tool calls answered by the user in between.
    False when the user ended the chat at a tool-result prompt."""
    reply = run_reply(console, session)
    while reply is not None and reply.calls:
        for call in reply.calls:
            console.print(f"[bold yellow]tool call>[/] {escape(call.name)}({escape(call.arguments)})")
            try:
                result = input(f"result of {call.name}> ")
            except EOFError:
                console.print()
                return False
            except KeyboardInterrupt:  # as during a reply: not an empty result sent on to the model
                console.print("\n[dim](interrupted; this exchange is forgotten)[/]")
                session.discard_last_turn()
                return True
            session.add_tool_result(call, result)
        reply = run_reply(console, session)
    return True


def command(console: Console, session: ChatSession, line: str) -> bool:
    """Run a /command; False when it ends the chat."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        console.print(HELP, markup=False, highlight=False)
    elif name == "/reset":
        session.reset()
        console.print("[dim](conversation cleared)[/]")
    elif name == "/system":
        if not argument:
            shown = session.system if session.system is not None else "(none)"
            console.print(f"system: {shown}", markup=False, highlight=False)
        else:
            session.system = None if argument == "-" else argument
            console.print(
                "[dim](system prompt set)[/]" if session.system else "[dim](system prompt removed)[/]"
            )
    elif name in ("/save", "/load"):
        if not argument:
            raise FidelError(f"{name} needs a file path")
        path = Path(argument).expanduser()
        if name == "/save":
            session.save(path)
            console.print(f"[dim](saved {len(session.messages)} messages to {escape(str(path))})[/]")
        else:
            session.load(path)
            console.print(f"[dim](loaded {len(session.messages)} messages from {escape(str(path))})[/]")
    else:
        raise FidelError(f"unknown command {name}; /help lists the commands")
    return True


def chat_loop(console: Console, session: ChatSession) -> None:
    """Read lines until /exit or EOF; every error is printed and the chat goes on."""
    console.print("[dim]fidellm chat: /help for commands, Ctrl-D to exit[/]")
    while True:
        line = read_line(console, USER_PROMPT)
        if line is None:
            return
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not command(console, session, line.strip()):
                    return
                continue
            session.add_user(line)
            if not converse(console, session):
                return
        except FidelError as error:
            console.print(f"[bold red]error:[/] {escape(str(error))}")


@click.command("chat")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--system", default=None, help="System prompt.")
@click.option(
    "--tools",
    "tools_file",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON list of OpenAI function tools the model may call; you answer each call.",
)
@click.option("--temperature", default=0.7, show_default=True, help="0 = greedy.")
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--max-new-tokens", default=256, show_default=True, help="Per reply.")
@click.option("--seed", default=None, type=int, help="Same seed, same replies.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def chat_command(
    model: Path,
    system: str | None,
    tools_file: Path | None,
    device: str | None,
    **options: object,
) -> None:
    """Chat with MODEL (a run directory, a checkpoint or an exported directory) in the terminal.
    Replies stream as they are generated; the oldest turns are dropped when the chat outgrows the
    model's context (the system prompt is kept)."""
    import torch

    from fidellm.chat.session import ChatSession, read_tools
    from fidellm.generate.cli import check_utf8
    from fidellm.generate.engine import GenerationConfig
    from fidellm.models.load import load_model
    from fidellm.tokenizer.base import load_tokenizer

    if system is not None:
        check_utf8("--system", system)
    tools = read_tools(tools_file) if tools_file else None
    config = GenerationConfig(**options)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    network, tokenizer_dir = load_model(model, device)
    session = ChatSession(network, load_tokenizer(tokenizer_dir), config, system=system, tools=tools)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # a stray byte in typed text is not a crash
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    chat_loop(Console(soft_wrap=True), session)
