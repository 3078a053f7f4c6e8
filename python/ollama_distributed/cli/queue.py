"""`queue`: the node's queue per model (GET /api/distributed/queue): the
requests running and waiting, with their tenant, priority, position and age,
and each tenant's virtual token counter (the fair queue's, see
rust/scheduler/fair.rs)."""

from __future__ import annotations

from typing import Any

import click

from .client import ApiError, Client, checked_api, print_json, use_color
from .nodes import table
from .options import api_option, json_option

HEADERS = ["MODEL", "STATE", "TENANT", "PRIORITY", "AGE", "TOKENS (EST.)"]


def rows(models: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for m in models:
        name = str(m.get("model", "?")) + (" (embed)" if m.get("kind") == "embed" else "")
        for r in m.get("running") or []:
            out.append([name, f"running (slot {r.get('slot')})", str(r.get("tenant") or "-"),
                        str(r.get("priority", "")), f"{r.get('age_s', 0):.1f}s", str(r.get("tokens_estimated", ""))])
        for r in m.get("queued") or []:
            out.append([name, f"queued #{r.get('position')}", str(r.get("tenant") or "-"),
                        str(r.get("priority", "")), f"{r.get('age_s', 0):.1f}s", str(r.get("tokens_estimated", ""))])
    return out


@click.command()
@api_option
@json_option
def queue(api: str, as_json: bool) -> None:
    """The requests running and queued at the node, per model, in the order the
    queue will serve them (fair by tokens across tenants; batch behind
    interactive)."""
    client = Client(checked_api(api), timeout=5)
    try:
        data = client.get("/api/distributed/queue")
    except ApiError as e:
        if e.status is not None and e.status not in (401, 403):
            raise ApiError(f"{client.base}/api/distributed/queue answered HTTP {e.status}: is --api "
                           "pointing at an ollama-distributed node?", exit_code=2) from None
        raise
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ApiError(f"{client.base}/api/distributed/queue did not answer a queue: is --api "
                       "pointing at an ollama-distributed node (of this version)?", exit_code=2)
    if as_json:
        print_json(data)
        return
    listed = rows([m for m in data["models"] if isinstance(m, dict)])
    if listed:
        click.echo(table(listed, HEADERS, use_color()))
    else:
        click.echo("Nothing running or queued.")
    click.echo(f"\nnode {data.get('node', '?')}: {data.get('in_flight', 0)} running, "
               f"{data.get('queue_depth', 0)} queued of {data.get('max_queue', '?')} "
               f"({data.get('num_parallel', '?')} slot(s) per model)")
    tenants = [t for t in data.get("tenants") or [] if isinstance(t, dict)]
    if tenants:
        click.echo("\n" + table([[str(t.get("tenant") or "-"), f"{t.get('virtual_tokens', 0):g}",
                                  str(t.get("running", 0)), str(t.get("queued", 0))] for t in tenants],
                                 ["TENANT", "VIRTUAL TOKENS", "RUNNING", "QUEUED"], use_color()))
