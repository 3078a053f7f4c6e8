"""`config init|validate|show`."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from .. import config as cfgmod
from ..errors import ConfigError
from .client import print_json


@click.group()
def config() -> None:
    """Create, check and show the configuration."""


@config.command("init")
@click.option("--path", type=click.Path(dir_okay=False, path_type=Path),
              default=lambda: str(cfgmod.USER_CONFIG.expanduser()),
              show_default="~/.ollama-distributed/config.yaml", help="Where to write the file.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: Path, force: bool) -> None:
    """Write a config file with every key at its default."""
    if path.exists() and not force:
        raise click.ClickException(f"{path} already exists; pass --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cfgmod.render_default(), encoding="utf-8")
    except OSError as e:
        raise click.ClickException(f"cannot write {path}: {e.strerror}") from None
    click.echo(f"wrote {path}")


@config.command("validate")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
def validate(path: Path | None) -> None:
    """Check a config file (default: the one the node would use). Exit 1 when invalid."""
    try:
        found = path or cfgmod.find_config_file()
        if found is None:
            click.echo("no config file found; the built-in defaults are valid")
            return
        cfgmod.validate_file(found)
    except ConfigError as e:
        click.echo(f"invalid: {e}", err=True)
        sys.exit(1)
    click.echo(f"{found}: valid")


@config.command("show")
@click.option("--config", "path", type=click.Path(dir_okay=False), help="Config file to use.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
def show(path: str | None, as_json: bool) -> None:
    """Print the effective configuration (file, environment and defaults merged),
    with api.auth_tokens and p2p.token shown as <redacted>."""
    try:
        cfg = cfgmod.load(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    values = cfgmod.redacted(cfg.to_dict())  # tokens never reach a terminal or a pasted bug report
    if as_json:
        print_json({"source": cfg.source, **values})
    else:
        click.echo(f"# source: {cfg.source}")
        click.echo(yaml.safe_dump(values, sort_keys=False), nl=False)
