"""The S3 mirror: Stor's key layout in one bucket. The only module that imports boto3.

Contract:
- Keys are `ab/cd/ef/<sha>` (lowercase), as Stor.
- `head` and `open` return None when the object does not exist. Every other failure
  (unreachable, timeout, bad credentials, 5xx) raises `S3Unavailable`; vendor exceptions
  never escape this module.
- `put` is idempotent: an object already there is left alone. The local file is hashed first,
  so a corrupt local copy is never mirrored; the digest also goes along as `ChecksumSHA256`,
  which S3 itself verifies.
- Bytes read back are not trusted here: callers hash them (`S3Object.chunks`).
- Thread-safe (one boto3 client, created once); every call blocks.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from stor.config import S3Settings
from stor.digest import Sha

_MISSING = {"404", "NoSuchKey", "NotFound"}
CHUNK = 1024 * 1024


class S3Unavailable(Exception):
    """S3 could not answer; the message says why (no credentials in it)."""


@dataclass
class S3Object:
    size: int
    mtime_ns: int
    body: Any = None  # botocore StreamingBody for `open`

    def chunks(self) -> Iterator[bytes]:
        try:
            yield from self.body.iter_chunks(CHUNK)
        except (BotoCoreError, OSError) as exc:
            raise S3Unavailable(f"S3 read failed: {exc}") from exc

    def close(self) -> None:
        if self.body is not None:
            self.body.close()


def s3_key(sha: Sha) -> str:
    return f"{sha[0:2]}/{sha[2:4]}/{sha[4:6]}/{sha}"


class S3Store:
    def __init__(self, settings: S3Settings, *, bucket: str, region: str, timeout: float) -> None:
        self.bucket = bucket
        self.endpoint = settings.endpoint_url
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            region_name=region,
            config=BotoConfig(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"},  # MinIO, Ceph RGW and IPs need path style
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=32,
            ),
        )

    def head(self, sha: Sha) -> S3Object | None:
        meta = self._object_call("head", self._client.head_object, sha)
        return None if meta is None else S3Object(int(meta["ContentLength"]), _mtime_ns(meta))

    def open(self, sha: Sha) -> S3Object | None:
        reply = self._object_call("get", self._client.get_object, sha)
        return None if reply is None else S3Object(int(reply["ContentLength"]), _mtime_ns(reply), reply["Body"])

    def _object_call(self, operation: str, call: Any, sha: Sha) -> dict[str, Any] | None:
        """One call about the object of `sha`: its reply, None when it does not exist."""
        try:
            reply: dict[str, Any] = call(Bucket=self.bucket, Key=s3_key(sha))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise _unavailable(operation, exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(operation, exc) from exc
        return reply

    def put(self, sha: Sha, path: str) -> bool:
        """Mirror the local file at `path`; False when the object was already there.

        Raises `ValueError` when the local file does not hash to `sha` (nothing is uploaded).
        """
        if self.head(sha) is not None:
            return False
        digest = _file_sha256(path)
        if digest.hex() != sha:
            raise ValueError(f"local copy {path} does not hash to {sha}")
        try:
            with open(path, "rb") as body:
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=s3_key(sha),
                    Body=body,
                    ContentLength=os.fstat(body.fileno()).st_size,
                    ContentType="application/octet-stream",
                    ChecksumSHA256=base64.b64encode(digest).decode(),
                )
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable("put", exc) from exc
        return True

    def delete(self, sha: Sha) -> None:
        """Delete the object of `sha` (a takedown); nothing when there is none."""
        self._object_call("delete", self._client.delete_object, sha)

    def check(self) -> None:
        """Raise `S3Unavailable` unless the bucket answers."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable("head_bucket", exc) from exc


def _mtime_ns(reply: dict[str, Any]) -> int:
    return int(reply["LastModified"].timestamp()) * 1_000_000_000


def _file_sha256(path: str) -> bytes:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher.digest()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _unavailable(operation: str, exc: Exception) -> S3Unavailable:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return S3Unavailable(f"S3 {operation} failed: {error.get('Code', '?')} {error.get('Message', '')}".rstrip())
    return S3Unavailable(f"S3 {operation} failed: {exc}")
