"""A client for stor's HTTP API (httpx, blocking, thread-safe): what `stor put/get/head` are
built on, and a Python API of its own (see docs/client.md).

Connection failures and 5xx answers are retried with exponential backoff and jitter
(`stamina`), `retries` times. Every failure is a `ClientError`: one line naming the request
and, where there was one, the HTTP status, with the exit code the command line uses for it
(1 not found or content mismatch, 2 usage or credentials, 3 unreachable or still failing).
Downloads are verified against the sha asked for (by name: against the `ETag` or `Repr-Digest`)
before a byte reaches the target: written atomically to a file, or buffered in a temp file and
then copied to a stream.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit

import httpx
import stamina

from stor import __version__
from stor.client.errors import NOT_FOUND, UNREACHABLE, USAGE, ClientError
from stor.client.files import CHUNK, Progress, create_beside, file_size, read_file, write_all, writing
from stor.digest import Sha, parse_sha
from stor.errors import InvalidDigest

STAT_BATCH = 10_000
T = TypeVar("T")

CREDENTIALS_HINT = "pass credentials=(USER, PASSWORD) to StorClient"
"""What a 401 to a client without credentials tells its caller to do (`stor` says which option)."""


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


def check_url(url: str) -> str:
    """`url` if it is an http:// or https:// URL with a host; a `ClientError` (usage) saying
    what to add otherwise (`127.0.0.1:8321` would be read as scheme `127.0.0.1`, or a path)."""
    parts = urlsplit(url)
    if "://" not in url:
        raise ClientError(f"{url!r} has no scheme: add http:// (or https://), as in http://{url}", exit_code=USAGE)
    if parts.scheme.lower() not in ("http", "https"):
        raise ClientError(f"{url!r}: the scheme must be http:// or https://", exit_code=USAGE)
    if not parts.hostname:
        raise ClientError(f"{url!r} has no host", exit_code=USAGE)
    return url


def check_sha(text: str) -> Sha:
    """`text` as a sha (lowercased); a `ClientError` (usage) if it is not 64 hex characters."""
    try:
        return parse_sha(text)
    except InvalidDigest as exc:
        raise ClientError(str(exc), exit_code=USAGE) from None


def parse_credentials(text: str) -> tuple[str, str]:
    """`user:password` (the password may hold colons), as curl's `-u`."""
    user, colon, password = text.partition(":")
    if not user or not colon:
        raise ClientError("credentials must be USER:PASSWORD", exit_code=USAGE)
    return user, password


