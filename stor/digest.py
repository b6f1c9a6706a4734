"""The blob name: a validated SHA-256, its streaming hash and Stor's on-disk layout."""

from __future__ import annotations

import base64
import hashlib
import re
from typing import TYPE_CHECKING, NewType, TypeAlias

from stor.errors import InvalidDigest

Sha = NewType("Sha", str)
"""64 lowercase hex characters. Only `parse_sha` makes one, so every path built from it is safe."""

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def parse_sha(text: str) -> Sha:
    """Validate `text` as a SHA-256 in hex (any case) and return it lowercased."""
    # fullmatch with an explicit ASCII class: `str.isalnum`/`\d` would admit unicode digits.
    if not _HEX64.fullmatch(text):
        raise InvalidDigest(text)
    return Sha(text.lower())


def sha_of(data: bytes) -> Sha:
    return Sha(hashlib.sha256(data).hexdigest())


if TYPE_CHECKING:
    Hasher: TypeAlias = hashlib._Hash  # a running sha256 (several threads may feed it in turn)
else:
    Hasher = type(hashlib.sha256())


def new_hasher() -> Hasher:
    return hashlib.sha256()


def blob_relpath(sha: Sha) -> str:
    """Stor's layout, relative to a storage root: `AB/CD/EF/<SHA IN UPPERCASE>.dat`."""
    upper = sha.upper()
    return f"{upper[0:2]}/{upper[2:4]}/{upper[4:6]}/{upper}.dat"


def repr_digest(sha: Sha) -> str:
    """The RFC 9530 `Repr-Digest` value for a blob named `sha`."""
    return "sha-256=:" + base64.b64encode(bytes.fromhex(sha)).decode("ascii") + ":"


def sha_from_filename(name: str) -> Sha | None:
    """The sha a layout file name stands for (`<SHA>.dat`), or None for anything else."""
    if not name.endswith(".dat") or len(name) != 68:
        return None
    stem = name[:-4]
    if stem != stem.upper():
        return None
    try:
        return parse_sha(stem)
    except InvalidDigest:
        return None
