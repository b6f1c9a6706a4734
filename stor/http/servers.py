"""The HTTP servers `stor serve` runs the app under: uvicorn (the default) or granian.

Both run `stor.wiring:app_from_environment` in `workers` processes with the same logging.
uvicorn uses `GuardedHttpToolsProtocol`: a request's head must arrive within `head_timeout`
(else 408) and fit in 64 KiB (else 431), and hot blobs are answered without an ASGI cycle
(the faster of the two for small blobs, see docs/benchmarks.md). granian (Rust, ASGI only)
has its own limits: a head that does not arrive within `head_timeout` (at most 60 s) closes
the connection without an answer, and a head past its buffer (about 400 KiB) gets 431.

The only module that starts a server; with `httpserver`, the only one importing uvicorn, and
the only one importing granian.
"""

from __future__ import annotations

import functools
from typing import Any

import uvicorn
from granian import Granian
from granian.constants import HTTPModes, Interfaces, Loops
from granian.http import HTTP1Settings
from granian.log import LogLevels

from stor.http.server import GuardedHttpToolsProtocol, check_uvicorn

APP = "stor.wiring:app_from_environment"
SERVERS = ("uvicorn", "granian")
GRANIAN_MAX_HEAD_TIMEOUT = 60.0


def serve(server: str, host: str, port: int, workers: int, log_config: dict[str, Any], head_timeout: float) -> None:
    """Serve until SIGINT/SIGTERM. `log_config` is a `logging.config.dictConfig` dict."""
    if server == "granian":
        _granian(host, port, workers, log_config, head_timeout)
    elif server == "uvicorn":
        _uvicorn(host, port, workers, log_config, head_timeout)
    else:
        raise ValueError(f"unknown server {server!r} (known: {', '.join(SERVERS)})")


def _uvicorn(host: str, port: int, workers: int, log_config: dict[str, Any], head_timeout: float) -> None:
    check_uvicorn()
    level = log_config["loggers"]["stor"]["level"].lower()
    uvicorn.run(
        APP,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http=functools.partial(GuardedHttpToolsProtocol, head_timeout=head_timeout),  # type: ignore[arg-type]  # called like the class
        log_config=log_config,
        access_log=level in ("info", "debug"),  # it formats every line before the level check
        server_header=False,
    )


def _granian(host: str, port: int, workers: int, log_config: dict[str, Any], head_timeout: float) -> None:
    level = log_config["loggers"]["stor"]["level"].lower()
    timeout_ms = int(min(head_timeout, GRANIAN_MAX_HEAD_TIMEOUT) * 1000)
    Granian(
        APP,
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        websockets=False,
        http1_settings=HTTP1Settings(header_read_timeout=max(1, timeout_ms)),
        log_level=LogLevels(level),
        log_dictconfig=log_config,
        log_access=level in ("info", "debug"),
        respawn_failed_workers=True,
    ).serve()