class StorClient:
    def __init__(
        self,
        url: str,
        credentials: tuple[str, str] | None = None,
        *,
        retries: int = 3,
        timeout: float = 60.0,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
        credentials_hint: str = CREDENTIALS_HINT,
    ) -> None:
        """`url`: http:// or https:// (else `ClientError`, usage). `transport`: given to
        `httpx.Client` (an `httpx.MockTransport` in tests). `credentials_hint`: how the caller
        supplies credentials, said when the server answers 401 to a client without any."""
        self.retries = retries
        self.backoff = backoff
        self.credentials_hint = credentials_hint
        self._user = credentials[0] if credentials else None
        self._http = httpx.Client(
            base_url=check_url(url).rstrip("/"),
            auth=credentials,
            timeout=httpx.Timeout(timeout, connect=10.0),
            headers={"User-Agent": f"stor-client/{__version__}"},
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> StorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stat(self, shas: Sequence[str]) -> dict[Sha, dict[str, object] | None]:
        """Which of `shas` the server has (batches of 10,000), keyed by the lowercase sha."""
        asked = [check_sha(sha) for sha in shas]
        answers: dict[Sha, dict[str, object] | None] = {}
        for start in range(0, len(asked), STAT_BATCH):
            response = self._request("POST", "/stat", json=asked[start : start + STAT_BATCH])
            answers.update(response.json())
        return answers

    def put(self, sha: str, path: Path, progress: Progress | None = None) -> bool:
        """Upload the file as `sha`; True if stored now, False if the server had it."""
        sha = check_sha(sha)
        size = str(file_size(path))
        response = self._request(
            "POST", f"/{sha}", body=lambda: read_file(path, progress), headers={"Content-Length": size}
        )
        return response.status_code == 201

    def put_named(self, name: str, path: Path, progress: Progress | None = None) -> Sha:
        """Store the file under the name `name` (created or replaced); returns its sha."""
        size = str(file_size(path))
        response = self._request(
            "PUT",
            "/file",
            params={"path": name},
            body=lambda: read_file(path, progress),
            headers={"Content-Length": size},
        )
        return Sha(str(response.json()["sha"]))

    def take_down(self, sha: str, reason: str) -> dict[str, object]:
        """Take `sha` down for good (admin credentials); what the server removed."""
        sha = check_sha(sha)
        response = self._request("DELETE", f"/{sha}", headers={"X-Stor-Reason": reason})
        answer: dict[str, object] = response.json()
        return answer

    def head(self, sha: str) -> HeadInfo:
        sha = check_sha(sha)
        url = f"/{sha}"
        response = self._request("HEAD", url)
        return HeadInfo(sha, _length(response, "HEAD", url), response.headers.get("last-modified", ""))

    def head_named(self, name: str) -> HeadInfo:
        response = self._request("HEAD", "/file", params={"path": name})
        sha = _announced_sha(response) or Sha("")
        return HeadInfo(sha, _length(response, "HEAD", "/file"), response.headers.get("last-modified", ""))

    def get(self, sha: str, target: Path | BinaryIO, progress: Progress | None = None) -> int:
        """Download the blob, checked against `sha` itself (whatever headers the server or a
        proxy sends or drops). A path is written atomically (a temp file beside it, renamed
        once the hash matches; mode 0666 less the umask, as `curl -o`); a binary stream gets
        the bytes once verified (buffered in a temp file meanwhile). Returns the size."""
        sha = check_sha(sha)
        return self._save(f"/{sha}", {}, sha, target, progress)

    def get_named(self, name: str, target: Path | BinaryIO, progress: Progress | None = None) -> int:
        """Download the file named `name`, as `get`, verified against the sha the server
        announces in its `ETag` (else its `Repr-Digest`). An answer with neither cannot be
        verified: `ClientError` (exit code 1), nothing written."""
        return self._save("/file", {"path": name}, None, target, progress)

    def _save(
        self, url: str, params: dict[str, str], sha: Sha | None, target: Path | BinaryIO, progress: Progress | None
    ) -> int:
        if not isinstance(target, (str, os.PathLike)):
            return self._stream_to(url, params, sha, target, progress)
        target = Path(target)
        fd, temp = create_beside(target)
        try:
            with os.fdopen(fd, "wb") as out:
                size = self._retried("GET", url, lambda: self._download(url, params, sha, out, str(target), progress))
                with writing(str(target)):
                    out.flush()
                    os.fsync(out.fileno())
            with writing(str(target)):
                os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return size

    def _stream_to(
        self, url: str, params: dict[str, str], sha: Sha | None, target: BinaryIO, progress: Progress | None
    ) -> int:
        """Verify in a temp file first (memory stays bounded), then copy to `target`."""
        shown = f"{tempfile.gettempdir()} (the download is buffered there)"
        with tempfile.TemporaryFile(prefix=".stor-get.", suffix=".part") as buffer:
            size = self._retried("GET", url, lambda: self._download(url, params, sha, buffer, shown, progress))
            buffer.seek(0)
            with writing(str(getattr(target, "name", "the output"))):
                while chunk := buffer.read(CHUNK):
                    write_all(target, chunk)
                target.flush()
        return size

    def _download(
        self, url: str, params: dict[str, str], sha: Sha | None, out: BinaryIO, shown: str, progress: Progress | None
    ) -> int:
        """GET into `out` (`shown` in messages) and check the bytes against `sha` (None: the
        sha the answer announces)."""
        with writing(shown):
            out.seek(0)  # a retry starts the file again
            out.truncate()
        hasher = hashlib.sha256()
        size = 0
        with self._http.stream("GET", url, params=params) as response:
            self._check(response, "GET", url)
            expected = sha or _announced_sha(response)
            if expected is None:
                raise ClientError(
                    f"GET {url}: the answer has no ETag or Repr-Digest to check the bytes against; nothing written",
                    exit_code=NOT_FOUND,
                )
            for chunk in response.iter_bytes(CHUNK):
                with writing(shown):
                    out.write(chunk)
                hasher.update(chunk)
                size += len(chunk)
                if progress:
                    progress(len(chunk))
        if hasher.hexdigest() != expected:
            raise ClientError(
                f"GET {url}: the bytes received hash to {hasher.hexdigest()}, not {expected}; nothing written",
                exit_code=NOT_FOUND,
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
        if response.status_code == 401:
            if self._user is None:
                raise ClientError(f"{method} {url}: 401 {_detail(response)}: {self.credentials_hint}", 401)
            raise ClientError(f"{method} {url}: 401 the server refused the credentials of user {self._user!r}", 401)
        raise ClientError(f"{method} {url}: {response.status_code} {_detail(response)}", response.status_code)


def _detail(response: httpx.Response) -> str:
    """The first line of an error answer's body (stor's explanation), else the reason phrase."""
    text = response.text.strip()
    return text.splitlines()[0] if text else response.reason_phrase


def _announced_sha(response: httpx.Response) -> Sha | None:
    """The sha an answer names in its `ETag` (stor's is the quoted sha) or, failing that, in
    its `Repr-Digest` (`sha-256=:<base64>:`); None when it names none (a Stor-era server, or a
    proxy that drops or rewrites them)."""
    etag = response.headers.get("etag", "").strip().removeprefix("W/").strip('"')
    with contextlib.suppress(InvalidDigest):
        return parse_sha(etag)
    for member in response.headers.get("repr-digest", "").split(","):
        algorithm, _, value = member.strip().partition("=")
        if algorithm.strip().lower() == "sha-256" and value.startswith(":") and value.endswith(":"):
            try:
                digest = base64.b64decode(value[1:-1], validate=True)
            except (binascii.Error, ValueError):
                return None
            return Sha(digest.hex()) if len(digest) == 32 else None
    return None


def _length(response: httpx.Response, method: str, url: str) -> int:
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        raise ClientError(f"{method} {url}: the answer has no valid Content-Length", exit_code=UNREACHABLE) from None
