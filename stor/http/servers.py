"""The HTTP servers `stor serve` runs the app under: uvicorn (the default) or granian.

Both run `stor.wiring.build:app_from_environment` in `workers` processes with the same logging.
uvicorn uses `GuardedHttpToolsProtocol`: a request's head must arrive within `head_timeout`
(else 408) and fit in 64 KiB (else 431), and hot blobs are answered without an ASGI cycle
(the faster of the two for small blobs, see docs/benchmarks.md). granian (Rust, ASGI only)
has its own limits: a head that does not arrive within `head_timeout` (at most 60 s) closes
the connection without an answer, and a head past its buffer (about 400 KiB) gets 431.

The only module that starts a server; with `httpserver`, the only one importing uvicorn, and
the only one importing granian.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from granian import Granian
from granian.constants import HTTPModes, Interfaces, Loops
from granian.http import HTTP1Settings
from granian.log import LogLevels
from uvicorn.supervisors.multiprocess import Multiprocess

from stor.http.protocol import GuardedHttpToolsProtocol, check_uvicorn

log = logging.getLogger(__name__)

APP = "stor.wiring.build:app_from_environment"
SERVERS = ("uvicorn", "granian")
GRANIAN_MAX_HEAD_TIMEOUT = 60.0


@dataclass(frozen=True)
class Listen:
    """Where and how to serve: the address, the worker processes, the limit on a request's
    head, and TLS (a PEM certificate chain and its key) when both files are given."""

    host: str
    port: int
    workers: int = 1
    head_timeout: float = 30.0
    certfile: str | None = None
    keyfile: str | None = None


def serve(server: str, listen: Listen, log_config: dict[str, Any]) -> bool:
    """Serve until SIGINT/SIGTERM. `log_config` is a `logging.config.dictConfig` dict. False
    when the server never started (the app failed to load, the port was taken)."""
    if server == "granian":
        _granian(listen, log_config)
        return True
    if server == "uvicorn":
        return _uvicorn(listen, log_config)
    raise ValueError(f"unknown server {server!r} (known: {', '.join(SERVERS)})")


def _uvicorn(listen: Listen, log_config: dict[str, Any]) -> bool:
    check_uvicorn()
    config = uvicorn.Config(
        APP,
        factory=True,
        host=listen.host,
        port=listen.port,
        ssl_certfile=listen.certfile,
        ssl_keyfile=listen.keyfile,
        workers=listen.workers,
        loop="uvloop",
        http=functools.partial(GuardedHttpToolsProtocol, head_timeout=listen.head_timeout),  # type: ignore[arg-type]  # called like the class
        log_config=log_config,
        access_log=False,  # stor logs each request itself (`stor.access`), with its size and time
        server_header=False,
    )
    if listen.workers > 1:
        _HupToWorkers(config, sockets=[config.bind_socket()]).run()
        return True
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return server.started


class _HupToWorkers(Multiprocess):
    """uvicorn's supervisor, except that SIGHUP goes on to every worker, which re-reads the
    config itself (`stor.wiring.reload`), instead of restarting them all."""

    def handle_hup(self) -> None:
        log.info("SIGHUP: passed on to %d workers to re-read the config", len(self.processes))
        for process in self.processes:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)


def _granian(listen: Listen, log_config: dict[str, Any]) -> None:
    level = log_config["loggers"]["stor"]["level"].lower()
    timeout_ms = int(min(listen.head_timeout, GRANIAN_MAX_HEAD_TIMEOUT) * 1000)
    tls = (
        {"ssl_cert": Path(listen.certfile), "ssl_key": Path(listen.keyfile)}
        if listen.certfile and listen.keyfile
        else {}
    )
    Granian(
        APP,
        factory=True,
        address=listen.host,
        port=listen.port,
        interface=Interfaces.ASGI,
        workers=listen.workers,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        websockets=False,
        http1_settings=HTTP1Settings(header_read_timeout=max(1, timeout_ms)),
        log_level=LogLevels(level),
        log_dictconfig=log_config,
        log_access=False,  # as under uvicorn: `stor.access`
        respawn_failed_workers=True,
        **tls,  # type: ignore[arg-type]
    ).serve()
