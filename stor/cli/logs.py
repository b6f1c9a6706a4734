"""Logging as `stor serve` configures it, the same in every worker: access lines (`stor.access`)
to stdout, in batches (`cli.accesslog`), everything else to stderr, as plain text or one JSON
object per line.

The HTTP servers' own loggers are shown under names that say what they are: uvicorn's
`uvicorn.error` (which carries its INFO lines too) and granian's `_granian` become
`stor.server`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from stor.cli.accesslog import access_sink

FORMATS = ("text", "json")
ACCESS_FIELDS = ("method", "path", "status", "bytes", "duration_ms", "remote")
AUDIT_FIELDS = ("action", "sha", "admin", "reason")
"""The fields of an audit line (`stor.audit`: takedowns and restores)."""
_RENAMED = {"uvicorn.error": "stor.server", "uvicorn": "stor.server", "_granian": "stor.server"}


class Renamed(logging.Filter):
    """Gives the servers' loggers stor's names (on the record, for every formatter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.name = _RENAMED.get(record.name, record.name)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the access or audit fields when
    the line has them, and the exception's traceback when there is one."""

    converter = time.gmtime  # type: ignore[assignment]  # UTC, as the "Z" says

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in ACCESS_FIELDS + AUDIT_FIELDS:
            if field in record.__dict__:
                line[field] = record.__dict__[field]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def logging_config(level: str, log_format: str = "text") -> dict[str, Any]:
    """A `logging.config.dictConfig` dict: access lines to stdout, the rest to stderr."""
    if log_format == "json":
        formatters: dict[str, Any] = {"plain": {"()": JsonFormatter}, "access": {"()": JsonFormatter}}
    else:
        formatters = {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
            "access": {"format": "%(asctime)s %(message)s"},
        }
    renamed = {"renamed": {"()": Renamed}}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": renamed,
        "formatters": formatters,
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
                "filters": ["renamed"],
            },
            # written in batches (`cli.accesslog`): a line per write would cost a hot GET's time
            "stdout": {"()": access_sink, "formatter": "access", "fd": 1, "json_lines": log_format == "json"},
        },
        "loggers": {
            "stor": {"handlers": ["stderr"], "level": level, "propagate": False},
            "stor.access": {"handlers": ["stdout"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["stdout"], "level": "WARNING", "propagate": False},
            "_granian": {"handlers": ["stderr"], "level": level, "propagate": False},
            "granian.access": {"handlers": ["stdout"], "level": "WARNING", "propagate": False},
        },
    }
