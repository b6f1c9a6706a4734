"""The operations kit in deploy/ holds to the code: the dashboard queries metrics that /metrics
really has, the systemd unit runs commands the CLI really takes and may write every storage
directory of the example config, the Dockerfile's build installs the project's version and its
healthcheck probes the port `stor serve` listens on, and `make run`'s embedded default says
what it serves."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Callable
from pathlib import Path

import click
import httpx
import pytest

import stor
from stor.cli.common import DEFAULT_PORT
from stor.cli.main import main
from tests.conftest import Storage, StorProcess, app_client
from tests.helpers import AUTH, sha256
from tests.services import free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ROOT = DEPLOY.parent
METRIC = re.compile(r"\b(?:stor|process)_[a-z_]+\b")


@pytest.mark.anyio
async def test_every_metric_the_dashboard_queries_is_on_metrics(storage: Storage) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for t in panel["targets"] for name in METRIC.findall(t["expr"])}
    assert len(queried) >= 15
    async with app_client(storage.config()) as http:
        data = b"dashboard"
        await http.post(f"/{sha256(data)}", content=data, auth=AUTH)
        await http.get(f"/{sha256(data)}")
        text = (await http.get("/metrics")).text
    families = set(re.findall(r"^# TYPE (\S+) \S+$", text, re.MULTILINE))
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    known = families | samples
    missing = sorted(name for name in queried if name not in known)
    assert missing == [], f"the dashboard queries metrics /metrics does not have: {missing}"


def test_the_systemd_unit_runs_commands_the_cli_takes() -> None:
    unit = (DEPLOY / "stor.service").read_text()
    commands = re.findall(r"^Exec(?:Start|StartPre)=(\S+) (.+)$", unit, re.MULTILINE)
    assert {args.split()[0] for _, args in commands} == {"serve", "check-config"}
    for binary, args in commands:
        assert binary.endswith("/stor")
        words = shlex.split(args)
        command = main.commands[words[0]]
        with command.make_context(words[0], words[1:]) as context:  # raises on an unknown option or value
            assert context.params
    assert re.search(r"^LimitNOFILE=\d{5,}$", unit, re.MULTILINE)
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_the_license_matches_pyproject() -> None:
    root = DEPLOY.parent
    assert 'license = "MIT"' in (root / "pyproject.toml").read_text()
    assert (root / "LICENSE").read_text().startswith("MIT License")


def test_click_rejects_what_the_unit_test_relies_on_rejecting() -> None:
    with pytest.raises(click.UsageError):
        main.commands["serve"].make_context("serve", ["--no-such-option"])


# --- the Dockerfile, read as Docker reads it ----------------------------------------------------


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continued lines joined as Docker
    joins them (the backslash and the newline removed, nothing added)."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not current and not line.strip()):
            continue  # a comment, even inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1]
            continue
        name, _, args = (current + line).strip().partition(" ")
        instructions.append((name.upper(), args.strip()))
        current = ""
    return instructions


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in dockerfile_instructions():
        if name == "ENV":
            env.update(_env_words(args))
    return env


def _env_words(args: str) -> dict[str, str]:
    """`ENV A=1 B=2` (the key=value form; the Dockerfile uses no other)."""
    pairs = [word.partition("=") for word in shlex.split(args)]
    assert all(equals for _, equals, _ in pairs), f"ENV {args}: not key=value"
    return {key: value for key, _, value in pairs}


def _dockerignored(relative: str, patterns: list[str]) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern.strip("/")) for prefix in prefixes):
            return True
    return False


def _copy(args: str, workdir: Path) -> None:
    """COPY as Docker does it: from the build context minus .dockerignore, each file keeping its
    mtime (that an older source file than a built one is what broke the image's version)."""
    words = [word for word in shlex.split(args) if not word.startswith("--")]
    *sources, destination = words
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()]
    assert not any(p.startswith("!") for p in patterns), "exceptions in .dockerignore: teach this replay"
    target = workdir / destination
    for source in sources:
        origin = ROOT / source
        if origin.is_dir():
            for path in sorted(origin.rglob("*")):
                relative = path.relative_to(ROOT).as_posix()
                if path.is_file() and not _dockerignored(relative, patterns):
                    copied = target / path.relative_to(origin)
                    copied.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, copied)
        else:
            assert not _dockerignored(source, patterns)
            copied = target / origin.name if destination.endswith("/") or len(sources) > 1 else target
            copied.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, copied)


