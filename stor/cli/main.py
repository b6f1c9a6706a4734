"""The `stor` command group: every command, from the modules that define them."""

from __future__ import annotations

import click

from stor import __version__
from stor.cli import client, serve, tools


@click.group()
@click.version_option(__version__, prog_name="stor")
def main() -> None:
    """stor: a content-addressed SHA-256 blob store on mirrored disk pairs."""


for command in (
    serve.serve,
    serve.check_config,
    client.put,
    client.get,
    client.head,
    client.takedown,
    tools.scrub,
    tools.import_,
    tools.evacuate,
    tools.hash_password,
):
    main.add_command(command)
