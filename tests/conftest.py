"""Shared fixtures: storage directories, config files, an in-process client, a real server."""

from __future__ import annotations

import asyncio
import asyncio.runners
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from stor.config import config_from_mapping
from stor.wiring.build import build_app
from tests.helpers import PASSWORD, USER, layout_path, temp_files
from tests.services import Memcached, MotoS3, RabbitMQ, StatsdSink, free_port


def _cancel_all_tasks_bounded(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio's close-time cancellation of leftover tasks, with a deadline: a task that
    swallows its cancellation fails the run with its stack, instead of hanging it where
    pytest-timeout cannot fire. (Python 3.11's `asyncio.wait_for` did that to the health
    loop: see `test_cache.py::test_the_health_loop_stops_when_cancelled_as_the_cache_check_finishes`.)
    """
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    _, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=10))
    for task in tasks:
        if task not in pending and not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({"message": "unhandled exception at loop close", "task": task})
    if pending:
        stacks = io.StringIO()
        for task in pending:
            task.print_stack(file=stacks)
        raise RuntimeError(f"{len(pending)} task(s) did not stop when cancelled at loop close:\n{stacks.getvalue()}")


asyncio.runners._cancel_all_tasks = _cancel_all_tasks_bounded  # type: ignore[attr-defined]


@dataclass
class Storage:
    """Two mirrored pairs of plain directories under a test's temp dir."""

    base: Path
    pairs: list[list[Path]] = field(default_factory=list)

    @property
    def roots(self) -> list[Path]:
        return [root for pair in self.pairs for root in pair]

    def config(self, **overrides: Any) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "storage_pairs": [[str(p) for p in pair] for pair in self.pairs],
            "basic_auth": f"{USER}:{PASSWORD}",
            "check_mountpoints": False,
            "placement_threshold": 0,
            "health_check_interval": 0.5,
        }
        raw.update(overrides)
        return raw

    def write_config(self, **overrides: Any) -> Path:
        path = self.base / "config.json"
        path.write_text(json.dumps(self.config(**overrides)))
        return path

    def copies(self, sha: str) -> list[Path]:
        return [layout_path(root, sha) for root in self.roots if layout_path(root, sha).exists()]

    def temps(self) -> list[Path]:
        return [t for root in self.roots for t in temp_files(root)]


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    pairs = []
    for pair in ("a", "b"):
        members = [tmp_path / f"{pair}{n}" for n in (1, 2)]
        for member in members:
            member.mkdir()
        pairs.append(members)
    return Storage(tmp_path, pairs)


def takes_nowait(directory: Path) -> bool:
    """Whether the filesystem of `directory` takes RWF_NOWAIT (else nothing is kept open there)."""
    probe = directory / ".nowait-probe"
    probe.write_bytes(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    finally:
        os.close(fd)
        probe.unlink()
    return True


@pytest.fixture
def nowait_dir(tmp_path: Path) -> Path:
    if not takes_nowait(tmp_path):
        pytest.skip(f"{tmp_path} is on a filesystem without RWF_NOWAIT: nothing is kept open there")
    return tmp_path


@pytest.fixture
def nowait_storage(storage: Storage) -> Storage:
    if not takes_nowait(storage.base):
        pytest.skip(f"{storage.base} is on a filesystem without RWF_NOWAIT: nothing is kept open there")
    return storage


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(storage: Storage) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process over httpx's ASGITransport, with its lifespan run by hand."""
    async with app_client(storage.config()) as http:
        yield http


class app_client:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.app = build_app(config_from_mapping(raw, {}))

    async def __aenter__(self) -> httpx.AsyncClient:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self._http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://stor")
        return self._http

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()
        await self._lifespan.__aexit__(None, None, None)


_LISTENING = re.compile(rb"(?:Uvicorn running on|Listening at:) (https?://[\d.]+:[1-9]\d*)")


class StorProcess:
    """`stor serve` in a subprocess on a free port, logging into the test's temp dir. (A port
    chosen here, not `--port 0`: granian does not log the port it was given.)"""

    def __init__(
        self, args: list[str], cwd: Path, env: dict[str, str] | None = None, *, wrapper: list[str] | None = None
    ) -> None:
        self.log_path = cwd / f"stor-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        inherited = {k: v for k, v in os.environ.items() if k not in ("CONFIG_FILE", "STOR_BASIC_AUTH")}
        full_env = {**inherited, **(env or {})}
        command = [sys.executable, "-m", "stor", "serve", "--host", "127.0.0.1", "--port", str(free_port()), *args]
        self.proc = subprocess.Popen(
            [*(wrapper or []), *command],
            cwd=cwd,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.url = self._wait_ready()
        except BaseException:
            self.stop()  # a server that never answered is still a process (and its workers)
            raise

    def _wait_ready(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log_path.read_bytes())
            if match and self._answers(match.group(1).decode()):
                return match.group(1).decode()
            if self.proc.poll() is not None:
                raise RuntimeError(f"stor exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"stor did not start within {timeout}s:\n{self.log()}")

    @staticmethod
    def _answers(url: str) -> bool:
        """With several workers the parent logs its URL before the workers listen."""
        try:
            return httpx.get(url + "/", timeout=2, verify=False).status_code == 200
        except httpx.TransportError:
            return False

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_stor(tmp_path: Path) -> Iterator[Callable[..., StorProcess]]:
    started: list[StorProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> StorProcess:
        server = StorProcess(list(args), cwd or tmp_path, env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(params=["uvicorn", "granian"])
def server(request: pytest.FixtureRequest, storage: Storage, start_stor: Callable[..., StorProcess]) -> StorProcess:
    """`stor serve` under each HTTP server it offers."""
    return start_stor("--config", str(storage.write_config(body_idle_timeout=1.0)), "--server", request.param)


@pytest.fixture
def memcached() -> Iterator[Memcached]:
    server = Memcached()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def moto_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    yield server
    server.kill()


@pytest.fixture(scope="session")
def rabbitmq_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    if not any(os.access(os.path.join(d, "rabbitmq-server"), os.X_OK) for d in ("/usr/sbin", "/usr/bin")):
        pytest.skip("rabbitmq-server is not installed (make test installs it)")
    broker = RabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    yield broker
    broker.close()


@pytest.fixture
def rabbitmq(rabbitmq_session: RabbitMQ) -> RabbitMQ:
    """The shared private broker, running (a test that stopped it has it started again)."""
    if rabbitmq_session.proc is None:
        rabbitmq_session.start()
    return rabbitmq_session


@pytest.fixture
def s3(moto_session: MotoS3) -> MotoS3:
    """The shared S3 endpoint, emptied, with the `samples` bucket."""
    moto_session.reset()
    return moto_session


@pytest.fixture
def statsd_sink() -> Iterator[StatsdSink]:
    sink = StatsdSink()
    yield sink
    sink.close()
