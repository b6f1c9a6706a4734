"""The shared vocabulary: plain records that every layer may import, and that import nothing
of stor but `digest` and `checksum`. Backends fill them in, the service composes them, the HTTP layer shows
them; none of them does I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from stor import __version__
from stor.checksum import FastSum
from stor.digest import Sha


@dataclass(frozen=True)
class BlobStat:
    """One copy of a blob (or its S3 object, `s3://bucket/sha`): where it is, size, mtime."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class HashedCopy:
    """A copy read whole: its SHA-256, its stat (the size is what was read), its fast checksum
    as computed and as recorded on it (None: it has none)."""

    sha: Sha
    stat: BlobStat
    fast: FastSum
    recorded: FastSum | None
    data: bytes | None = None
    """The bytes themselves, when the caller asked to keep copies this small (`Disk.hash_copy`)."""


@dataclass(frozen=True)
class DiskHealth:
    path: str
    ok: bool
    mounted: bool
    writable: bool
    free_bytes: int
    total_bytes: int
    error: str | None
    io_errors: int = 0  # failed operations since start-up
    readable: bool = False  # present, mounted and answering, even if not writable (read-only, full)


@dataclass
class CommitStats:
    """One filesystem's group commits: cycles run, copies through them, the most in one."""

    cycles: int = 0
    copies: int = 0
    largest: int = 0


@dataclass(frozen=True)
class PutResult:
    """An upload's outcome: whether this upload created the blob, and the paths of its copies."""

    created: bool
    paths: list[str]


@dataclass(frozen=True)
class BlobInfo:
    """A batch existence answer: size, copies on disk, and whether S3 has it (None: not asked)."""

    size: int
    copies: int
    s3: bool | None


@dataclass(frozen=True)
class PairState:
    index: int
    members: list[str]
    writable: bool  # from writable_pairs_regex
    state: str  # "healthy", "degraded" (a member down, another readable) or "down" (none readable)
    takes_writes: bool = False  # writable, and every member healthy


@dataclass(frozen=True)
class StatusReport:
    ok: bool
    reasons: list[str]
    disks: list[DiskHealth]
    pairs: list[PairState]
    memcached: dict[str, object]
    s3: dict[str, object]
    scrub: list[dict[str, object]]
    ready: bool = True  # every pair has a readable member (`/readyz`)
    ready_reasons: list[str] = field(default_factory=list)
    writable: bool = True  # some pair takes writes (`/readyz?writes=1` asks for it too)
    events: dict[str, object] = field(default_factory=dict)  # the lifecycle events' outbox and broker
    rabbitmq: dict[str, object] = field(default_factory=dict)  # Stor's requested-sha hints
    uploads: dict[str, object] = field(default_factory=dict)  # in flight, promised bytes, refused for load
    version: str = __version__
    uptime: float = 0.0
    reserved_bytes: dict[int, int] = field(default_factory=dict)
    group_commit: dict[str, CommitStats] = field(default_factory=dict)
    scrub_running: list[dict[str, object]] = field(default_factory=list)  # progress and time left
