"""Pure HTTP helpers for immutable blobs: Range (RFC 9110 §14) and conditional requests (§13)."""

from __future__ import annotations

import email.utils
import functools
import re
from dataclasses import dataclass

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # exclusive

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{size}"


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range asked for, or None to serve the whole blob.

    A malformed header, or one with several ranges, is ignored (RFC 9110 allows it) and the
    whole blob is served with 200. A well-formed range that starts past the end raises
    `RangeNotSatisfiable` (416).
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable
        return ByteRange(max(0, size - length), size)
    start = int(first)
    end = size if not last else int(last) + 1
    if last and int(last) < start:
        return None  # invalid: ignore
    if start >= size:
        raise RangeNotSatisfiable
    return ByteRange(start, min(end, size))


def http_date(mtime_ns: int) -> str:
    return _http_date(mtime_ns // 1_000_000_000)


@functools.lru_cache(maxsize=65536)
def _http_date(seconds: int) -> str:
    return email.utils.formatdate(seconds, usegmt=True)


def _etag_matches(header: str, etag: str) -> bool:
    """Weak comparison, as If-None-Match requires."""
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


def not_modified(if_none_match: str | None, if_modified_since: str | None, etag: str, mtime_ns: int) -> bool:
    """Whether a GET/HEAD can be answered 304. If-None-Match wins over If-Modified-Since."""
    if if_none_match is not None:
        return _etag_matches(if_none_match, etag)
    if if_modified_since:
        try:
            since = email.utils.parsedate_to_datetime(if_modified_since)
        except (TypeError, ValueError):
            return False
        if since.tzinfo is None:
            return False
        return mtime_ns // 1_000_000_000 <= int(since.timestamp())
    return False


def range_applies(if_range: str | None, etag: str, mtime_ns: int) -> bool:
    """If-Range: honour Range only when the validator still matches (strong comparison)."""
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith('"') or value.startswith("W/"):
        return value == etag
    return value == http_date(mtime_ns)
