"""`stor serve` and `stor check-config`."""

from __future__ import annotations

import json
import logging.config
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import click

from stor.cli.common import DEFAULT_PORT, fail, validated
from stor.cli.logs import FORMATS, logging_config
from stor.config import ENV_ADMIN_AUTH, ENV_BASIC_AUTH, ENV_CONFIG_FILE, Config, Credential
from stor.errors import ConfigError
from stor.http import servers
from stor.http.auth import HASH_PREFIXES
from stor.metrics.prometheus import ENV_MULTIPROC
from stor.wiring.build import ENV_DATA_DIR


@click.command()
@click.option(
    "--config",
    "config_path",
    envvar=ENV_CONFIG_FILE,
    type=click.Path(dir_okay=False),
    help="JSON config file [env CONFIG_FILE]. Without one, serve the embedded default from ./stor-data.",
)
@click.option("--host", envvar="STOR_HOST", default="127.0.0.1", show_default=True, help="[env STOR_HOST]")
@click.option(
    "--port",
    envvar="STOR_PORT",
    default=DEFAULT_PORT,
    type=click.IntRange(0, 65535),
    show_default=True,
    help="[env STOR_PORT]",
)
@click.option(
    "--workers",
    envvar="STOR_WORKERS",
    default=1,
    type=click.IntRange(1, 256),
    show_default=True,
    help="Worker processes [env STOR_WORKERS].",
)
@click.option(
    "--data-dir",
    envvar=ENV_DATA_DIR,
    default="stor-data",
    show_default=True,
    help="Where the embedded default keeps its pair [env STOR_DATA_DIR].",
)
@click.option(
    "--log-level",
    envvar="STOR_LOG_LEVEL",
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"]),
    show_default=True,
)
@click.option(
    "--log-format",
    envvar="STOR_LOG_FORMAT",
    default="text",
    type=click.Choice(FORMATS),
    show_default=True,
    help="Log lines as text, or one JSON object per line (access lines carry method, path, status, "
    "bytes, duration_ms and remote) [env STOR_LOG_FORMAT].",
)
@click.option(
    "--ssl-certfile",
    envvar="STOR_SSL_CERTFILE",
    type=click.Path(exists=True, dir_okay=False),
    help="Serve HTTPS: the PEM certificate (chain) [env STOR_SSL_CERTFILE]; with --ssl-keyfile.",
)
@click.option(
    "--ssl-keyfile",
    envvar="STOR_SSL_KEYFILE",
    type=click.Path(exists=True, dir_okay=False),
    help="The certificate's private key, PEM [env STOR_SSL_KEYFILE].",
)
@click.option(
    "--server",
    envvar="STOR_SERVER",
    default="uvicorn",
    type=click.Choice(servers.SERVERS),
    show_default=True,
    help="The HTTP server: uvicorn answers hot blobs without an ASGI cycle and slow or huge request "
    "heads with 408/431, and is what the reliability suite runs; granian is the alternative "
    "(see docs/deployment.md) [env STOR_SERVER].",
)
def serve(
    config_path: str | None,
    host: str,
    port: int,
    workers: int,
    data_dir: str,
    log_level: str,
    log_format: str,
    ssl_certfile: str | None,
    ssl_keyfile: str | None,
    server: str,
) -> None:
    """Serve the HTTP API."""
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise click.UsageError("--ssl-certfile and --ssl-keyfile go together")
    logs = logging_config(log_level.upper(), log_format)
    logging.config.dictConfig(logs)
    if config_path:
        config = validated(config_path)
        os.environ[ENV_CONFIG_FILE] = os.path.abspath(config_path)
    else:
        config = _prepare_embedded(Path(data_dir).absolute())
    multiproc = None
    if workers > 1 and not os.environ.get(ENV_MULTIPROC):
        # each worker counts into files here; /metrics sums them
        multiproc = tempfile.mkdtemp(prefix="stor-metrics-")
        os.environ[ENV_MULTIPROC] = multiproc
    try:
        listen = servers.Listen(host, port, workers, config.body_idle_timeout, ssl_certfile, ssl_keyfile)
        started = servers.serve(server, listen, logs)
    except ConfigError as exc:
        fail(str(exc))
        sys.exit(2)
    finally:
        if multiproc:
            shutil.rmtree(multiproc, ignore_errors=True)
    if not started:
        sys.exit(3)  # as uvicorn: the app or the socket failed before serving


@click.command("check-config")
@click.option(
    "--config",
    "config_path",
    envvar=ENV_CONFIG_FILE,
    required=True,
    type=click.Path(dir_okay=False),
    help="[env CONFIG_FILE]",
)
def check_config(config_path: str) -> None:
    """Validate a config file and its storage directories; exit 2 on error. A config that
    validates but takes no upload (nobody can write, or no pair takes writes) is OK with a
    warning on stderr each (DESIGN.md §5)."""
    config = validated(config_path)
    pairs = len(config.storage_pairs)
    writable = sum(config.pair_writable_by_regex(p) for p in config.storage_pairs)
    click.echo(f"{config_path}: OK ({pairs} pairs, {writable} writable, {len(config.basic_auth)} writers)")
    for warning in config_warnings(config):
        fail(f"warning: {warning}")


