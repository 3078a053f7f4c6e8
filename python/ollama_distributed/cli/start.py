"""`start`: run the node in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from .. import config as cfgmod
from .. import env, logs
from ..config import ENGINES, LOG_LEVELS
from ..errors import ConfigError


def _services(node: Any) -> None:
    cfg = node.cfg
    ok = "✅"
    lines = [
        f"{ok} Node {node.node_id} started successfully",
        "",
        "Services:",
        f"   API:    {node.api_url}",
        f"   Web:    {node.web_url or 'disabled (web.enabled: false)'}",
        f"   Health: {node.api_url}/health",
    ]
    if node.cluster is not None:
        reach = (" (all interfaces: peers must reach it; --p2p-host narrows it)"
                 if cfg.p2p.host in ("0.0.0.0", "::", "") else "")
        lines.append(f"   P2P:    quic://{cfg.p2p.host}:{cfg.p2p.port}{reach}")
    else:
        lines.append(f"   P2P:    not running ({node.p2p_reason})")
    lines += ["", "Use 'ollama-distributed status' to monitor the node."]
    click.echo("\n".join(lines))
    sys.stdout.flush()


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config file (YAML).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data dir (identity, TLS, models).")
@click.option("--api-host", help="API bind address (default 127.0.0.1).")
@click.option("--api-port", type=int, help="API port (default 8080).")
@click.option("--web-port", type=int, help="Dashboard port (default 8081).")
@click.option("--p2p-host", help="QUIC peer bind address (default 0.0.0.0: every interface, as peers "
              "must reach it).")
@click.option("--p2p-port", type=int, help="QUIC peer port, UDP (default 4001).")
@click.option("--join", multiple=True, metavar="HOST:PORT", help="A cluster member to join (repeatable).")
@click.option("--token-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="A file holding the join token (`ollama-distributed cluster token` on a member). "
              f"Or set ${env.JOIN_TOKEN}.")
@click.option("--token", help="The join token itself. Other users see it in `ps`: prefer --token-file "
              f"or ${env.JOIN_TOKEN}.")
@click.option("--engine", type=click.Choice(ENGINES), help="Inference engine (default llamacpp).")
@click.option("--upstream", metavar="URL", help="Upstream URL for the ollama and openai engines.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), help="Log level.")
def start(config_path: str | None, data_dir: str | None, api_host: str | None, api_port: int | None,
          web_port: int | None, p2p_host: str | None, p2p_port: int | None, join: tuple[str, ...],
          token_file: str | None, token: str | None, engine: str | None, upstream: str | None,
          log_level: str | None) -> None:
    """Run a node in the foreground (this is what systemd's ExecStart runs)."""
    if token:
        logs.fatal("Warning: --token shows the join token to every user of this machine (`ps`); "
                   f"use --token-file FILE or ${env.JOIN_TOKEN} instead")
    elif token_file:
        token = ""  # read from the file below, over any token in the config file
    else:
        token = env.get(env.JOIN_TOKEN)
    overrides: dict[str, dict[str, Any]] = {
        "node": {"data_dir": data_dir},
        "api": {"host": api_host, "port": api_port},
        "web": {"port": web_port},
        "p2p": {"host": p2p_host, "port": p2p_port, "join": list(join) or None, "token": token,
                "token_file": token_file},
        "engine": {"kind": engine, "upstream": upstream},
        "logging": {"level": log_level},
    }
    try:
        cfg = cfgmod.load(config_path, overrides)
    except ConfigError as e:
        logs.fatal(f"Error: invalid configuration: {e}")
        sys.exit(78)  # EX_CONFIG: systemd shows it, and Restart=on-failure stays bounded
    logs.setup(cfg.logging.level)
    click.echo("Starting ollama-distributed node...")
    click.echo(f"Using configuration: {cfg.source}")
    from ..node import Node

    try:
        node = Node(cfg, overrides, config_path)
        asyncio.run(node.run(on_started=_services))
    except ConfigError as e:
        logs.fatal(f"Error: {e}")
        sys.exit(78)
    except KeyboardInterrupt:
        pass
