"""A client for stor's HTTP API (httpx, blocking, thread-safe): what `stor put/get/head` are
built on, and a Python API of its own (see docs/client.md).

Connection failures and 5xx answers are retried with exponential backoff and jitter
(`stamina`), `retries` times. Every failure is a `ClientError`: one line naming the request
and, where there was one, the HTTP status, with the exit code the command line uses for it
(1 not found or content mismatch, 2 usage or credentials, 3 unreachable or still failing).
Downloads are verified and written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import httpx
import stamina

from stor import __version__
from stor.digest import Sha

CHUNK = 1024 * 1024
STAT_BATCH = 10_000
Progress = Callable[[int], None]
T = TypeVar("T")

NOT_FOUND, USAGE, UNREACHABLE = 1, 2, 3
"""Exit codes of the client commands (0 is success)."""


class ClientError(Exception):
    """One clear line; `status` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.exit_code = exit_code if exit_code is not None else _exit_code(status)


def _exit_code(status: int | None) -> int:
    if status is None or status >= 500:
        return UNREACHABLE
    if status in (400, 401, 403):
        return USAGE
    return NOT_FOUND  # 404, and 410 (taken down)


class _ServerError(Exception):
    """A 5xx answer, retried like a connection failure."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.status_code}")
        self.response = response


@dataclass(frozen=True)
class HeadInfo:
    sha: Sha
    size: int
    last_modified: str


def parse_credentials(text: str) -> tuple[str, str]:
    """`user:password` (the password may hold colons), as curl's `-u`."""
    user, colon, password = text.partition(":")
    if not user or not colon:
        raise ClientError("credentials must be USER:PASSWORD", exit_code=USAGE)
    return user, password


def hash_file(path: Path, progress: Progress | None = None) -> Sha:
    """The sha256 of a file, streamed; raises `ClientError` when it cannot be read."""
    hasher = hashlib.sha256()
    for chunk in _read(path, progress):
        hasher.update(chunk)
    return Sha(hasher.hexdigest())


def _read(path: Path, progress: Progress | None) -> Iterator[bytes]:
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                if progress:
                    progress(len(chunk))
                yield chunk
    except FileNotFoundError:
        raise ClientError(f"{path}: no such file", exit_code=NOT_FOUND) from None
    except IsADirectoryError:
        raise ClientError(f"{path}: is a directory", exit_code=USAGE) from None
    except OSError as exc:
        raise ClientError(f"{path}: cannot read: {exc.strerror}", exit_code=NOT_FOUND) from None


