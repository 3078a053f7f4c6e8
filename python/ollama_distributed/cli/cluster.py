"""`cluster token`: the token another node needs to join this cluster."""

from __future__ import annotations

from pathlib import Path

import click

from .client import Client, print_json
from .options import api_option


@click.group()
def cluster() -> None:
    """Cluster membership."""


@cluster.command("token")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Read the token from this node data dir instead of asking the running node.")
@api_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def token(data_dir: Path | None, api: str, as_json: bool) -> None:
    """Print the join token. Give it to a new node:
    `ollama-distributed start --join HOST:4001 --token TOKEN`."""
    if data_dir is not None:
        from ..cluster.service import ClusterService

        value = ClusterService(node_id="cli", data_dir=data_dir, host="127.0.0.1", port=0, join=[],
                               token=None, api_address="").join_token()
        if not value:
            raise click.ClickException(f"no cluster credentials in {data_dir / 'tls'}: start the node "
                                       "once so it creates the cluster, or check --data-dir")
    else:
        value = Client(api).get("/api/distributed/token")["token"]
    if as_json:
        print_json({"token": value})
    else:
        click.echo(value)
