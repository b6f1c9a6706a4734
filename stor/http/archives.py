"""Archives for analysts: `GET /{sha}?format=zip` (one blob) and `POST /archive` (a JSON list
of shas: one zip of all of them and a `manifest.json` naming any that are absent or taken
down), each entry named by its sha and encrypted with `archive_password` (see `zipcrypto`).

Only verified bytes are zipped: each blob is opened as a GET opens it (a corrupt copy is
answered from its partner; one that fails while it streams breaks the transfer, never
completes it). Streamed: memory stays bounded whatever the sizes, no temp file; a client that
goes away closes every open copy at once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from stor.digest import Sha, parse_sha
from stor.errors import BadRequest, BlobNotFound, InvalidDigest, PayloadTooLarge
from stor.http.auth import Authenticator
from stor.http.io import BodyLimits, content_length, request_body
from stor.http.zipcrypto import MAX_ARCHIVE_BYTES, Entry, archive_bytes, zip_entries
from stor.model import BlobStat
from stor.service import BlobService

MAX_ARCHIVE_BODY = 2 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ArchiveSettings:
    password: bytes
    max_blobs: int


class Archives:
    def __init__(self, service: BlobService, settings: ArchiveSettings) -> None:
        self.service = service
        self.settings = settings

    async def one(self, sha: Sha, head: bool) -> Response:
        """`GET /{sha}?format=zip` (after the read's credentials passed)."""
        stat = await self.service.stat(sha)
        return self._response([(sha, stat)], None, f"{sha}.zip", head)

    async def many(self, shas: list[Sha]) -> Response:
        """`POST /archive`: the blobs there are, and a manifest of the rest."""
        if len(shas) > self.settings.max_blobs:
            raise BadRequest(f"at most {self.settings.max_blobs} shas per archive (archive_max_blobs), got {len(shas)}")
        gone = await self.service.taken_down(shas)
        found: list[tuple[Sha, BlobStat]] = []
        absent: list[Sha] = []
        for sha in shas:
            if sha in gone:
                continue
            try:
                found.append((sha, await self.service.stat(sha)))
            except BlobNotFound:
                absent.append(sha)
        manifest = {
            "files": [{"sha": sha, "size": stat.size} for sha, stat in found],
            "absent": absent,
            "taken_down": sorted(gone),
        }
        return self._response(found, json.dumps(manifest, indent=1).encode(), "archive.zip", False)

    def _response(
        self, blobs: list[tuple[Sha, BlobStat]], manifest: bytes | None, filename: str, head: bool
    ) -> Response:
        sizes: list[tuple[str, int]] = [(sha, stat.size) for sha, stat in blobs]
        if manifest is not None:
            sizes.append(("manifest.json", len(manifest)))
        length = archive_bytes(sizes)
        if length > MAX_ARCHIVE_BYTES:
            raise BadRequest(f"the archive would hold {length} bytes, more than a zip without Zip64 can: ask for fewer")
        headers = {
            "Content-Length": str(length),
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
        }
        if head:
            return Response(headers=headers, media_type="application/zip")
        body = zip_entries(self._entries(blobs, manifest), self.settings.password, self.service.in_thread)
        return StreamingResponse(body, headers=headers, media_type="application/zip")

    async def _entries(self, blobs: list[tuple[Sha, BlobStat]], manifest: bytes | None) -> AsyncIterator[Entry]:
        for sha, stat in blobs:
            blob = await self.service.open(sha)
            if blob.stat.size != stat.size:
                blob.close()
                raise BlobNotFound(sha)  # changed under us (cannot happen to a blob): end the transfer
            chunks = blob.chunks(0, blob.stat.size)
            try:
                yield sha, blob.stat.size, blob.stat.mtime_ns / 1e9, chunks
            finally:
                await chunks.aclose()
                blob.close()
        if manifest is not None:
            yield "manifest.json", len(manifest), 0.0, _one(manifest)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def archive_routes(
    service: BlobService, authenticator: Authenticator, archives: Archives, limits: BodyLimits
) -> list[Route]:
    async def archive(request: Request) -> Response:
        await authenticator.check_read(request.headers.get("authorization"))
        length = content_length(request)
        if length is not None and length > MAX_ARCHIVE_BODY:
            raise PayloadTooLarge(MAX_ARCHIVE_BODY, mid_stream=False)
        raw = b"".join([chunk async for chunk in request_body(request, MAX_ARCHIVE_BODY, limits.idle_timeout)])
        return await archives.many(sha_list(raw, archives.settings.max_blobs))

    return [Route("/archive", archive, methods=["POST"], name="archive")]


def sha_list(body: bytes, limit: int) -> list[Sha]:
    """A JSON array of shas: each validated (the error names the first bad one), duplicates
    answered once; `BadRequest` past `limit`."""
    try:
        entries = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the body must be a JSON array of sha256 strings") from None
    if not isinstance(entries, list):
        raise BadRequest("the body must be a JSON array of sha256 strings")
    if len(entries) > limit:
        raise BadRequest(f"at most {limit} shas per archive (archive_max_blobs), got {len(entries)}")
    shas: dict[Sha, None] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise BadRequest(f"entry {index} is not a string: {entry!r}"[:200])
        try:
            shas[parse_sha(entry)] = None
        except InvalidDigest as exc:
            raise BadRequest(f"entry {index}: {exc}") from None
    return list(shas)
