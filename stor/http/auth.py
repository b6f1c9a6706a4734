"""HTTP Basic credentials for writers, compared in constant time."""

from __future__ import annotations

import base64
import binascii
import hmac

from stor.config import Credential
from stor.errors import Unauthorized


class Authenticator:
    def __init__(self, credentials: tuple[Credential, ...]) -> None:
        self.replace(credentials)

    def replace(self, credentials: tuple[Credential, ...]) -> None:
        """Accept these credentials from now on (a config reload)."""
        self._accepted = [f"{c.user}:{c.password}".encode() for c in credentials]

    @property
    def enabled(self) -> bool:
        return bool(self._accepted)

    def check(self, authorization: str | None) -> None:
        """Raise `Unauthorized` unless the header carries accepted Basic credentials."""
        offered = _basic_payload(authorization)
        matched = False
        for accepted in self._accepted:  # no early exit: the time does not tell which matched
            matched |= hmac.compare_digest(offered, accepted)
        if not matched:
            raise Unauthorized()


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
