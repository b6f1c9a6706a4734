"""The one table of domain errors → status codes is total: a bug's error is a 500 and a log line."""

from __future__ import annotations

import logging

import pytest

from stor.errors import (
    BadRequest,
    BlobGone,
    BlobNotFound,
    ConfigError,
    CorruptCopy,
    NameNotFound,
    StorageUnavailable,
    StorError,
    Unauthorized,
)
from stor.http.errors import error_answer, error_response, status_of
from stor.http.io import in_full


def test_every_error_gets_its_nearest_status() -> None:
    assert status_of(BlobNotFound("x")) == 404
    assert status_of(NameNotFound("a/b")) == 404
    assert status_of(CorruptCopy("bad")) == 503  # a StorageUnavailable
    assert status_of(ConfigError("no key")) is None


def test_an_error_missing_from_the_table_is_a_500_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="stor.http.errors"):
        response = error_response(ConfigError("a bug"), "GET", "/x", {})
    assert response.status_code == 500 and bytes(response.body) == b"internal error\n"
    [record] = caplog.records
    assert "ConfigError" in record.getMessage() and record.exc_info is not None


def test_a_known_5xx_is_a_warning_and_a_4xx_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="stor.http.errors"):
        assert error_response(BlobNotFound("x"), "GET", "/x", {}).status_code == 404
        assert error_response(Unauthorized(), "POST", "/x", {}).headers["www-authenticate"] == 'Basic realm="stor"'
        assert caplog.records == []
        assert error_response(CorruptCopy("bad copy"), "GET", "/x", {}).status_code == 503
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "bad copy" in record.getMessage()


@pytest.mark.parametrize(
    "exc",
    [
        BlobNotFound("ab" * 32),
        BlobGone("ab" * 32, 0.0, "admin", "legal request"),
        NameNotFound("a/b"),
        BadRequest("odd"),
    ],
)
def test_the_hot_paths_error_answer_is_the_responses_own(exc: StorError) -> None:
    """The event loop's answer to a client error, built without a Response, is byte for byte
    what the Response gives (status, headers, body)."""
    assert error_answer(exc) == in_full(error_response(exc, "GET", "/x", {}))


@pytest.mark.parametrize("exc", [Unauthorized("who?"), StorageUnavailable("down"), ConfigError("a bug")])
def test_errors_with_headers_or_logs_have_no_hot_answer(exc: StorError) -> None:
    assert error_answer(exc) is None  # (a 401's WWW-Authenticate, a 5xx's log line: the Response's)
