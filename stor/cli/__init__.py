"""The `stor` command (see `main`). The only package that configures logging, starts the
server or exits."""

from stor.cli.main import main

__all__ = ["main"]
