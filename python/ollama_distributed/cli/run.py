"""`run MODEL [PROMPT]`: stream an answer, or chat in a REPL like `ollama run`."""

from __future__ import annotations

import sys
from typing import Any

import click

from .client import ApiError, Client
from .options import api_option

HELP = """Available commands:
  /clear   Clear the conversation
  /bye     Exit
  /?       Show this help
Press Ctrl-C to stop an answer, Ctrl-D or /bye to leave."""


def _stream_chat(client: Client, model: str, messages: list[dict[str, Any]],
                 options: dict[str, Any]) -> str:
    parts: list[str] = []
    for chunk in client.stream("/api/chat", {"model": model, "messages": messages, "options": options}):
        text = (chunk.get("message") or {}).get("content", "")
        if text:
            parts.append(text)
            click.echo(text, nl=False)
            sys.stdout.flush()
    click.echo()
    return "".join(parts)


@click.command()
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("--num-predict", type=int, help="Most tokens to generate.")
@click.option("--temperature", type=float, help="Sampling temperature.")
@click.option("--seed", type=int, help="Random seed, for repeatable answers.")
@api_option
def run(model: str, prompt: tuple[str, ...], num_predict: int | None, temperature: float | None,
        seed: int | None, api: str) -> None:
    """Answer PROMPT with MODEL, streaming tokens; without PROMPT, chat interactively."""
    client = Client(api)
    options = {k: v for k, v in (("num_predict", num_predict), ("temperature", temperature),
                                 ("seed", seed)) if v is not None}
    text = " ".join(prompt)
    if not text and not sys.stdin.isatty():
        text = sys.stdin.read().strip()
    if text:
        try:
            _stream_chat(client, model, [{"role": "user", "content": text}], options)
        except KeyboardInterrupt:
            click.echo()
            sys.exit(130)
        return
    # Load first, so a wrong model name fails before the prompt appears.
    client.post("/api/generate", {"model": model, "prompt": "", "stream": False}, timeout=300)
    history: list[dict[str, Any]] = []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo("\nUse Ctrl-D or /bye to exit.")
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/bye", "/exit"):
            return
        if line in ("/?", "/help"):
            click.echo(HELP)
            continue
        if line == "/clear":
            history.clear()
            click.echo("Cleared session context")
            continue
        history.append({"role": "user", "content": line})
        try:
            answer = _stream_chat(client, model, history, options)
            history.append({"role": "assistant", "content": answer})
        except KeyboardInterrupt:
            click.echo()
            history.pop()
        except ApiError as e:
            history.pop()
            click.echo(f"Error: {e.message}", err=True)
        click.echo()
