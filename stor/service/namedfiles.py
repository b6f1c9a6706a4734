"""The path-named API (sfss) on top of the blob store: a name points at a sha, the bytes are
an ordinary blob (verified, mirrored, deduplicated). Replacing a name leaves its old blob:
blobs are immutable and may be shared by other names."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from stor.backends.namerecord import NameRecord
from stor.backends.namestore import NameConflict, NameStore
from stor.errors import BadRequest, NameExists, NameNotFound
from stor.service import BlobService

MAX_NAME_BYTES = 1024


def check_name(name: str | None) -> str:
    """A valid name, or `BadRequest` saying what is wrong with it."""
    if not name:
        raise BadRequest("the 'path' parameter is required and must not be empty")
    if "\x00" in name:
        raise BadRequest("a path must not contain NUL")
    if name.startswith("/"):
        raise BadRequest("a path must not start with '/'")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise BadRequest(f"a path must be at most {MAX_NAME_BYTES} bytes of UTF-8")
    if any(segment in (".", "..") for segment in name.split("/")):
        raise BadRequest("a path must not contain '.' or '..' segments")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("a path must be valid UTF-8") from None
    return name


class NamedFiles:
    """Names on the blob service. The records live on the records' home pair (see `NameStore`)."""

    def __init__(self, blobs: BlobService) -> None:
        self.blobs = blobs
        self.store = NameStore(blobs.record_places)

    def prepare(self) -> None:
        """Blocking, at start-up: the record directories on the home pair."""
        self.store.prepare()

    async def write(self, name: str, body: AsyncIterator[bytes], length: int | None, *, create: bool) -> bool:
        """Store the body under `name`; True if the name is new. With `create`, an existing
        name is `NameExists` (checked before and after the bytes are stored)."""
        store = self.store
        if create and await self.blobs.in_thread(store.get, name) is not None:
            raise NameExists(name)
        sha, size, _ = await self.blobs.put_content(body, length)
        record = NameRecord(name, sha, size, time.time())
        try:
            previous = await self.blobs.in_thread(lambda: store.put(record, create_only=create))
        except NameConflict:
            raise NameExists(name) from None
        await self.blobs.in_thread(self.blobs.record_event, "name.put", sha=sha, size=size, name=name)
        return previous is None

    async def get(self, name: str) -> NameRecord:
        record = await self.blobs.in_thread(self.store.get, name)
        if record is None:
            raise NameNotFound(name)
        return record

    async def delete(self, name: str) -> None:
        if not await self.blobs.in_thread(self.store.delete, name):
            raise NameNotFound(name)
        await self.blobs.in_thread(self.blobs.record_event, "name.deleted", name=name)

    async def listing(self, prefix: str, after: str, limit: int) -> list[NameRecord]:
        return await self.blobs.in_thread(self.store.listing, prefix, after, limit)
