"""HTTP Basic credentials, by role (DESIGN.md §1: writers, readers, admins, metrics readers).
The only module that imports `bcrypt` and `argon2`.

A configured password is either plain text, compared in constant time, or a bcrypt (`$2b$…`)
or argon2 (`$argon2id$…`) hash, as `stor hash-password` prints. Verifying a hash costs tens of
milliseconds of CPU on purpose, so:
- a credential verified once is remembered (as a keyed digest, never the password) and
  answered at memory speed afterwards; the hot path remembers whole Authorization headers the
  same way, so a request it has seen before costs one keyed hash and a dict look-up;
- verifications run in one thread of their own, off the event loop, one per distinct credential
  however many requests carry it at once: a flood of wrong passwords can take at most one core,
  and past `MAX_WAITING` distinct ones waiting, more are refused at once (401).
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
from collections.abc import Mapping
from typing import Final

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from stor.config import Config, Credential
from stor.errors import Unauthorized
from stor.threads import thread_pool

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


class Role:
    """The roles of DESIGN.md §1, and who may act in each."""

    WRITER = "writer"
    READER = "reader"
    ADMIN = "admin"
    METRICS = "metrics"


WRITERS = frozenset({Role.WRITER, Role.ADMIN})
"""Who may store blobs and named files: writers (`basic_auth`) and admins (whose upload of a
taken-down blob restores it)."""
READERS = frozenset({Role.READER, Role.WRITER, Role.ADMIN})
"""Who may read when `read_auth` is set: any credential of any role but metrics."""
ADMINS = frozenset({Role.ADMIN})
METRICS_READERS = frozenset({Role.METRICS, Role.ADMIN})

CONFIG_KEYS = {
    "basic_auth": Role.WRITER,
    "read_auth": Role.READER,
    "admin_auth": Role.ADMIN,
    "metrics_auth": Role.METRICS,
}
"""Which config key lists which role."""

_WHAT = {WRITERS: "to write", READERS: "to read", ADMINS: "of an admin", METRICS_READERS: "to read the metrics"}


class _Unknown:
    pass


UNKNOWN: Final = _Unknown()
"""`check_now` could not tell without verifying a slow hash."""

Principal = str
"""Who a request acts as: the user name of its credential."""


class Authenticator:
    def __init__(self, lists: Mapping[str, tuple[Credential, ...]]) -> None:
        """`lists`: the credentials of each role (see `lists_of`)."""
        self._key = secrets.token_bytes(32)
        self._verifier = thread_pool(1, "stor-auth")
        self._waiting = 0
        self._lock = threading.Lock()
        self.replace(lists)

    def replace(self, lists: Mapping[str, tuple[Credential, ...]]) -> None:
        """Accept these credentials from now on (a config reload); forget what was verified."""
        self._plain = [
            (f"{c.user}:{c.password}".encode(), role)
            for role, creds in lists.items()
            for c in creds
            if not is_hash(c.password)
        ]
        self._hashed = [
            (c.user, c.password, role) for role, creds in lists.items() for c in creds if is_hash(c.password)
        ]
        self._roles = frozenset(role for role, creds in lists.items() if creds)
        self._verified: OrderedDict[bytes, frozenset[str]] = OrderedDict()
        self._pending: dict[bytes, asyncio.Task[frozenset[str]]] = {}  # event-loop only
        self._headers: dict[bytes, frozenset[str]] = {}  # keyed digest of an Authorization header -> its roles

    def enabled(self, role: str = Role.WRITER) -> bool:
        """Whether any credential of `role` is configured."""
        return role in self._roles

    @property
    def reads_open(self) -> bool:
        """No `read_auth`: reads need no credential, as in Stor."""
        return Role.READER not in self._roles

    async def check(self, authorization: str | None, allowed: frozenset[str] = WRITERS) -> Principal:
        """The user of the Basic credentials in the header, if one of a role in `allowed`;
        else `Unauthorized`."""
        offered = _basic_payload(authorization)
        roles = self._plain_roles(offered)
        if not roles & allowed and any(role in allowed for *_, role in self._hashed):
            roles |= await self._hashed_roles(offered)
        if roles & allowed:
            return offered.partition(b":")[0].decode("utf-8", "replace")
        raise Unauthorized(_WHAT.get(allowed, "for this request"))

    async def check_read(self, authorization: str | None) -> None:
        """`check` for a read: nothing to check while reads are open."""
        if not self.reads_open:
            await self.check(authorization, READERS)

    def check_now(self, authorization: str | None, allowed: frozenset[str]) -> bool | _Unknown:
        """`check` without waiting (for the event loop): True or False, or `UNKNOWN` when a slow
        hash would have to be verified first."""
        if authorization is None:
            return False
        header = hashlib.blake2b(authorization.encode("latin-1", "replace"), key=self._key, digest_size=16).digest()
        known = self._headers.get(header)  # the header seen before: a dict look-up, no decoding
        if known is not None:
            return bool(known & allowed)
        offered = _basic_payload(authorization)
        known = self._plain_roles(offered)
        complete = not self._hashed  # every role the header carries is known
        if self._hashed:
            with self._lock:
                hashed = self._verified.get(hmac.new(self._key, offered, hashlib.sha256).digest())
            if hashed is not None:
                known, complete = known | hashed, True
            elif not known & allowed and any(role in allowed for *_, role in self._hashed):
                return UNKNOWN
        if known and complete:
            if len(self._headers) >= REMEMBERED:
                self._headers.clear()
            self._headers[header] = known
        return bool(known & allowed)

    def _plain_roles(self, offered: bytes) -> frozenset[str]:
        roles = set()
        for accepted, role in self._plain:  # no early exit: the time does not tell which matched
            if hmac.compare_digest(offered, accepted):
                roles.add(role)
        return frozenset(roles)

    async def _hashed_roles(self, offered: bytes) -> frozenset[str]:
        user, colon, password = offered.partition(b":")
        candidates = [(hashed, role) for name, hashed, role in self._hashed if name.encode() == user]
        if not colon or not candidates:
            return frozenset()
        digest = hmac.new(self._key, offered, hashlib.sha256).digest()
        with self._lock:
            known = self._verified.get(digest)
            if known is not None:
                self._verified.move_to_end(digest)
                return known
        task = self._pending.get(digest)  # one verification per distinct credential, however many ask
        if task is None:
            with self._lock:
                if self._waiting >= MAX_WAITING:
                    return frozenset()  # a flood: refused without spending CPU on it
                self._waiting += 1
            text = password.decode("utf-8", "replace")
            task = asyncio.get_running_loop().create_task(self._verify(offered, digest, candidates, text))
            self._pending[digest] = task
        return await asyncio.shield(task)  # a request that goes away leaves the verification to the others

    async def _verify(
        self, offered: bytes, digest: bytes, candidates: list[tuple[str, str]], text: str
    ) -> frozenset[str]:
        verified, pending = self._verified, self._pending  # a reload meanwhile replaces both
        try:
            roles = await asyncio.get_running_loop().run_in_executor(self._verifier, _roles_verified, candidates, text)
        finally:
            with self._lock:
                self._waiting -= 1
            pending.pop(digest, None)
        with self._lock:
            stale = verified is not self._verified
            if not stale and roles:  # a wrong password is not remembered: each costs a verification (bounded above)
                verified[digest] = roles
                if len(verified) > REMEMBERED:
                    verified.popitem(last=False)
        if stale:  # the credentials changed while this one was verified: judge it by the new ones
            return await self._hashed_roles(offered)
        return roles

    def close(self) -> None:
        self._verifier.shutdown(wait=False, cancel_futures=True)


def lists_of(config: Config) -> dict[str, tuple[Credential, ...]]:
    """The credential lists of `config`, by role."""
    return {role: getattr(config, key) for key, role in CONFIG_KEYS.items()}


def _roles_verified(candidates: list[tuple[str, str]], password: str) -> frozenset[str]:
    return frozenset(role for hashed, role in candidates if _verify(hashed, password))


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
