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

from stor.digest import Sha
from stor.errors import BadRequest, BlobNotFound, PayloadTooLarge
from stor.http.auth import Authenticator
from stor.http.io import BodyLimits, content_length, request_body, sha_list
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
            raise _too_many(self.settings.max_blobs, len(shas))
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


def _too_many(limit: int, count: int) -> BadRequest:
    return BadRequest(f"at most {limit} shas per archive (archive_max_blobs), got {count}")


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
        limit = archives.settings.max_blobs
        return await archives.many(sha_list(raw, limit, lambda count: _too_many(limit, count)))

    return [Route("/archive", archive, methods=["POST"], name="archive")]
