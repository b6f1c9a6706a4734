"""Writers' passwords as bcrypt or argon2 hashes: verified off the event loop, remembered once
verified, and a flood of wrong ones bounded."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from typing import Any

import pytest

from stor.config import Credential
from stor.errors import Unauthorized
from stor.http import auth
from stor.http.auth import READERS, Authenticator, Role, hash_password
from tests.conftest import Storage, app_client
from tests.helpers import sha256

pytestmark = pytest.mark.anyio


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("scheme", ["argon2", "bcrypt"])
async def test_a_hashed_password_is_accepted_and_a_wrong_one_is_not(storage: Storage, scheme: str) -> None:
    hashed = hash_password("s3cret", scheme)
    assert hashed.startswith("$argon2id$" if scheme == "argon2" else "$2b$")
    async with app_client(storage.config(basic_auth=["plain:pw", f"hashed:{hashed}"])) as http:
        for user, password, status in [("hashed", "s3cret", 201), ("hashed", "wrong", 401), ("plain", "pw", 200)]:
            answer = await http.post(f"/{sha256(b'x')}", content=b"x", auth=(user, password))
            assert answer.status_code == status, (user, password)


@pytest.fixture
def verified(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords that go through a hash verification, in order."""
    calls: list[str] = []
    real = auth._verify

    def counted(hashed: str, password: str) -> bool:
        calls.append(password)
        return real(hashed, password)

    monkeypatch.setattr(auth, "_verify", counted)
    return calls


async def test_a_verified_credential_is_remembered(verified: list[str]) -> None:
    checker = Authenticator({Role.WRITER: (Credential("w", hash_password("right", "bcrypt")),)})
    try:
        for _ in range(5):
            await checker.check(basic("w", "right"))
        for _ in range(2):
            with pytest.raises(Unauthorized):
                await checker.check(basic("w", "wrong"))
        with pytest.raises(Unauthorized):
            await checker.check(basic("nobody", "right"))  # no hash to try: no CPU spent
    finally:
        checker.close()
    assert verified == ["right", "wrong", "wrong"]


async def test_a_flood_of_wrong_passwords_is_bounded(verified: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "MAX_WAITING", 4)  # each bcrypt verification takes a quarter second
    checker = Authenticator({Role.WRITER: (Credential("w", hash_password("right", "bcrypt")),)})

    async def attempt(n: int) -> Any:
        try:
            await checker.check(basic("w", f"guess-{n}"))
        except Unauthorized as exc:
            return exc
        return None

    try:
        outcomes = await asyncio.gather(*(attempt(n) for n in range(40)))
    finally:
        checker.close()
    assert all(isinstance(outcome, Unauthorized) for outcome in outcomes)
    assert len(verified) <= 4  # the rest were refused without hashing


async def test_many_requests_with_one_new_credential_verify_it_once(verified: list[str]) -> None:
    """64 connections arriving at once with the same credential (a client pool at start-up):
    one verification, not one each queued behind the others."""
    checker = Authenticator({Role.READER: (Credential("r", hash_password("right", "bcrypt")),)})
    try:
        users = await asyncio.gather(*(checker.check(basic("r", "right"), READERS) for _ in range(64)))
    finally:
        checker.close()
    assert users == ["r"] * 64
    assert verified == ["right"]


def test_stor_hash_password_prints_a_usable_hash() -> None:
    for args, prefix in [((), "$argon2id$"), (("--bcrypt",), "$2b$")]:
        result = subprocess.run(
            [sys.executable, "-m", "stor", "hash-password", *args], input="pw 1\n", capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        hashed = result.stdout.strip()
        assert hashed.startswith(prefix) and auth._verify(hashed, "pw 1") and not auth._verify(hashed, "pw 2")
    empty = subprocess.run([sys.executable, "-m", "stor", "hash-password"], input="\n", capture_output=True, text=True)
    assert empty.returncode == 2
