"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from .client import default_api

F = TypeVar("F", bound=Callable[..., Any])


def api_option(f: F) -> F:
    return click.option(
        "--api", "api", default=default_api, show_default="$OLLAMA_DISTRIBUTED_API or http://127.0.0.1:8080",
        metavar="URL", help="The node's API URL.",
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)
