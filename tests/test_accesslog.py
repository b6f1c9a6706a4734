"""Access lines written in batches (`stor.cli.accesslog`): the same bytes as the logging
formatters, none written per request, all written in order on a clean stop."""

from __future__ import annotations

import asyncio
import logging
import os
import select
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from stor.cli import accesslog
from stor.cli.accesslog import AccessSink
from stor.cli.logs import JsonFormatter
from stor.http import accounting
from tests.conftest import Storage, StorProcess

FIELDS: tuple[str, str, str, int, int, float] = ("127.0.0.1:5555", "GET", "/" + "ab" * 32, 200, 4096, 0.413)
ODD = 'a "quoted" päth\\'


def at(path: str) -> tuple[str, str, str, int, int, float]:
    """`FIELDS` for another path."""
    return FIELDS[0], FIELDS[1], path, *FIELDS[3:]


NOW = 1_780_000_000.987654


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Every `os.write` of the sinks, in order (and still written)."""
    done: list[bytes] = []
    real = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        done.append(bytes(data))
        return real(fd, data)

    monkeypatch.setattr("stor.cli.accesslog.os.write", write)
    yield done


def record(created: float, path: str = FIELDS[2]) -> logging.LogRecord:
    """The record the `logging` path makes of `FIELDS` (at `path`)."""
    remote, method, path, status, sent, duration_ms = at(path)
    line = logging.LogRecord("stor.access", logging.INFO, __file__, 1, accounting.ACCESS_MESSAGE, at(path), None)
    line.created, line.msecs = created, int((created - int(created)) * 1000) + 0.0
    fields = {"method": method, "path": path, "status": status, "bytes": sent, "duration_ms": duration_ms}
    line.__dict__.update(fields, remote=remote)
    return line


@pytest.mark.parametrize("json_lines", [False, True])
def test_a_line_is_what_the_logging_formatter_makes_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, json_lines: bool
) -> None:
    formatter = JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(message)s")
    out = tmp_path / "out"
    with out.open("wb") as file:
        sink = AccessSink(file.fileno(), json_lines)
        for now in (NOW, NOW + 0.0004, NOW + 1.5, NOW + 86_400.001):
            monkeypatch.setattr("stor.cli.accesslog.time.time", lambda now=now: now)
            sink.line(*FIELDS)  # no event loop: written at once
            sink.line(*at(ODD))
        sink.close()
    expected = []
    for now in (NOW, NOW + 0.0004, NOW + 1.5, NOW + 86_400.001):
        expected += [formatter.format(record(now)), formatter.format(record(now, ODD))]
    assert out.read_text(encoding="utf-8").splitlines() == expected


def test_a_burst_is_written_in_a_few_batches_in_order_and_whole(tmp_path: Path, writes: list[bytes]) -> None:
    out = tmp_path / "out"

    async def burst() -> None:
        with out.open("wb") as file:
            sink = AccessSink(file.fileno())
            for n in range(5000):
                sink.line(*at(f"/{n}"))
            held = out.read_bytes()
            await asyncio.sleep(sink.delay * 3)  # the rest, on the loop's timer
            assert out.read_bytes().count(b"\n") == 5000
            assert held and len(held) < len(out.read_bytes())  # 64 KiB batches went out on the way
            sink.close()

    asyncio.run(burst())
    lines = out.read_text().splitlines()
    assert [line.split('"')[1] for line in lines] == [f"GET /{n}" for n in range(5000)]
    assert all(line.endswith(" 200 4096 0.4ms") for line in lines)
    size = out.stat().st_size
    assert len(writes) <= size // accesslog.MAX_BYTES + 2  # not one per line
    assert all(batch.endswith(b"\n") for batch in writes)


def test_nothing_is_written_until_the_delay_or_the_stop(tmp_path: Path, writes: list[bytes]) -> None:
    async def quiet() -> None:
        with (tmp_path / "out").open("wb") as file:
            sink = AccessSink(file.fileno(), delay=30)
            for _ in range(100):
                sink.line(*FIELDS)
            await asyncio.sleep(0.05)
            assert writes == []
            sink.close()  # the app's end: all at once
            assert len(writes) == 1 and writes[0].count(b"\n") == 100
            sink.line(*FIELDS)  # a straggler after the end: written at once
            assert len(writes) == 2

    asyncio.run(quiet())


def test_a_pipe_takes_whole_lines_of_at_most_pipe_buf(writes: list[bytes]) -> None:
    read, write = os.pipe()
    try:
        sink = AccessSink(write, max_bytes=1 << 20)

        async def lines() -> None:  # on a loop: held until the close
            for n in range(200):
                sink._add(f"{n:04d}" + "x" * 95 + "\n")  # 100 bytes a line
            sink.close()

        asyncio.run(lines())
        assert len(writes) == -(-200 * 100 // (select.PIPE_BUF // 100 * 100))
        assert all(len(batch) <= select.PIPE_BUF and batch.endswith(b"\n") for batch in writes)
        assert os.read(read, 1 << 20) == b"".join(writes)
    finally:
        os.close(read)
        os.close(write)


def test_the_sink_gets_the_lines_only_when_info_is_on(tmp_path: Path) -> None:
    logger = logging.getLogger("stor.access")
    level = logger.level
    with (tmp_path / "out").open("wb") as file:
        accesslog.access_sink(file.fileno())
        try:
            logger.setLevel(logging.WARNING)
            accounting.access("GET", "/quiet", 200, 1, 0.001, ("127.0.0.1", 1))
            logger.setLevel(logging.INFO)
            accounting.access("GET", "/heard", 200, 1, 0.001, ("127.0.0.1", 1))
        finally:
            logger.setLevel(level)
            accounting.close_sink()
    assert accounting._sink is None  # closed: back to `logging`
    [line] = (tmp_path / "out").read_text().splitlines()
    assert '"GET /heard" 200 1 1.0ms' in line


@pytest.mark.parametrize("http_server", ["uvicorn", "granian"])
def test_a_clean_stop_loses_no_line(storage: Storage, start_stor: Callable[..., StorProcess], http_server: str) -> None:
    server = start_stor("--config", str(storage.write_config()), "--workers", "2", "--server", http_server)
    with httpx.Client(base_url=server.url) as http:
        for n in range(300):
            assert http.get(f"/missing-{n}").status_code == 404
    server.stop()  # SIGTERM, well within the delay of the last lines
    lines = [line for line in server.log().splitlines() if '"GET /missing-' in line]
    assert sorted(lines, key=lambda line: int(line.split("missing-")[1].split('"')[0])) == lines  # one client
    assert len(lines) == 300 and all(line.endswith("ms") for line in lines)
