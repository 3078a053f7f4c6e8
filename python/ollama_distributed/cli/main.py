"""`ollama-distributed`: one module per command, registered here."""

from __future__ import annotations

import click

from .. import __version__
from . import (  # operator surface
    cluster,
    config_cmd,
    keys,
    models,
    nodes,
    queue,
    run,
    start,
    status,
    troubleshoot,
    version,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="ollama-distributed")
def cli() -> None:
    """Turn one Linux machine, or many, into a single LLM endpoint that speaks
    Ollama's and OpenAI's APIs.

    \b
    Start a node:          ollama-distributed start
    Check it:              ollama-distributed status
    Talk to it:            ollama-distributed run smollm2:135m "Hello"
    """


cli.add_command(start.start)
cli.add_command(version.version)
cli.add_command(config_cmd.config)
cli.add_command(models.models)
cli.add_command(run.run)
cli.add_command(status.status)
cli.add_command(troubleshoot.troubleshoot)
cli.add_command(nodes.nodes)
cli.add_command(queue.queue)
cli.add_command(cluster.cluster)
cli.add_command(keys.keys)


def main() -> None:
    cli(prog_name="ollama-distributed")


if __name__ == "__main__":
    main()
