"""The one table of domain errors → HTTP status codes, and the response each one gets.

The table is total: an error missing from it (a bug) is a 500, logged with its traceback. A
known 5xx is logged once as a warning; a 4xx is the client's business and is not logged.
"""

from __future__ import annotations

import logging

from starlette.responses import PlainTextResponse, Response

from stor.errors import (
    BadRequest,
    BlobGone,
    BlobLost,
    BlobNotFound,
    ClientDisconnected,
    ClientTimeout,
    DigestMismatch,
    InsufficientStorage,
    NameExists,
    NameNotFound,
    Overloaded,
    PayloadTooLarge,
    StorageUnavailable,
    StorError,
    Unauthorized,
)

log = logging.getLogger(__name__)

ERROR_STATUS: dict[type[StorError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    BlobNotFound: 404,
    NameNotFound: 404,
    ClientTimeout: 408,
    NameExists: 409,
    BlobGone: 410,
    DigestMismatch: 412,
    PayloadTooLarge: 413,
    StorageUnavailable: 503,
    Overloaded: 503,
    BlobLost: 500,
    InsufficientStorage: 507,
    ClientDisconnected: 499,  # never reaches the client; keeps the access log honest
}


def status_of(exc: StorError) -> int | None:
    """The status for `exc` (its nearest class in the table), or None when it has none."""
    for kind in type(exc).__mro__:
        code = ERROR_STATUS.get(kind)
        if code is not None:
            return code
    return None


_PLAIN = b"text/plain; charset=utf-8"


def error_answer(exc: StorError) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    """`error_response` without a Response object, for a client error that needs no header of
    its own (a 404 or a 410 answered on the event loop); None for any other."""
    code = status_of(exc)
    if code is None or code >= 500 or isinstance(exc, Unauthorized):
        return None
    body = f"{exc}\n".encode()
    return code, [(b"content-length", str(len(body)).encode()), (b"content-type", _PLAIN)], body


def error_response(exc: StorError, method: str, path: str, headers: dict[str, str]) -> Response:
    """A domain error as a status and a one-line explanation."""
    code = status_of(exc)
    if code is None:
        log.error("%s %s: no status for %s", method, path, type(exc).__name__, exc_info=exc)
        return PlainTextResponse("internal error\n", status_code=500, headers=headers)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Basic realm="stor"'
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after)
        return PlainTextResponse(f"{exc}\n", status_code=code, headers=headers)  # load, not a fault: not logged
    if code >= 500:
        log.warning("%s %s: %d %s", method, path, code, exc)
    return PlainTextResponse(f"{exc}\n", status_code=code, headers=headers)
