from __future__ import annotations

import base64
import hashlib

import pytest

from stor.digest import blob_relpath, parse_sha, repr_digest, sha_from_filename, sha_of
from stor.errors import InvalidDigest

EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_parse_sha_lowercases_any_case() -> None:
    assert parse_sha(EMPTY.upper()) == EMPTY
    assert parse_sha(EMPTY) == EMPTY


@pytest.mark.parametrize(
    "text",
    [
        "",
        EMPTY[:-1],
        EMPTY + "0",
        EMPTY[:-1] + "g",
        EMPTY[:-1] + "\u0661",  # ARABIC-INDIC DIGIT ONE: a unicode digit, not hex
        "../" + EMPTY[3:],
        EMPTY[:-1] + "\x00",
        " " + EMPTY[1:],
        EMPTY + "\n",
    ],
)
def test_parse_sha_rejects(text: str) -> None:
    with pytest.raises(InvalidDigest, match="not a sha256"):
        parse_sha(text)


def test_layout_is_stors() -> None:
    sha = parse_sha("abcdef" + "0" * 58)
    assert blob_relpath(sha) == "AB/CD/EF/ABCDEF" + "0" * 58 + ".dat"


def test_repr_digest_is_rfc9530_base64_of_the_raw_digest() -> None:
    data = b"hello"
    expected = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert repr_digest(sha_of(data)) == f"sha-256=:{expected}:"


def test_sha_from_filename_only_accepts_layout_names() -> None:
    assert sha_from_filename(EMPTY.upper() + ".dat") == EMPTY
    assert sha_from_filename(EMPTY + ".dat") is None  # Stor writes uppercase
    assert sha_from_filename(EMPTY.upper()) is None
    assert sha_from_filename("X" * 64 + ".dat") is None