def _build_wheelhouse(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Wheels of the build backend (pyproject's build-system.requires) for pip's isolated builds,
    kept in pytest's cache: the first run downloads them, later runs are offline."""
    cache = getattr(request.config, "cache", None)
    wheelhouse = Path(cache.mkdir("dockerfile-wheelhouse")) if cache is not None else tmp_path / "wheelhouse"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:"]
    pip += ["--dest", str(wheelhouse), *requires]
    offline = subprocess.run([*pip, "--no-index", "--find-links", str(wheelhouse)], capture_output=True, text=True)
    if offline.returncode != 0:
        online = subprocess.run(pip, capture_output=True, text=True, timeout=180)
        if online.returncode != 0:
            pytest.skip(f"no wheel of {requires} cached and no package index reachable: {online.stderr[-500:]}")
    return wheelhouse


def _fresh_venv(tmp_path: Path) -> Path:
    """A new venv (with the pip bundled with Python) that already has the project's dependencies,
    lent from the venv running the tests through a .pth file: pip finds them installed, so the
    image's dependency step runs without downloading them. stor itself, pip and setuptools are
    not lent."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    lent = tmp_path / "dependencies"
    lent.mkdir()
    own = re.compile(
        r"^(?:__editable__.*|stor[-.].*|stor|pip|pip-.*|setuptools|setuptools-.*|_distutils_hack|.*\.pth)$"
    )
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not own.match(entry.name) and entry.name != "__pycache__":
            (lent / entry.name).symlink_to(entry)
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "lent-dependencies.pth").write_text(f"{lent}\n")
    return venv


@pytest.mark.timeout(300)
def test_the_image_build_installs_the_projects_version(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The Dockerfile's build steps, replayed in a temp dir: WORKDIR, COPY (mtimes kept, as
    Docker's COPY keeps them), ENV and every RUN that installs with pip, in order, with `pip` and
    `python` those of a fresh venv. The installed stor must be the project's, file for file."""
    wheelhouse = _build_wheelhouse(request, tmp_path)
    venv = _fresh_venv(tmp_path)
    image = tmp_path / "image"
    image.mkdir()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PIP_CONFIG_FILE": os.devnull,  # as in the image: no pip.conf of this machine's
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "PIP_NO_INDEX": "1",  # offline: the dependencies are lent, the build backend is in the wheelhouse
        "PIP_FIND_LINKS": str(wheelhouse),
    }
    workdir, replayed = image, 0
    for name, args in dockerfile_instructions():
        if name == "WORKDIR":
            workdir = image / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif name == "COPY":
            _copy(args, workdir)
        elif name == "ENV":
            env.update(_env_words(args))
        elif name == "RUN" and re.search(r"\bpip\b", args):
            step = subprocess.run(["/bin/sh", "-c", args], cwd=workdir, env=env, capture_output=True, text=True)
            assert step.returncode == 0, f"RUN {args}\n{step.stdout[-2000:]}\n{step.stderr[-2000:]}"
            replayed += 1
        elif name == "RUN":  # the others make the image's user: nothing a pip install depends on
            assert args.startswith("groupadd"), f"a build step this replay does not know: RUN {args}"
    assert replayed >= 1

    def output(*command: str) -> str:  # from outside the image's workdir, whose stor/ is the source
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout

    assert output(str(venv / "bin" / "stor"), "--version").strip() == f"stor, version {stor.__version__}"
    probe = "import importlib.metadata, stor; print(importlib.metadata.version('stor'), stor.__file__)"
    found = output(str(venv / "bin" / "python"), "-c", probe).split()
    assert found[0] == stor.__version__
    installed = Path(found[1]).parent
    assert installed.is_relative_to(venv)
    source = ROOT / "stor"
    stale = [
        str(path.relative_to(source))
        for path in source.rglob("*.py")
        if (installed / path.relative_to(source)).read_bytes() != path.read_bytes()
    ]
    assert stale == [], f"installed files that are not the source's: {stale}"


def test_the_image_serves_with_workers_and_port_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CMD names neither --port nor --workers, so STOR_PORT and STOR_WORKERS (the image's
    defaults, or `docker run -e`) decide them, as they decide the healthcheck's port."""
    (cmd,) = [json.loads(args) for name, args in dockerfile_instructions() if name == "CMD"]
    assert cmd[:2] == ["stor", "serve"]
    defaults = dockerfile_env()
    assert defaults["STOR_PORT"] == str(DEFAULT_PORT) and int(defaults["STOR_WORKERS"]) >= 2
    serve = main.commands["serve"]
    for variable in ("STOR_PORT", "STOR_WORKERS", "STOR_HOST"):
        monkeypatch.delenv(variable, raising=False)
    for overrides in ({}, {"STOR_PORT": "9000", "STOR_WORKERS": "6"}):
        environment = {**defaults, **overrides}
        for variable, value in environment.items():
            monkeypatch.setenv(variable, value)
        with serve.make_context("serve", cmd[2:]) as context:
            assert context.params["port"] == int(environment["STOR_PORT"])
            assert context.params["workers"] == int(environment["STOR_WORKERS"])
            assert context.params["host"] == "0.0.0.0"


def _healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (args,) = [args for name, args in dockerfile_instructions() if name == "HEALTHCHECK"]
    command = args.split(" CMD ", 1)[1]  # shell form: Docker runs it with /bin/sh -c
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return subprocess.run(["/bin/sh", "-c", command], env={**env, "PATH": path}, capture_output=True, text=True)


def test_the_healthcheck_probes_the_port_stor_serves_on(
    storage: Storage, start_stor: Callable[..., StorProcess]
) -> None:
    server = start_stor("--config", str(storage.write_config()))
    image = dockerfile_env()
    healthy = _healthcheck({**image, "STOR_PORT": str(server.port)})
    assert healthy.returncode == 0, healthy.stderr
    assert _healthcheck({**image, "STOR_PORT": str(free_port())}).returncode == 1  # nothing there: unhealthy


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_the_healthcheck_speaks_tls_when_stor_does(
    storage: Storage, start_stor: Callable[..., StorProcess], tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = {"STOR_SSL_CERTFILE": str(cert), "STOR_SSL_KEYFILE": str(key)}
    server = start_stor("--config", str(storage.write_config()), env=tls)
    assert server.url.startswith("https://")
    healthy = _healthcheck({**dockerfile_env(), **tls, "STOR_PORT": str(server.port)})
    assert healthy.returncode == 0, healthy.stderr


# --- the systemd unit ---------------------------------------------------------------------------


def unit_paths(unit: str, key: str) -> list[str]:
    """The paths of every `key=` line ("-" and "+" prefixes dropped)."""
    values = re.findall(rf"^{key}=(.*)$", unit, re.MULTILINE)
    return [word.lstrip("-+") for value in values for word in value.split()]


@pytest.mark.parametrize("key", ["ReadWritePaths", "RequiresMountsFor"])
def test_the_systemd_unit_covers_every_storage_directory_of_the_example(key: str) -> None:
    """Under ProtectSystem=strict a directory missing from ReadWritePaths is read-only: its pair
    would refuse every write."""
    unit = (DEPLOY / "stor.service").read_text()
    assert "ProtectSystem=strict" in unit
    covered = [Path(p) for p in unit_paths(unit, key)]
    assert covered and all(p.is_absolute() for p in covered)
    example = json.loads((ROOT / "config.json.example").read_text())
    directories = [Path(d) for pair in example["storage_pairs"] for d in pair]
    assert len(directories) >= 4
    missing = [str(d) for d in directories if not any(d.is_relative_to(p) for p in covered)]
    assert missing == [], f"{key} leaves out {missing}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the unit, with /opt/stor/bin/stor (where docs/deployment.md
    installs it) standing for the stor of the venv running the tests."""
    installed = Path(sys.executable).parent / "stor"
    assert installed.exists()
    unit = tmp_path / "stor.service"
    unit.write_text((DEPLOY / "stor.service").read_text().replace("/opt/stor/bin/stor", str(installed)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    about_the_unit = [line for line in (result.stdout + result.stderr).splitlines() if "stor.service" in line]
    assert about_the_unit == []
    if result.returncode != 0:
        pytest.skip(f"systemd-analyze cannot verify units here: {result.stderr.strip()[-300:]}")


# --- `make run`: the embedded default ----------------------------------------------------------


def test_the_embedded_default_says_what_it_serves_after_an_edit(
    tmp_path: Path, start_stor: Callable[..., StorProcess]
) -> None:
    """The docs invite editing stor-data/stor.json: the next start prints the pairs and the
    writers of the edited file, not the generated ones (whose password now gets 401)."""
    first = start_stor(cwd=tmp_path)
    data_dir = tmp_path / "stor-data"
    generated = (data_dir / "credentials").read_text().strip()
    assert "disk1 + disk2" in first.log() and first.log().count(generated) == 1
    first.stop()

    config_path = data_dir / "stor.json"
    config = json.loads(config_path.read_text())
    for disk in ("disk3", "disk4"):
        (data_dir / disk).mkdir()
    config["storage_pairs"].append([str(data_dir / "disk3"), str(data_dir / "disk4")])
    config["basic_auth"] = "editor:edited-password"
    config_path.write_text(json.dumps(config))

    second = start_stor(cwd=tmp_path)
    log = second.log()
    old_password = generated.split(":", 1)[1]
    assert old_password not in log  # it gets 401 now
    assert "2 pairs (disk1 + disk2, disk3 + disk4)" in log
    assert "one pair" not in log and "1 pair" not in log
    assert "writer credentials: editor:edited-password" in log
    assert f"{data_dir / 'credentials'} is not among the writer credentials served" in log
    data = b"after the edit"
    url = f"{second.url}/{sha256(data)}"
    user, _, password = generated.partition(":")
    assert httpx.post(url, content=data, auth=(user, password)).status_code == 401
    assert httpx.post(url, content=data, auth=("editor", "edited-password")).status_code == 201
    second.stop()

    third = start_stor(cwd=tmp_path, env={"STOR_BASIC_AUTH": "from-env:env-password"})
    log = third.log()
    assert "writer credentials: from STOR_BASIC_AUTH (user from-env)" in log
    assert "edited-password" not in log and "env-password" not in log and old_password not in log


def test_the_embedded_default_without_writers_says_so(tmp_path: Path, start_stor: Callable[..., StorProcess]) -> None:
    first = start_stor(cwd=tmp_path)
    first.stop()
    config_path = tmp_path / "stor-data" / "stor.json"
    config = json.loads(config_path.read_text())
    del config["basic_auth"]
    config_path.write_text(json.dumps(config))
    generated = (tmp_path / "stor-data" / "credentials").read_text().strip()
    log = start_stor(cwd=tmp_path).log()
    assert "writer credentials: none" in log and generated.split(":", 1)[1] not in log
