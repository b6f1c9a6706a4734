"""A client for stor's HTTP API (httpx, blocking): what `stor put/get/head` are built on.

Every failure is a `ClientError` whose message is one line naming the request and, where
there was one, the HTTP status. Downloads are verified and written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from stor import __version__
from stor.digest import Sha

CHUNK = 1024 * 1024
Progress = Callable[[int], None]


class ClientError(Exception):
    """One clear line; `status` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HeadInfo:
    sha: Sha
    size: int
    last_modified: str


def _read(path: Path, progress: Progress | None) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            if progress:
                progress(len(chunk))
            yield chunk


def hash_file(path: Path, progress: Progress | None = None) -> Sha:
    """The sha256 of a file, streamed; raises `ClientError` when it cannot be read."""
    hasher = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                hasher.update(chunk)
                if progress:
                    progress(len(chunk))
    except OSError as exc:
        raise ClientError(f"{path}: cannot read: {exc.strerror}") from None
    return Sha(hasher.hexdigest())


class StorClient:
    def __init__(self, url: str, user: str | None = None, password: str | None = None, timeout: float = 60.0) -> None:
        auth = (user, password) if user and password is not None else None
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            auth=auth,
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
        for start in range(0, len(shas), 10_000):
            response = self._request("POST", "/stat", json=shas[start : start + 10_000])
            answers.update(response.json())
        return answers

    def put(self, sha: Sha, path: Path, progress: Progress | None = None) -> bool:
        """Upload the file as `sha`; True if stored now, False if the server had it."""
        size = str(path.stat().st_size)
        response = self._request("POST", f"/{sha}", content=_read(path, progress), headers={"Content-Length": size})
        return response.status_code == 201

    def put_named(self, name: str, path: Path, progress: Progress | None = None) -> Sha:
        """Store the file under the name `name` (created or replaced); returns its sha."""
        size = str(path.stat().st_size)
        response = self._request(
            "PUT", "/file", params={"path": name}, content=_read(path, progress), headers={"Content-Length": size}
        )
        return Sha(str(response.json()["sha"]))

    def head(self, sha: Sha) -> HeadInfo:
        response = self._request("HEAD", f"/{sha}")
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
            raise ClientError(f"{directory}: cannot write here: {exc.strerror}") from None
        try:
            size = self._download(url, params, fd, progress)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return size

    def _download(self, url: str, params: dict[str, str], fd: int, progress: Progress | None) -> int:
        hasher = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with self._http.stream("GET", url, params=params) as response:
                    self._check(response, "GET", url)
                    sha = response.headers.get("etag", "").strip('"')
                    for chunk in response.iter_bytes(CHUNK):
                        out.write(chunk)
                        hasher.update(chunk)
                        size += len(chunk)
                        if progress:
                            progress(len(chunk))
            except httpx.HTTPError as exc:
                raise ClientError(f"GET {url}: transfer failed: {exc}") from None
            out.flush()
            os.fsync(out.fileno())
        if hasher.hexdigest() != sha:
            raise ClientError(f"GET {url}: the bytes received hash to {hasher.hexdigest()}, not {sha or '?'}")
        return size

    def _request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise ClientError(f"{method} {self._http.base_url}{url}: {exc}") from None
        self._check(response, method, url)
        return response

    def _check(self, response: httpx.Response, method: str, url: str) -> None:
        if response.status_code < 300:
            return
        if response.status_code == 404:
            raise ClientError(f"{method} {url}: 404 not found", 404)
        if not response.is_stream_consumed:
            response.read()
        detail = response.text.strip().splitlines()[0] if response.text.strip() else response.reason_phrase
        raise ClientError(f"{method} {url}: {response.status_code} {detail}", response.status_code)
