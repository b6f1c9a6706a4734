from __future__ import annotations

import pytest

from stor.http.semantics import (
    ByteRange,
    RangeNotSatisfiable,
    http_date,
    not_modified,
    parse_range,
    range_applies,
)

ETAG = '"abc"'
MTIME = 1_700_000_000 * 1_000_000_000


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, ByteRange(0, 1)),
        ("bytes=2-5", 10, ByteRange(2, 6)),
        ("bytes=2-", 10, ByteRange(2, 10)),
        ("bytes=5-100", 10, ByteRange(5, 10)),
        ("bytes=-3", 10, ByteRange(7, 10)),
        ("bytes=-30", 10, ByteRange(0, 10)),
        # malformed or unsupported: ignored, the whole blob is served
        ("bytes=abc", 10, None),
        ("items=0-1", 10, None),
        ("bytes=5-2", 10, None),
        ("bytes=-", 10, None),
        ("bytes=0-1,3-4", 10, None),
        ("", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10), ("bytes=0-", 0)]
)
def test_unsatisfiable_range(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


def test_content_range() -> None:
    assert ByteRange(2, 6).content_range(10) == "bytes 2-5/10"


def test_if_none_match() -> None:
    assert not_modified('"abc"', None, ETAG, MTIME)
    assert not_modified('W/"abc"', None, ETAG, MTIME)
    assert not_modified('"x", "abc"', None, ETAG, MTIME)
    assert not_modified("*", None, ETAG, MTIME)
    assert not not_modified('"x"', None, ETAG, MTIME)


def test_if_none_match_wins_over_if_modified_since() -> None:
    assert not not_modified('"x"', http_date(MTIME), ETAG, MTIME)


def test_if_modified_since() -> None:
    assert not_modified(None, http_date(MTIME), ETAG, MTIME)
    assert not_modified(None, http_date(MTIME + 10**9), ETAG, MTIME)
    assert not not_modified(None, http_date(MTIME - 10**9), ETAG, MTIME)
    assert not not_modified(None, "not a date", ETAG, MTIME)


def test_if_range() -> None:
    assert range_applies(None, ETAG, MTIME)
    assert range_applies(ETAG, ETAG, MTIME)
    assert not range_applies('"other"', ETAG, MTIME)
    assert not range_applies('W/"abc"', ETAG, MTIME)  # If-Range needs a strong match
    assert range_applies(http_date(MTIME), ETAG, MTIME)
    assert not range_applies(http_date(MTIME - 10**9), ETAG, MTIME)
