"""`nodes`: the cluster's nodes as a table (GET /api/distributed/nodes)."""

from __future__ import annotations

from typing import Any

import click

from .client import ApiError, Client, checked_api, human_bytes, print_json, use_color
from .options import api_option, json_option

HEADERS = ["ID", "NAME", "STATUS", "ROLE", "ADDRESS", "CPU", "MEMORY", "MODELS", "LOADED", "IN FLIGHT"]


def rows(nodes: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for n in nodes:
        r = n.get("resources") or {}
        mem = (f"{100 * r.get('memory', 0):.0f}% of {human_bytes(r['memory_total_bytes'])}"
               if r.get("memory_total_bytes") else "-")
        out.append([
            str(n.get("id", "?")) + (" *" if n.get("local") else ""),
            str(n.get("name", "")),
            str(n.get("status", "?")) + (" (draining)" if n.get("draining") else ""),
            str(n.get("role", "?")),
            str(n.get("address") or "-"),
            f"{100 * r.get('cpu', 0):.0f}% of {r.get('cpu_count', '?')}" if r else "-",
            mem,
            ", ".join(map(str, n.get("models") or [])) or "-",
            ", ".join(map(str, n.get("loaded_models") or [])) or "-",
            str(n.get("in_flight", 0)),
        ])
    return out


def table(rows_: list[list[str]], headers: list[str], color: bool) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows_]) for i in range(len(headers))]
    lines = []
    for k, r in enumerate([headers, *rows_]):
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()
        if color and k == 0:
            line = click.style(line, bold=True)
        lines.append(line)
    return "\n".join(lines)


@click.command()
@api_option
@json_option
def nodes(api: str, as_json: bool) -> None:
    """The cluster's nodes, with their state, resources and models (* marks the node asked)."""
    client = Client(checked_api(api), timeout=5)
    try:
        data = client.get("/api/distributed/nodes")
    except ApiError as e:
        if e.status is not None and e.status != 401:
            raise ApiError(f"{client.base}/api/distributed/nodes answered HTTP {e.status}: is --api "
                           "pointing at an ollama-distributed node?", exit_code=2) from None
        raise
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise ApiError(f"{client.base}/api/distributed/nodes did not answer a node list: is --api "
                       "pointing at an ollama-distributed node?", exit_code=2)
    if as_json:
        print_json(data)
        return
    listed = [n for n in data["nodes"] if isinstance(n, dict)]
    click.echo(table(rows(listed), HEADERS, use_color()))
    active = sum(1 for n in listed if n.get("status") == "active")
    click.echo(f"\n{len(listed)} node(s), {active} active")
