"""Real dependencies for the tests: memcached, an S3 endpoint (moto server), a statsd socket."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
from botocore.config import Config as BotoConfig


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.01)
    return False


class Memcached:
    """memcached on a free loopback port (retried if someone takes the port first)."""

    def __init__(self, port: int = 0) -> None:
        for _ in range(5):
            self.port = port or free_port()
            command = ["memcached", "-l", "127.0.0.1", "-p", str(self.port), "-m", "32", "-U", "0"]
            if os.geteuid() == 0:
                command += ["-u", "root"]
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if _wait_port("127.0.0.1", self.port, self.proc, 5.0):
                return
            self.proc.kill()
            self.proc.wait()
        raise RuntimeError("memcached did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self, line: str) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(line.encode() + b"\r\n")
            data = b""
            while not data.endswith((b"END\r\n", b"STORED\r\n", b"DELETED\r\n", b"NOT_FOUND\r\n", b"ERROR\r\n")):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    def get(self, key: str) -> bytes | None:
        reply = self.command(f"get {key}")
        match = re.match(rb"VALUE \S+ \d+ (\d+)\r\n", reply)
        if match is None:
            return None
        start = match.end()
        return reply[start : start + int(match.group(1))]

    def set(self, key: str, value: bytes) -> None:
        assert self.command(f"set {key} 0 0 {len(value)}\r\n{value.decode()}") == b"STORED\r\n"

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


class MotoS3:
    """A real S3 HTTP endpoint (moto in server mode) on a loopback port."""

    def __init__(self, log_dir: Path, port: int = 0, *, check_credentials: bool = False) -> None:
        self.log_path = log_dir / f"moto-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"} if check_credentials else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            match = re.search(rb"Running on http://127\.0\.0\.1:(\d+)", self.log_path.read_bytes())
            if match:
                self.port = int(match.group(1))
                break
            if self.proc.poll() is not None:
                raise RuntimeError(self.log_path.read_text())
            time.sleep(0.05)
        else:
            raise RuntimeError("moto did not start")
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="test-key",
            aws_secret_access_key="test-secret",
            region_name="us-east-1",
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def reset(self, bucket: str = "samples") -> None:
        httpx.post(f"{self.url}/moto-api/reset").raise_for_status()
        self.client.create_bucket(Bucket=bucket)

    def object(self, sha: str, bucket: str = "samples") -> bytes | None:
        try:
            reply: Any = self.client.get_object(Bucket=bucket, Key=f"{sha[0:2]}/{sha[2:4]}/{sha[4:6]}/{sha}")
        except self.client.exceptions.NoSuchKey:
            return None
        return bytes(reply["Body"].read())

    def put_raw(self, sha: str, data: bytes, bucket: str = "samples") -> None:
        self.client.put_object(Bucket=bucket, Key=f"{sha[0:2]}/{sha[2:4]}/{sha[4:6]}/{sha}", Body=data)

    def config(self, **extra: Any) -> dict[str, Any]:
        return s3_config(self.port, **extra)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()


def s3_config(port: int, **extra: Any) -> dict[str, Any]:
    """Config keys for an S3 endpoint on a loopback port (Stor's `host:port` form)."""
    return {
        "s3_enabled": True,
        "s3_credentials": {"access_key": "test-key", "secret_key": "test-secret", "host": f"127.0.0.1:{port}"},
        "s3_timeout": 1.0,
        **extra,
    }


class StatsdSink:
    """A UDP socket standing in for statsite; collects the metric lines stor sends."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.lines: list[str] = []

    def collect(self, wait: float = 0.3) -> list[str]:
        """Every line that arrives within `wait` seconds, added to `lines`."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                self.lines.extend(self.sock.recv(65536).decode().splitlines())
            except TimeoutError:
                break
        return self.lines

    def names(self, wait: float = 1.3) -> list[str]:
        """The metric names so far (counters arrive added up, once a second: wait for them)."""
        return [line.split(":", 1)[0] for line in self.collect(wait)]

    def counts(self, wait: float = 1.3) -> dict[str, float]:
        """Each counter's total over the lines so far."""
        totals: dict[str, float] = {}
        for line in self.collect(wait):
            name, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            if kind.startswith("c"):
                totals[name] = totals.get(name, 0.0) + float(value)
        return totals

    def close(self) -> None:
        self.sock.close()


class RabbitMQ:
    """A private RabbitMQ node (Debian's `rabbitmq-server`) on free loopback ports, with its own
    epmd, node name, cookie (in its own HOME) and data directory, so it collides with nothing.
    `stop`/`start` restart it on the same data (durable exchanges, queues and messages stay)."""

    USER, PASSWORD = "stor", "stor-pass"

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        (base / "home").mkdir(exist_ok=True)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            f"default_user = {self.USER}\ndefault_pass = {self.PASSWORD}\ndefault_vhost = /\n"
            "loopback_users = none\n"
        )
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        self.env = {
            **inherited,
            "HOME": str(base / "home"),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": f"stor-test-{self.port}@localhost",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "no-such-env-file"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "PATH": f"/usr/lib/rabbitmq/bin:/usr/sbin:{inherited.get('PATH', '')}",
        }
        self.epmd = subprocess.Popen(
            ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"amqp://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/%2f"

    def start(self, timeout: float = 60.0) -> None:
        self._log = (self.base / "server.log").open("ab")
        self.proc = subprocess.Popen(
            ["rabbitmq-server"], env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if not _wait_port("127.0.0.1", self.port, self.proc, timeout):
            self.stop()
            raise RuntimeError(f"rabbitmq did not start:\n{(self.base / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM, as an operator's restart (it takes 1-3 s)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        self._log.close()

    def close(self) -> None:
        self.stop()
        if self.epmd.poll() is None:
            os.killpg(self.epmd.pid, signal.SIGKILL)
        self.epmd.wait()