class StorClient:
    def __init__(
        self,
        url: str,
        credentials: tuple[str, str] | None = None,
        *,
        retries: int = 3,
        timeout: float = 60.0,
        backoff: float = 0.5,
    ) -> None:
        self.retries = retries
        self.backoff = backoff
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            auth=credentials,
            timeout=httpx.Timeout(timeout, connect=10.0),
            headers={"User-Agent": f"stor-client/{__version__}"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> StorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stat(self, shas: list[Sha]) -> dict[Sha, dict[str, object] | None]:
        """Which of `shas` the server has (batches of 10,000)."""
        answers: dict[Sha, dict[str, object] | None] = {}
        for start in range(0, len(shas), STAT_BATCH):
            response = self._request("POST", "/stat", json=shas[start : start + STAT_BATCH])
            answers.update(response.json())
        return answers

    def put(self, sha: Sha, path: Path, progress: Progress | None = None) -> bool:
        """Upload the file as `sha`; True if stored now, False if the server had it."""
        size = str(_size(path))
        response = self._request(
            "POST", f"/{sha}", body=lambda: _read(path, progress), headers={"Content-Length": size}
        )
        return response.status_code == 201

    def put_named(self, name: str, path: Path, progress: Progress | None = None) -> Sha:
        """Store the file under the name `name` (created or replaced); returns its sha."""
        size = str(_size(path))
        response = self._request(
            "PUT", "/file", params={"path": name}, body=lambda: _read(path, progress), headers={"Content-Length": size}
        )
        return Sha(str(response.json()["sha"]))

    def take_down(self, sha: Sha, reason: str) -> dict[str, object]:
        """Take `sha` down for good (admin credentials); what the server removed."""
        response = self._request("DELETE", f"/{sha}", headers={"X-Stor-Reason": reason})
        answer: dict[str, object] = response.json()
        return answer

    def head(self, sha: Sha) -> HeadInfo:
        response = self._request("HEAD", f"/{sha}")
        return HeadInfo(sha, int(response.headers["content-length"]), response.headers.get("last-modified", ""))

    def head_named(self, name: str) -> HeadInfo:
        response = self._request("HEAD", "/file", params={"path": name})
        sha = Sha(response.headers.get("etag", "").strip('"'))
        return HeadInfo(sha, int(response.headers["content-length"]), response.headers.get("last-modified", ""))

    def get(self, sha: Sha, target: Path, progress: Progress | None = None) -> int:
        """Download into `target` atomically (a temp file beside it, renamed once the hash
        matches). Returns the size."""
        return self._save(f"/{sha}", {}, target, progress)

    def get_named(self, name: str, target: Path, progress: Progress | None = None) -> int:
        """Download the file named `name`, verified against the sha in its ETag."""
        return self._save("/file", {"path": name}, target, progress)

    def _save(self, url: str, params: dict[str, str], target: Path, progress: Progress | None) -> int:
        directory = target.parent
        try:
            fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=directory)
        except OSError as exc:
            raise ClientError(f"{directory}: cannot write here: {exc.strerror}", exit_code=NOT_FOUND) from None
        try:
            with os.fdopen(fd, "wb") as out:
                size = self._retried("GET", url, lambda: self._download(url, params, out, progress))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return size

    def _download(self, url: str, params: dict[str, str], out: BinaryIO, progress: Progress | None) -> int:
        out.seek(0)  # a retry starts the file again
        out.truncate()
        hasher = hashlib.sha256()
        size = 0
        with self._http.stream("GET", url, params=params) as response:
            self._check(response, "GET", url)
            sha = response.headers.get("etag", "").strip('"')
            for chunk in response.iter_bytes(CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                size += len(chunk)
                if progress:
                    progress(len(chunk))
        if hasher.hexdigest() != sha:
            raise ClientError(
                f"GET {url}: the bytes received hash to {hasher.hexdigest()}, not {sha or '?'}", exit_code=NOT_FOUND
            )
        return size

    def _request(
        self, method: str, url: str, *, body: Callable[[], Iterator[bytes]] | None = None, **kwargs: object
    ) -> httpx.Response:
        """One request, retried; `body` makes the body anew for each attempt."""

        def attempt() -> httpx.Response:
            content = body() if body is not None else None
            response = self._http.request(method, url, content=content, **kwargs)  # type: ignore[arg-type]
            self._check(response, method, url)
            return response

        return self._retried(method, url, attempt)

    def _retried(self, method: str, url: str, call: Callable[[], T]) -> T:
        try:
            for attempt in stamina.retry_context(
                on=(httpx.TransportError, _ServerError),
                attempts=self.retries + 1,
                timeout=None,
                wait_initial=self.backoff,
                wait_max=10.0,
            ):
                with attempt:
                    return call()
        except httpx.TransportError as exc:
            tries = f" (after {self.retries + 1} tries)" if self.retries else ""
            raise ClientError(f"{method} {self._http.base_url}{url}: {exc or type(exc).__name__}{tries}") from None
        except _ServerError as exc:
            tries = f" (after {self.retries + 1} tries)" if self.retries else ""
            status = exc.response.status_code
            raise ClientError(f"{method} {url}: {status} {_detail(exc.response)}{tries}", status) from None
        raise AssertionError("unreachable")  # stamina either returns or raises

    def _check(self, response: httpx.Response, method: str, url: str) -> None:
        if response.status_code < 300:
            return
        if not response.is_stream_consumed:
            response.read()
        if response.status_code >= 500:
            raise _ServerError(response)
        if response.status_code == 404:
            raise ClientError(f"{method} {url}: 404 not found", 404)
        raise ClientError(f"{method} {url}: {response.status_code} {_detail(response)}", response.status_code)


def _detail(response: httpx.Response) -> str:
    """The first line of an error answer's body (stor's explanation), else the reason phrase."""
    text = response.text.strip()
    return text.splitlines()[0] if text else response.reason_phrase


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise ClientError(f"{path}: no such file", exit_code=NOT_FOUND) from None
