"""The servers under test, on free loopback ports: stor (`stor serve`, 2 workers) and nginx
serving the same files; their processes' RSS."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.settings import FD_LIMIT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_fd_limit() -> None:
    """Let stor (a child: it inherits the limit) keep the whole small-blob corpus open
    (open_file_cache_size, a quarter of the limit): what an operator sets with systemd's
    LimitNOFILE. Root may raise the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_LIMIT if os.geteuid() == 0 else hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), max(hard, wanted)))


def rss(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time used so far by `pids` (their threads included)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def tree(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    children = [int(p) for p in out.split()]
    return [pid] + [q for c in children for q in tree(c)]


class Stor:
    def __init__(
        self,
        work: Path,
        config: dict[str, object],
        workers: int = 2,
        server: str | None = None,
        *,
        access_log: bool = False,
    ) -> None:
        """`access_log`: stor's default logging (an access line per request, to a file), else
        warnings only."""
        self.port = free_port()
        path = work / f"config-{self.port}.json"
        path.write_text(json.dumps(config))
        self.log = (work / f"stor-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stor", "serve", "--config", str(path), "--port", str(self.port),
             "--workers", str(workers), "--log-level", "info" if access_log else "warning",
             *(["--server", server] if server else [])],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/status", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("stor did not start")

    def pids(self) -> list[int]:
        return tree(self.proc.pid)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=20)
        self.log.close()


class Nginx:
    def __init__(self, work: Path, root: Path, *, access_log: bool = False) -> None:
        """`access_log`: nginx's combined log to a file through a 64 KiB buffer, as deployed."""
        self.port = free_port()
        logged = f"{work}/nginx-access-{self.port}.log combined buffer=64k flush=1s" if access_log else "off"
        conf = work / f"nginx-{self.port}.conf"
        conf.write_text(
            f"""
worker_processes 2;
pid {work}/nginx-{self.port}.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log {logged};
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {work}/nginx-tmp;
    proxy_temp_path {work}/nginx-tmp; fastcgi_temp_path {work}/nginx-tmp;
    uwsgi_temp_path {work}/nginx-tmp; scgi_temp_path {work}/nginx-tmp;
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        # Stor's layout: /<SHA> is AB/CD/EF/<SHA>.dat (the URL carries the sha in uppercase:
        # core nginx cannot change case; the files served are the very same)
        location ~ "^/([0-9A-F]{{2}})([0-9A-F]{{2}})([0-9A-F]{{2}})([0-9A-F]{{58}})$" {{
            try_files /$1/$2/$3/$1$2$3$4.dat =404;
        }}
    }}
}}
"""
        )
        (work / "nginx-tmp").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"], start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        time.sleep(0.5)

    def pids(self) -> list[int]:
        return tree(self.proc.pid)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)
