"""Domain errors. They carry no HTTP: `stor.http.errors` maps them to status codes in one table."""

from __future__ import annotations

import time


class StorError(Exception):
    """Base of every error stor raises on purpose."""


class ConfigError(StorError):
    """The configuration is invalid; the message names the key and the value."""


class BadRequest(StorError):
    """The request is malformed (a header, a parameter)."""


class InvalidDigest(BadRequest):
    def __init__(self, text: str) -> None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        super().__init__(f"not a sha256 (64 hex characters): {shown!r}")
        self.text = text


class BlobNotFound(StorError):
    def __init__(self, sha: str) -> None:
        super().__init__(f"blob {sha} not found")
        self.sha = sha


class BlobGone(StorError):
    """An admin took the blob down: it is gone for good unless an admin restores it."""

    def __init__(self, sha: str, when: float, admin: str, reason: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
        super().__init__(f"blob {sha} was taken down at {stamp} by {admin}: {reason}")
        self.sha = sha
        self.when = when
        self.admin = admin
        self.reason = reason


class NameNotFound(StorError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no file named {name!r}")
        self.name = name


class NameExists(StorError):
    def __init__(self, name: str) -> None:
        super().__init__(f"a file named {name!r} exists already (PUT /file replaces it)")


class DigestMismatch(StorError):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"content sha256 {actual} does not match the requested {expected}")
        self.expected = expected
        self.actual = actual


class InsufficientStorage(StorError):
    """No writable pair has room for the blob, or a disk filled up while writing it."""


class StorageUnavailable(StorError):
    """A disk that was needed could not be read or written (I/O error, unmounted, hung)."""


class CorruptCopy(StorageUnavailable):
    """A copy failed verification (wrong hash, truncated); it is never served."""


class BlobLost(StorError):
    """Every copy that could be read failed verification and no good one exists anywhere."""


class Unauthorized(StorError):
    def __init__(self, what: str = "to write") -> None:
        super().__init__(f"valid Basic credentials are required {what}")


class PayloadTooLarge(StorError):
    def __init__(self, limit: int, *, mid_stream: bool, unit: str = "bytes") -> None:
        super().__init__(f"body exceeds the limit of {limit} {unit}")
        self.limit = limit
        self.mid_stream = mid_stream


class ClientTimeout(StorError):
    """The client stopped sending its body for longer than the idle timeout."""


class UploadTooSlow(ClientTimeout):
    """The body arrives slower than `min_upload_rate` (after its grace period)."""


class Overloaded(StorError):
    """This worker has as many uploads in flight as it takes (`max_uploads_in_flight`): the
    client should retry after `retry_after` seconds."""

    def __init__(self, limit: int, retry_after: int = 1) -> None:
        super().__init__(f"{limit} uploads in flight on this worker already; retry shortly")
        self.retry_after = retry_after


class ClientDisconnected(StorError):
    """The client went away before its body was complete."""


class TransferAborted(Exception):
    """Raised while a response streams, after its headers went out: there is no status left
    to send, so it is deliberately not a `StorError`. The server closes the connection and
    the client sees a broken transfer instead of a complete body."""
