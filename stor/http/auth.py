"""HTTP Basic credentials for writers. The only module that imports `bcrypt` and `argon2`.

A configured password is either plain text, compared in constant time, or a bcrypt (`$2b$…`)
or argon2 (`$argon2id$…`) hash, as `stor hash-password` prints. Verifying a hash costs tens of
milliseconds of CPU on purpose, so:
- a credential verified once is remembered (as a keyed digest, never the password) and
  answered at memory speed afterwards;
- verifications run in one thread of their own, off the event loop: a flood of wrong passwords
  can take at most one core, and past `MAX_WAITING` waiting, more are refused at once (401).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from stor.config import Credential
from stor.errors import Unauthorized

HASH_PREFIXES = ("$2a$", "$2b$", "$2y$", "$argon2")
MAX_WAITING = 64
"""Hash verifications that may wait for the verifying thread; more are refused at once."""
REMEMBERED = 1024
"""Verified credentials remembered (an LRU of keyed digests)."""

_ARGON2 = PasswordHasher()


def is_hash(password: str) -> bool:
    return password.startswith(HASH_PREFIXES)


def hash_password(password: str, scheme: str = "argon2") -> str:
    """A hash for `basic_auth` (`user:<hash>`): argon2id (the default) or bcrypt."""
    if scheme == "bcrypt":
        return bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    return _ARGON2.hash(password)


def _verify(hashed: str, password: str) -> bool:
    if hashed.startswith("$argon2"):
        try:
            return _ARGON2.verify(hashed, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
    try:
        return bcrypt.checkpw(password.encode(), hashed.encode())
    except ValueError:
        return False


class Authenticator:
    def __init__(self, credentials: tuple[Credential, ...]) -> None:
        self._key = secrets.token_bytes(32)
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="stor-auth")
        self._waiting = 0
        self._lock = threading.Lock()
        self.replace(credentials)

    def replace(self, credentials: tuple[Credential, ...]) -> None:
        """Accept these credentials from now on (a config reload); forget what was verified."""
        self._plain = [f"{c.user}:{c.password}".encode() for c in credentials if not is_hash(c.password)]
        self._hashed = {(c.user, c.password) for c in credentials if is_hash(c.password)}
        self._verified: OrderedDict[bytes, None] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self._plain or self._hashed)

    async def check(self, authorization: str | None) -> None:
        """Raise `Unauthorized` unless the header carries accepted Basic credentials."""
        offered = _basic_payload(authorization)
        matched = False
        for accepted in self._plain:  # no early exit: the time does not tell which matched
            matched |= hmac.compare_digest(offered, accepted)
        if matched or (self._hashed and await self._check_hashed(offered)):
            return
        raise Unauthorized()

    async def _check_hashed(self, offered: bytes) -> bool:
        user, colon, password = offered.partition(b":")
        candidates = [hashed for name, hashed in self._hashed if name.encode() == user]
        if not colon or not candidates:
            return False
        digest = hmac.new(self._key, offered, hashlib.sha256).digest()
        with self._lock:
            if digest in self._verified:
                self._verified.move_to_end(digest)
                return True
            if self._waiting >= MAX_WAITING:
                return False  # a flood: refused without spending CPU on it
            self._waiting += 1
        try:
            text = password.decode("utf-8", "replace")
            loop = asyncio.get_running_loop()
            verified = await loop.run_in_executor(self._verifier, _any_verifies, candidates, text)
        finally:
            with self._lock:
                self._waiting -= 1
        if verified:
            with self._lock:
                self._verified[digest] = None
                if len(self._verified) > REMEMBERED:
                    self._verified.popitem(last=False)
        return verified

    def close(self) -> None:
        self._verifier.shutdown(wait=False, cancel_futures=True)


def _any_verifies(hashes: list[str], password: str) -> bool:
    return any(_verify(hashed, password) for hashed in hashes)


def _basic_payload(authorization: str | None) -> bytes:
    if not authorization:
        return b""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return b""
    try:
        return base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""
