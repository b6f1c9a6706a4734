"""build_app(config): the one place that names the concrete classes and wires them together."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette

from stor import __version__
from stor.app import create_app
from stor.auth import Authenticator
from stor.backends.disk import Disk
from stor.backends.pairs import Pair, StoragePool
from stor.config import (
    ENV_BASIC_AUTH,
    ENV_CONFIG_FILE,
    Config,
    check_storage_dirs,
    config_from_mapping,
    load_config,
)
from stor.errors import ConfigError
from stor.health import HealthMonitor
from stor.service import BlobService

log = logging.getLogger(__name__)

ENV_DATA_DIR = "STOR_DATA_DIR"
"""Where the embedded default keeps its pair; set by `stor serve` for its workers."""


def build_service(config: Config) -> BlobService:
    require_mount = config.check_mountpoints and not config.embedded
    pairs = [
        Pair(
            index,
            tuple(Disk(root, require_mount=require_mount) for root in members),
            config.pair_writable_by_regex(members),
        )
        for index, members in enumerate(config.storage_pairs)
    ]
    pool = StoragePool(pairs, placement_threshold=config.placement_threshold)
    monitor = HealthMonitor(pool.disks, timeout=config.status_timeout)
    return BlobService(pool, monitor)


def build_app(config: Config) -> Starlette:
    check_storage_dirs(config)
    service = build_service(config)
    authenticator = Authenticator(config.basic_auth)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        swept = await service.offload.run(service.prepare)
        if swept:
            log.info("removed %d stale temp files left by earlier runs", swept)
        _warn_about(config, authenticator)
        async with anyio.create_task_group() as tasks:
            await service.monitor.check()
            tasks.start_soon(service.run_health_checks, config.health_check_interval)
            yield
            tasks.cancel_scope.cancel()
        service.close()

    return create_app(
        service,
        authenticator,
        max_upload_size=config.max_upload_size,
        body_idle_timeout=config.body_idle_timeout,
        lifespan=lifespan,
    )


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
    """uvicorn's factory for each worker process."""
    return build_app(config_from_environment())


def _warn_about(config: Config, authenticator: Authenticator) -> None:
    if not authenticator.enabled:
        log.warning("no basic_auth credentials configured (nor %s): every write is refused with 401", ENV_BASIC_AUTH)
    inactive = [
        key
        for key, used in (
            ("memcached_servers", bool(config.memcached_servers)),
            ("s3_enabled", config.s3_enabled),
            ("statsite", config.statsite is not None),
        )
        if used
    ]
    if inactive:
        log.warning("config keys %s are validated but not active in stor %s yet", ", ".join(inactive), __version__)
