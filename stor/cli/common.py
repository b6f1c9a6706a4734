"""What the `stor` commands share: one-line errors on stderr, and a config that is valid or
an exit with status 2."""

from __future__ import annotations

import sys

import click

from stor.config import Config, load_config
from stor.errors import ConfigError
from stor.wiring.build import preflight

DEFAULT_PORT = 8321


def fail(message: str) -> None:
    click.echo(f"stor: {message}", err=True)


def validated(path: str) -> Config:
    try:
        config = load_config(path)
        preflight(config)
    except ConfigError as exc:
        fail(f"config error: {exc}")
        sys.exit(2)
    return config