def config_warnings(config: Config) -> list[str]:
    """What makes a valid config refuse every upload. `config` already holds the credentials
    from the environment (`STOR_BASIC_AUTH`, `STOR_ADMIN_AUTH`), which win over the file."""
    warnings = []
    if not config.basic_auth and not config.admin_auth:
        warnings.append(
            f"nobody can write: no basic_auth nor admin_auth credentials (nor {ENV_BASIC_AUTH} / {ENV_ADMIN_AUTH}), "
            "so every upload is refused with 401"
        )
    if not any(config.pair_writable_by_regex(pair) for pair in config.storage_pairs):
        warnings.append(
            f"no pair takes writes: writable_pairs_regex {config.writable_pairs_regex!r} matches no pair "
            "(it must be found in every directory of a pair), so every upload is refused"
        )
    return warnings


def _prepare_embedded(data_dir: Path) -> Config:
    """On the first start, create the embedded default's directories, writer credentials and
    config file (`stor.json`, so that `stor scrub`, `stor import`, `stor check-config` and SIGHUP
    work on it as on any deployment); serve that file, and say what it serves. The operator may
    edit it (pairs, `basic_auth`, ...): what is printed comes from the config loaded, never from
    what was generated."""
    for disk in ("disk1", "disk2"):
        (data_dir / disk).mkdir(parents=True, exist_ok=True)
    path = data_dir / "stor.json"
    credentials_file = data_dir / "credentials"
    if not path.exists():  # never over an operator's edits
        raw: dict[str, object] = {
            "storage_pairs": [[str(data_dir / "disk1"), str(data_dir / "disk2")]],
            "check_mountpoints": False,
        }
        if not os.environ.get(ENV_BASIC_AUTH):
            raw["basic_auth"] = _embedded_credentials(credentials_file)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds the credentials
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(raw, handle, indent=2)
            handle.write("\n")
    config = validated(str(path))
    os.environ[ENV_CONFIG_FILE] = str(path)
    click.echo(
        f"stor: no config given; serving the embedded default from {data_dir}: {_pairs(config, data_dir)}", err=True
    )
    click.echo(f"stor: its config: {path} (stor scrub --config {path}, or export CONFIG_FILE={path})", err=True)
    for line in _writers(config, path, credentials_file):
        click.echo(f"stor: {line}", err=True)
    return config


def _pairs(config: Config, data_dir: Path) -> str:
    """`2 pairs (disk1 + disk2, disk3 + disk4), 1 taking writes`: the pairs of the loaded config."""

    def shown(member: str) -> str:
        relative = Path(member)
        return str(relative.relative_to(data_dir)) if relative.is_relative_to(data_dir) else member

    count = len(config.storage_pairs)
    pairs = ", ".join(" + ".join(shown(m) for m in pair) for pair in config.storage_pairs)
    writable = sum(config.pair_writable_by_regex(pair) for pair in config.storage_pairs)
    taking = "" if writable == count else f", {writable} taking writes"
    return f"{count} pair{'' if count == 1 else 's'} ({pairs}){taking}"


def _writers(config: Config, path: Path, credentials_file: Path) -> list[str]:
    """Who can write to the embedded default, from the loaded config: a generated password
    that the operator has since replaced is never shown (it would get 401)."""
    try:
        generated = credentials_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        generated = ""
    if os.environ.get(ENV_BASIC_AUTH):
        lines = [f"writer credentials: from {ENV_BASIC_AUTH} ({_users(config.basic_auth)})"]
    elif not config.basic_auth:
        lines = [f"writer credentials: none (no basic_auth in {path}, nor {ENV_BASIC_AUTH}): every write gets 401"]
    else:
        shown = [
            f"{c.user} (hashed password)" if c.password.startswith(HASH_PREFIXES) else f"{c.user}:{c.password}"
            for c in config.basic_auth
        ]
        plain = [f"{c.user}:{c.password}" for c in config.basic_auth if not c.password.startswith(HASH_PREFIXES)]
        if generated and generated in plain:
            hint = f"export STOR_CREDENTIALS=$(cat {credentials_file})"
        else:
            hint = f"as in {path}; export STOR_CREDENTIALS=USER:PASSWORD"
        lines = [f"writer credentials: {', '.join(shown)} ({hint})"]
    if generated and generated not in {f"{c.user}:{c.password}" for c in config.basic_auth}:
        lines.append(f"note: {credentials_file} is not among the writer credentials served: it gets 401")
    return lines


def _users(credentials: tuple[Credential, ...]) -> str:
    users = [c.user for c in credentials]
    return f"user{'' if len(users) == 1 else 's'} {', '.join(users)}"


def _embedded_credentials(path: Path) -> str:
    """Kept in the data directory (mode 0600), for `STOR_CREDENTIALS=$(cat ...)`. An earlier
    file is kept (a data directory whose `stor.json` was removed keeps its password)."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    value = f"writer:{secrets.token_urlsafe(18)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    return value
