"""build_service(config) and build_app(config): the one place that names the concrete classes
and wires them together."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from stor.backends.disk import Disk
from stor.backends.groupcommit import GroupCommits
from stor.backends.locations import LocationCache, MemcachedLocations
from stor.backends.openfiles import OpenFiles, fd_budget
from stor.backends.outbox import Outbox
from stor.backends.pairs import Pair, StoragePool
from stor.backends.recordplaces import PoolPlaces
from stor.backends.s3 import S3Store
from stor.backends.s3queue import S3Queue
from stor.backends.tombstones import TombstoneStore, watch
from stor.config import (
    ENV_BASIC_AUTH,
    ENV_CONFIG_FILE,
    Config,
    check_storage_dirs,
    config_from_mapping,
    load_config,
)
from stor.errors import ConfigError
from stor.http.accounting import close_sink
from stor.http.app import create_app
from stor.http.archives import ArchiveSettings
from stor.http.auth import Authenticator, Role, lists_of
from stor.metrics import FanoutMetrics, Metrics, NullMetrics
from stor.metrics.prometheus import DiskGauge, PrometheusMetrics
from stor.metrics.statsd import StatsdMetrics
from stor.service import BlobService
from stor.service.admission import Admission
from stor.service.announce import Announcer, NoAnnouncer
from stor.service.events import EventLog, Events, NoEvents
from stor.service.health import HealthMonitor
from stor.service.hotpath import HotPath
from stor.service.integrity import Healer, Integrity
from stor.service.lookup import Lookup
from stor.service.namedfiles import NamedFiles
from stor.service.nearcache import NearCache
from stor.service.offload import Background, Offload
from stor.service.s3tier import NoS3, S3Part, S3Tier
from stor.service.status import StatusReporter
from stor.service.takedown import Takedowns
from stor.service.upload import Uploads
from stor.wiring.reload import Reloader

log = logging.getLogger(__name__)

IO_THREADS = 64
"""Threads for blocking disk and network calls, per worker process."""
DISK_OPS_LIMIT = IO_THREADS // 2
"""Operations one disk may have in flight: a hung disk holds at most half the threads, and a
busy healthy one (every upload fsyncing on the only pair) still gets as many as before."""

PARTNER_RECHECK = 30.0
"""Seconds between two checks of the partners of a copy kept open (or held) by the event loop:
how long a partner removed by hand may go unnoticed by the reads of a hot blob."""

ENV_DATA_DIR = "STOR_DATA_DIR"
"""Where the embedded default keeps its pair; set by `stor serve` for its workers."""


def build_service(config: Config, metrics: Metrics | None = None) -> BlobService:
    metrics = metrics or NullMetrics()
    pool = _pool(config)
    monitor = HealthMonitor(pool.disks, timeout=config.status_timeout)
    offload = Offload(IO_THREADS)
    near = NearCache(config.location_cache_size)
    open_files = OpenFiles(
        fd_budget(config.open_file_cache_size), recheck=PARTNER_RECHECK, held_bytes=config.small_blob_cache_bytes
    )
    locations = _locations(config)
    commits = GroupCommits()
    background = Background(offload)
    events: EventLog = NoEvents()
    if config.events is not None:
        events = Events(config.events, Outbox(pool.disks), monitor, offload=offload, metrics=metrics)
    announcer = NoAnnouncer() if config.rabbitmq_uri is None else Announcer(config.rabbitmq_uri, metrics)
    integrity = Integrity(metrics, near, open_files, Healer(), events)
    admission = Admission(config.max_uploads_in_flight, pool, metrics, config.min_upload_rate)
    s3 = _s3(config, pool, offload, metrics, integrity)
    takedowns = Takedowns(
        TombstoneStore(PoolPlaces(pool)),
        pool,
        monitor,
        near=near,
        open_files=open_files,
        locations=locations,
        s3=s3,
        offload=offload,
        events=events,
    )
    lookup = Lookup(
        pool,
        monitor,
        locations=locations,
        near=near,
        open_files=open_files,
        integrity=integrity,
        takedowns=takedowns,
        offload=offload,
        metrics=metrics,
        verify=config.verify_on_read,
        verify_max=config.verify_on_read_max,
    )
    hot = HotPath(lookup, background=background, s3_may_hold=s3.may_hold)
    return BlobService(
        pool,
        monitor,
        lookup=lookup,
        hot=hot,
        uploads=Uploads(
            pool, monitor, lookup, commits=commits, offload=offload, s3=s3, takedowns=takedowns, events=events
        ),
        integrity=integrity,
        takedowns=takedowns,
        events=events,
        announcer=announcer,
        admission=admission,
        s3=s3,
        reporter=StatusReporter(
            pool,
            monitor,
            locations=locations,
            commits=commits,
            s3=s3,
            offload=offload,
            metrics=metrics,
            events=events,
            announcer=announcer,
            admission=admission,
        ),
        open_files=open_files,
        locations=locations,
        commits=commits,
        offload=offload,
        background=background,
        metrics=metrics,
    )


def _pool(config: Config) -> StoragePool:
    pairs = [build_pair(config, index, members) for index, members in enumerate(config.storage_pairs)]
    return StoragePool(pairs, placement_threshold=config.placement_threshold)


def build_pair(config: Config, index: int, members: tuple[str, ...]) -> Pair:
    """The pair at `index` of `storage_pairs`: its disks, and whether it takes writes."""
    require_mount = config.check_mountpoints and not config.embedded
    disks = tuple(
        Disk(root, require_mount=require_mount, max_inflight=DISK_OPS_LIMIT, group_commit=config.group_commit)
        for root in members
    )
    for disk in disks:
        watch(disk)  # (before any takedown record can be written there: see `recordplaces`)
    return Pair(index, disks, config.pair_writable_by_regex(members))


def _locations(config: Config) -> LocationCache | None:
    if not config.memcached_servers:
        return None
    return MemcachedLocations(
        config.memcached_servers,
        timeout=config.memcached_timeout,
        ttl=config.memcached_ttl,
        negative_ttl=config.memcached_negative_ttl,
    )


def _s3(config: Config, pool: StoragePool, offload: Offload, metrics: Metrics, integrity: Integrity) -> S3Part:
    if not config.s3_enabled or config.s3_credentials is None:
        return NoS3()
    store = S3Store(config.s3_credentials, bucket=config.s3_bucket, region=config.s3_region, timeout=config.s3_timeout)
    return S3Tier(
        store,
        S3Queue(pool.disks),
        offload=offload,
        metrics=metrics,
        integrity=integrity,
        sync_writes=config.s3_sync_writes,
        fill_local=config.s3_fill_local,
    )


def preflight(config: Config) -> None:
    """Everything that can fail loudly before serving: directories, the statsd host."""
    check_storage_dirs(config)
    if config.statsite is not None:
        StatsdMetrics(config.statsite)  # resolves the host, or raises ConfigError naming the key


def build_app(config: Config, config_path: str | None = None) -> Starlette:
    """The app serving `config`; SIGHUP re-reads `config_path` (see `reload`)."""
    check_storage_dirs(config)
    prometheus = PrometheusMetrics(
        lambda: _disk_gauges(service.monitor), lambda: service.scrub_runs, lambda: service.scrubs_running
    )
    metrics: Metrics = prometheus
    if config.statsite is not None:
        metrics = FanoutMetrics(prometheus, StatsdMetrics(config.statsite, s3=config.s3_enabled))
    service = build_service(config, metrics)
    names = NamedFiles(service)
    authenticator = Authenticator(lists_of(config))
    reloader = Reloader(config_path, config, service, authenticator, build_pair)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        swept = await service.in_thread(service.prepare)
        await service.in_thread(names.prepare)
        if swept:
            log.info("removed %d stale temp files left by earlier runs", swept)
        if not authenticator.enabled(Role.WRITER):
            log.warning(
                "no basic_auth credentials configured (nor %s): every write is refused with 401", ENV_BASIC_AUTH
            )
        await service.check_health()
        background = asyncio.get_running_loop().create_task(service.run_background(config.health_check_interval))
        reloader.install()
        try:
            yield
        finally:
            close_sink()  # the access lines held back: none is lost on a clean stop
            reloader.uninstall()
            authenticator.close()
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
            service.close()

    return create_app(
        service,
        authenticator,
        max_upload_size=config.max_upload_size,
        body_idle_timeout=config.body_idle_timeout,
        min_upload_rate=config.min_upload_rate,
        archive=ArchiveSettings(config.archive_password.encode(), config.archive_max_blobs),
        metrics_text=lambda: (prometheus.render(), prometheus.content_type),
        names=names,
        max_named_file_size=config.max_named_file_size,
        lifespan=lifespan,
    )


def _disk_gauges(monitor: HealthMonitor) -> list[DiskGauge]:
    """Disk gauges for /metrics from the latest health probes: a scrape never touches a disk."""
    gauges = []
    for disk in monitor.disks:
        last = monitor.last(disk)
        if last is not None:
            gauges.append(DiskGauge(disk.root, last.ok, last.free_bytes, last.total_bytes))
    return gauges


def embedded_config(data_dir: str, env: Mapping[str, str]) -> Config:
    """The no-config default: one pair under `data_dir`, exempt from the mountpoint check.
    Its directories are created by the CLI; credentials come from `STOR_BASIC_AUTH`."""
    members = [os.path.join(data_dir, "disk1"), os.path.join(data_dir, "disk2")]
    config = config_from_mapping({"storage_pairs": [members], "check_mountpoints": False}, env)
    return dataclasses.replace(config, embedded=True)


def config_from_environment() -> Config:
    """The config a worker process serves: `CONFIG_FILE`, else the embedded default."""
    path = os.environ.get(ENV_CONFIG_FILE)
    if path:
        return load_config(path)
    data_dir = os.environ.get(ENV_DATA_DIR)
    if not data_dir:
        raise ConfigError(f"neither {ENV_CONFIG_FILE} nor {ENV_DATA_DIR} is set")
    return embedded_config(data_dir, os.environ)


def app_from_environment() -> Starlette:
    """The servers' factory, in each worker process. SIGHUP is ignored until the app's
    lifespan takes it over: a worker still starting must not die of a config reload."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return build_app(config_from_environment(), os.environ.get(ENV_CONFIG_FILE) or None)
