"""Helpers shared by the tests: credentials, hashing, where files land on disk."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

USER, PASSWORD = "writer", "s3cret-pass"
AUTH = (USER, PASSWORD)
AUTH_HEADER = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def layout_path(root: Path, sha: str) -> Path:
    upper = sha.upper()
    return root / upper[0:2] / upper[2:4] / upper[4:6] / f"{upper}.dat"


def temp_files(root: Path) -> list[Path]:
    """Temp files under a storage root (the per-process lock files do not count)."""
    tmp = root / ".stor-tmp"
    if not tmp.exists():
        return []
    return [p for p in tmp.rglob("*") if p.is_file() and p.name != "owner.lock"]


def blob_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.dat") if ".stor-tmp" not in p.parts]
