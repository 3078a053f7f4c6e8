"""`cluster token`: the token another node needs to join this cluster.
`cluster rebalance|migrate|place`: where the cluster keeps its models.
`cluster remove NODE`: take a node that is down for good out of the cluster.
`cluster drain|undrain [NODE]`: stop sending a node requests, for maintenance."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import click

from . import admin_client
from .client import Client, print_json
from .options import api_option


@click.group()
def cluster() -> None:
    """Cluster membership and model placement."""


@cluster.command("token")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The node's data dir (default: the config's, then /var/lib/ollama-distributed).")
@click.option("--rotate", is_flag=True,
              help="Replace the join secret cluster-wide first (the running node commits it through Raft): "
                   "tokens given out before stop working. `cluster remove` does it too.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def token(data_dir: Path | None, rotate: bool, as_json: bool) -> None:
    """Print the join token. Give it to a new node, e.g. in a file:
    `ollama-distributed start --join HOST:4001 --token-file FILE`.

    It is read from the running node's admin socket, or from the data dir's
    TLS files; never over HTTP. Run it as the node's user or root."""
    dirs = admin_client.data_dirs(data_dir)
    value = _rotate(dirs) if rotate else _token(dirs)
    if as_json:
        print_json({"token": value})
    else:
        click.echo(value)


def _rotate(dirs: list[Path]) -> str:
    sock = admin_client.find_socket(dirs)
    if sock is None:
        raise click.ClickException("rotating the join token needs the running node (its admin socket in "
                                   f"{' or '.join(str(d) for d in dirs)}); start it, or pass --data-dir")
    return str(admin_client.request(sock, "POST", "/token/rotate", {})["token"])


def _token(dirs: list[Path]) -> str:
    sock = admin_client.find_socket(dirs)
    if sock is not None:
        try:
            return str(admin_client.request(sock, "GET", "/token")["token"])
        except admin_client.AdminError as e:
            if e.status != 409 and e.status is not None:
                raise
            # 409: the node runs without a cluster; a stale socket: not running
    from ..cluster.service import ClusterService

    for d in dirs:
        if not (d / "tls").is_dir():
            continue
        try:
            value = ClusterService(node_id="cli", data_dir=d, host="127.0.0.1", port=0, join=[],
                                   token=None, api_address="").join_token()
        except (OSError, RuntimeError) as e:
            raise click.ClickException(f"cannot read the cluster credentials in {d / 'tls'}: {e}; run this "
                                       "as the node's user or root") from None
        if value:
            return value
    raise click.ClickException(f"no cluster credentials in {' or '.join(str(d / 'tls') for d in dirs)}: "
                               "start the node once so it creates the cluster, or pass --data-dir")


@cluster.command("rebalance")
@click.option("--model", help="Only this model (default: every model).")
@click.option("--dry-run", is_flag=True, help="Show the moves without making them.")
@api_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def rebalance(model: str | None, dry_run: bool, api: str, as_json: bool) -> None:
    """Place models anew, spread by size over the nodes that can hold them.
    Copies move over QUIC; extra ones are dropped once the new ones are there
    (`GET /api/distributed/replication/status` shows the transfers)."""
    body: dict[str, object] = {"dry_run": dry_run}
    if model:
        body["model"] = model
    out = Client(api).post("/api/distributed/rebalance", body)
    if as_json:
        print_json(out)
        return
    if not out["moves"]:
        click.echo("Nothing to move: every model is where it should be.")
        return
    for m in out["moves"]:
        parts = [f"+{n}" for n in m["add"]] + [f"-{n}" for n in m["remove"]]
        click.echo(f"{m['model']}: {' '.join(parts)} -> on {', '.join(m['assigned']) or 'no node'}")
    click.echo("(dry run: nothing changed)" if dry_run else "Committed; copies are moving.")


@cluster.command("migrate")
@click.argument("model")
@click.argument("source", metavar="FROM")
@click.argument("target", metavar="TO")
@api_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def migrate(model: str, source: str, target: str, api: str, as_json: bool) -> None:
    """Move MODEL's copy from node FROM to node TO (node ids as `nodes` shows
    them). TO fetches it, then FROM drops its own."""
    out = Client(api).post("/api/distributed/migrate", {"model": model, "from": source, "to": target})
    if as_json:
        print_json(out)
    else:
        click.echo(f"{out['model']}: moving from {source} to {target}; now placed on {', '.join(out['assigned'])}")


@cluster.command("place")
@click.argument("model")
@click.option("--replicas", type=click.IntRange(1, 64), help="Copies to keep (default: models.replicas).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Keep it only on nodes with this label (node.labels); repeatable.")
@api_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def place(model: str, replicas: int | None, labels: tuple[str, ...], api: str, as_json: bool) -> None:
    """Set MODEL's placement policy: how many copies, and which node labels
    they need. Without options it goes back to the defaults."""
    wanted: dict[str, str] = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        wanted[key.strip()] = value.strip()
    out = Client(api).post("/api/distributed/placement",
                           {"model": model, "replicas": replicas, "node_labels": wanted})
    if as_json:
        print_json(out)
    else:
        where = ", ".join(f"{k}={v}" for k, v in wanted.items()) or "any node"
        click.echo(f"{out['model']}: {replicas or 'models.replicas'} copies on {where}")


@cluster.command("remove")
@click.argument("node_id")
@api_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def remove(node_id: str, api: str, as_json: bool) -> None:
    """Remove NODE_ID, which must be down, from the cluster: it no longer
    counts toward the quorum, and a learner takes a voter's place. To bring
    that machine back, wipe its data dir and join it again with a token."""
    out = Client(api).delete_json(f"/api/distributed/nodes/{urllib.parse.quote(node_id, safe='')}")
    if as_json:
        print_json(out)
    else:
        click.echo(f"Removed {out['removed']} from the cluster.")


def _drain(action: str, node: str, api: str, as_json: bool) -> None:
    client = Client(api)
    target = node or str(client.get("/api/distributed/status")["node_id"])
    out = client.post(f"/api/distributed/nodes/{urllib.parse.quote(target, safe='')}/{action}", {})
    if as_json:
        print_json(out)
    elif action == "drain":
        click.echo(f"{out['node']}: draining; {out['in_flight']} request(s) under way finish there "
                   "(node.drain_timeout_s), then move. `cluster undrain` ends it.")
    else:
        click.echo(f"{out['node']}: taking requests again" if out["changed"] else f"{out['node']}: was not draining")


@cluster.command("drain")
@click.argument("node", required=False, default="")
@api_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def drain(node: str, api: str, as_json: bool) -> None:
    """Drain NODE (an id or name; default: the node at --api) for maintenance,
    without stopping it: its readiness turns 503, peers stop routing to it,
    its queued requests go to other holders, and those under way get
    node.drain_timeout_s to finish before they resume elsewhere."""
    _drain("drain", node, api, as_json)


@cluster.command("undrain")
@click.argument("node", required=False, default="")
@api_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def undrain(node: str, api: str, as_json: bool) -> None:
    """End NODE's drain: it takes requests again."""
    _drain("undrain", node, api, as_json)
