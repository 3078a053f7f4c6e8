"""`models list|show|ps|create|pull|push|cp|rm`."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import click

from .client import Client, human_bytes, print_json
from .options import api_option, json_option


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for r in [headers, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@click.group()
def models() -> None:
    """Manage the models a node serves."""


@models.command("list")
@api_option
@json_option
def list_(api: str, as_json: bool) -> None:
    """Models available (GET /api/tags)."""
    data = Client(api).get("/api/tags")
    if as_json:
        print_json(data)
        return
    rows = [[m["name"], (m.get("digest") or "")[:12], human_bytes(m.get("size") or 0),
             m.get("modified_at", "")[:19].replace("T", " ")] for m in data.get("models", [])]
    _table(rows, ["NAME", "ID", "SIZE", "MODIFIED"])


@models.command("ps")
@api_option
@json_option
def ps(api: str, as_json: bool) -> None:
    """Models loaded in memory (GET /api/ps)."""
    data = Client(api).get("/api/ps")
    if as_json:
        print_json(data)
        return
    rows = [[m["name"], (m.get("digest") or "")[:12], human_bytes(m.get("size") or 0),
             str(m.get("context_length") or ""), m.get("expires_at", "")[:19].replace("T", " ")]
            for m in data.get("models", [])]
    _table(rows, ["NAME", "ID", "SIZE", "CONTEXT", "UNTIL"])


@models.command("show")
@click.argument("model")
@api_option
@json_option
def show(model: str, api: str, as_json: bool) -> None:
    """Details of one model (POST /api/show)."""
    data = Client(api).post("/api/show", {"model": model})
    if as_json:
        print_json(data)
        return
    d = data.get("details", {})
    info = data.get("model_info", {})
    arch = info.get("general.architecture", d.get("family", ""))
    click.echo("  Model")
    for label, value in (("architecture", arch), ("parameters", d.get("parameter_size")),
                         ("context length", info.get(f"{arch}.context_length")),
                         ("embedding length", info.get(f"{arch}.embedding_length")),
                         ("quantization", d.get("quantization_level"))):
        if value not in (None, ""):
            click.echo(f"    {label:<20}{value}")
    click.echo(f"\n  Capabilities\n    {', '.join(data.get('capabilities', []))}")
    if data.get("parameters"):
        click.echo("\n  Parameters")
        for line in data["parameters"].splitlines():
            click.echo(f"    {line}")
    if data.get("system"):
        click.echo(f"\n  System\n    {data['system']}")


def _upload(client: Client, path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with click.progressbar(length=size, label=f"hashing {path.name}", file=sys.stderr) as bar:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                bar.update(len(chunk))
    digest = f"sha256:{h.hexdigest()}"
    if client.head(f"/api/blobs/{digest}") == 200:
        click.echo(f"using existing blob {digest[:19]}", err=True)
        return digest
    with click.progressbar(length=size, label=f"uploading {path.name}", file=sys.stderr) as bar:
        client.upload(f"/api/blobs/{digest}", str(path), size, bar)
    return digest


@models.command("create")
@click.argument("model")
@click.option("--from", "from_", metavar="MODEL", help="Base the new model on an existing one.")
@click.option("--file", "gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A GGUF file to upload and use.")
@click.option("--system", help="System prompt.")
@click.option("--template", help="Prompt template (Jinja, or Ollama's Go-template subset).")
@click.option("--parameter", "-p", multiple=True, metavar="KEY=VALUE", help="Default option, e.g. temperature=0.2.")
@api_option
def create(model: str, from_: str | None, gguf: Path | None, system: str | None, template: str | None,
           parameter: tuple[str, ...], api: str) -> None:
    """Create MODEL from a GGUF file or from another model."""
    if bool(from_) == bool(gguf):
        raise click.UsageError("give exactly one of --from MODEL or --file PATH.gguf")
    client = Client(api)
    body: dict[str, Any] = {"model": model, "stream": True}
    if gguf:
        body["files"] = {os.path.basename(gguf): _upload(client, gguf)}
    else:
        body["from"] = from_
    if system is not None:
        body["system"] = system
    if template is not None:
        body["template"] = template
    if parameter:
        params: dict[str, Any] = {}
        for p in parameter:
            key, sep, raw = p.partition("=")
            if not sep:
                raise click.UsageError(f"--parameter {p!r}: expected KEY=VALUE")
            value: Any = raw
            for conv in (int, float):
                try:
                    value = conv(raw)
                    break
                except ValueError:
                    continue
            if raw.lower() in ("true", "false"):
                value = raw.lower() == "true"
            if key == "stop":
                params.setdefault("stop", []).append(raw)
            else:
                params[key] = value
        body["parameters"] = params
    for event in client.stream("/api/create", body):
        click.echo(event.get("status", ""))


def _transfer(client: Client, path: str, model: str, insecure: bool, verb: str) -> None:
    """Stream /api/pull or /api/push: one progress bar per layer on stderr, as
    `ollama pull` draws them, and the other statuses on stdout."""
    bars: dict[str, Any] = {}
    shown: dict[str, int] = {}
    finished: set[str] = set()
    stderr = sys.stderr

    def finish(digest: str) -> None:
        if digest not in finished:  # each call ends the bar's line: once per bar
            finished.add(digest)
            bars[digest].render_finish()

    try:
        for event in client.stream(path, {"model": model, "insecure": insecure, "stream": True}):
            digest, total = event.get("digest"), event.get("total")
            if digest and total:
                bar = bars.get(digest)
                if bar is None:
                    bar = click.progressbar(length=int(total), label=f"{event.get('status', digest)} {human_bytes(int(total)):>8}",
                                            file=stderr, show_pos=False, show_eta=True)
                    bar.__enter__()
                    bars[digest] = bar
                    shown[digest] = 0
                done = int(event.get("completed") or 0)
                if done > shown[digest]:
                    bar.update(done - shown[digest])
                    shown[digest] = done
                if done >= int(total):
                    finish(digest)
                continue
            for d in bars:
                finish(d)
            click.echo(event.get("status", ""))
    except KeyboardInterrupt:
        click.echo(f"\n{verb} interrupted; run the same command again to resume "
                   "(downloaded parts are kept, nothing half-done is visible)", err=True)
        raise SystemExit(130) from None


@models.command("pull")
@click.argument("model")
@click.option("--insecure", is_flag=True, help="Allow a plain-HTTP (or unverified TLS) registry.")
@api_option
def pull(model: str, insecure: bool, api: str) -> None:
    """Pull MODEL from a registry (POST /api/pull); the host part of the name is the
    registry, e.g. 127.0.0.1:5000/library/smollm2:135m. Resumes an interrupted pull."""
    _transfer(Client(api), "/api/pull", model, insecure, "pull")


@models.command("push")
@click.argument("model")
@click.option("--insecure", is_flag=True, help="Allow a plain-HTTP (or unverified TLS) registry.")
@api_option
def push(model: str, insecure: bool, api: str) -> None:
    """Push MODEL to the registry its name names (POST /api/push)."""
    _transfer(Client(api), "/api/push", model, insecure, "push")


@models.command("cp")
@click.argument("source")
@click.argument("destination")
@api_option
def cp(source: str, destination: str, api: str) -> None:
    """Copy SOURCE to DESTINATION."""
    Client(api).post("/api/copy", {"source": source, "destination": destination})
    click.echo(f"copied '{source}' to '{destination}'")


@models.command("rm")
@click.argument("model", nargs=-1, required=True)
@api_option
def rm(model: tuple[str, ...], api: str) -> None:
    """Delete one or more models."""
    client = Client(api)
    for m in model:
        client.delete("/api/delete", {"model": m})
        click.echo(f"deleted '{m}'")
