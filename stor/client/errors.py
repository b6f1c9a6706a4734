"""The client's one error type and the exit codes the command line gives each failure."""

from __future__ import annotations

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
