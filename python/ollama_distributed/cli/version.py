"""`version`: this program's version, the core's, and the node's if it answers."""

from __future__ import annotations

import click

from .. import __version__
from .client import ApiError, Client, print_json
from .options import api_option, json_option


@click.command()
@api_option
@json_option
def version(api: str, as_json: bool) -> None:
    """Show the CLI, core and (if reachable) node versions."""
    from .. import _core

    info = {"cli": __version__, "core": _core.__version__, "node": None}
    try:
        info["node"] = Client(api, timeout=2).get("/api/version").get("version")
    except ApiError:
        pass
    if as_json:
        print_json(info)
        return
    click.echo(f"ollama-distributed {info['cli']} (core {info['core']})")
    click.echo(f"node at {api}: {info['node'] or 'not reachable'}")
