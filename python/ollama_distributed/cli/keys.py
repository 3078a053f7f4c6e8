"""`keys create|list|revoke`: API keys, through the node's local admin socket.

With the node stopped, `--data-dir` works on `<data dir>/keys.json` directly;
those keys move into the cluster's state when the node next starts.
"""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path
from typing import Any

import click

from ..errors import OllamaDistributedError
from ..security import keys as keymod
from . import admin_client
from .client import print_json

data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path),
    help="The node's data dir (default: the config's, then /var/lib/ollama-distributed).")


def _target(data_dir: Path | None) -> tuple[Path | None, Path]:
    """(admin socket, data dir) for the node; the socket is None when it is not running."""
    dirs = admin_client.data_dirs(data_dir)
    sock = admin_client.find_socket(dirs)
    if sock is not None:
        return sock, sock.parent
    return None, dirs[0]


def _offline(data_dir: Path) -> keymod.LocalKeyFile:
    if not data_dir.is_dir():
        raise click.ClickException(f"no node data dir at {data_dir}, and no running node found; start "
                                   "the node or pass --data-dir")
    return keymod.LocalKeyFile(data_dir)


@click.group()
def keys() -> None:
    """API keys: once one exists, every API call but /health needs one
    (`Authorization: Bearer KEY`)."""


@keys.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(keymod.ROLES), default="user", show_default=True,
              help="user: inference and reads; admin: also models and cluster operations.")
@click.option("--rpm", type=click.IntRange(min=0), default=0, help="Requests per minute (0: no limit).")
@click.option("--tpm", type=click.IntRange(min=0), default=0,
              help="Tokens per minute, prompt + generated (0: no limit).")
@click.option("--weight", type=click.FloatRange(keymod.MIN_WEIGHT, keymod.MAX_WEIGHT), default=1.0,
              show_default=True, help="The key's share of a busy node's tokens, relative to weight-1 keys.")
@click.option("--priority", type=click.Choice(keymod.PRIORITIES), default="interactive", show_default=True,
              help="The class of the key's requests without an X-Priority header (batch waits behind "
                   "interactive work).")
@data_dir_option
def create(name: str, role: str, rpm: int, tpm: int, weight: float, priority: str, data_dir: Path | None) -> None:
    """Create key NAME and print it, alone, on stdout. It is shown only this once."""
    sock, where = _target(data_dir)
    if sock is not None:
        out = admin_client.request(sock, "POST", "/keys", {"name": name, "role": role, "rpm": rpm, "tpm": tpm,
                                                           "weight": weight, "priority": priority})
        secret = out["key"]
    else:
        try:
            secret, rec = keymod.make_record(name, role, rpm, tpm, weight, priority)
            _offline(where).add([rec])
        except OllamaDistributedError as e:
            raise click.ClickException(e.message) from None
    click.echo(secret)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "never"


@keys.command("list")
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_keys(data_dir: Path | None, as_json: bool) -> None:
    """Names, roles, limits, when created and last used (never the keys)."""
    sock, where = _target(data_dir)
    rows: list[dict[str, Any]]
    if sock is not None:
        rows = admin_client.request(sock, "GET", "/keys")["keys"]
    else:
        rows = [{**r.public(), "last_used": None} for r in sorted(_offline(where).read().values(),
                                                                   key=lambda r: r.name)]
        if (where / "raft").is_dir():
            click.echo(f"The node is not running: only keys waiting in {where / keymod.FILE} are listed; "
                       "the cluster's keys are listed while it runs.", err=True)
            if not rows and not as_json:
                return
    if as_json:
        print_json({"keys": rows})
        return
    if not rows:
        click.echo("No API keys: the API is open to whoever reaches it (see `keys create`).")
        return
    click.echo(f"{'NAME':<24} {'ROLE':<6} {'RPM':>6} {'TPM':>8} {'WEIGHT':>6} {'PRIORITY':<11}  "
               f"{'CREATED':<19}  LAST USED")
    for r in rows:
        click.echo(f"{r['name']:<24} {r['role']:<6} {r['rpm'] or '-':>6} {r['tpm'] or '-':>8} "
                   f"{r.get('weight', 1.0):>6g} {r.get('priority', 'interactive'):<11}  "
                   f"{_when(r['created']):<19}  {_when(r.get('last_used'))}")


@keys.command("revoke")
@click.argument("name")
@data_dir_option
def revoke(name: str, data_dir: Path | None) -> None:
    """Revoke key NAME at every node (within a second)."""
    sock, where = _target(data_dir)
    if sock is not None:
        left = admin_client.request(sock, "DELETE", f"/keys/{urllib.parse.quote(name, safe='')}")["keys_left"]
    else:
        f = _offline(where)
        current = f.read()
        if current.pop(name, None) is None:
            raise click.ClickException(f"no key named {name!r} in {f.path} (keys kept in the cluster's "
                                       "state can be revoked only while the node runs)")
        f.write(current)
        left = len(current)
    click.echo(f"Revoked {name}.")
    if not left:
        click.echo("Warning: no API key is left, so the API is open again to whoever reaches it "
                   "(unless api.auth_tokens is set).", err=True)
