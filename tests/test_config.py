from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from stor.cli.main import main
from stor.config import ROLE_KEYS, Credential, check_storage_dirs, config_from_mapping, load_config
from stor.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def make(**raw: Any) -> Any:
    raw.setdefault("storage_pairs", [["/d1", "/d2"]])
    return config_from_mapping(raw, {})


def test_minimal_config_has_the_documented_defaults() -> None:
    config = make()
    assert config.storage_pairs == (("/d1", "/d2"),)
    assert config.max_upload_size == 2 * 1024**3
    assert config.placement_threshold == 1024**3
    assert config.check_mountpoints is True
    assert config.s3_bucket == "samples"
    assert config.basic_auth == ()


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"storage_pair": []}, ["storage_pair"]),
        ({"storage_pairs": []}, ["storage_pairs", "[]"]),
        ({"storage_pairs": [["/only"]]}, ["storage_pairs[0]", "/only", "two members"]),
        ({"storage_pairs": [["/a", "/b"], ["/c", "/a"]]}, ["storage_pairs[1]", "/a", "more than once"]),
        ({"storage_pairs": [["/a", 3]]}, ["storage_pairs[0]", "3"]),
        ({"max_upload_size": "2GB"}, ["max_upload_size", "2GB"]),
        ({"max_upload_size": -1}, ["max_upload_size", "-1"]),
        ({"check_mountpoints": "yes"}, ["check_mountpoints", "yes"]),
        ({"writable_pairs_regex": "data[12"}, ["writable_pairs_regex", "data[12"]),
        ({"basic_auth": "nocolon"}, ["basic_auth"]),
        ({"basic_auth": ["a:b", 5]}, ["basic_auth[1]", "5"]),
        ({"body_idle_timeout": 0}, ["body_idle_timeout", "0"]),
        ({"status_timeout": 5}, ["status_timeout", "5"]),
        ({"memcached_servers": "host:11211"}, ["memcached_servers", "host:11211"]),
        ({"s3_credentials": {"access_key": "a", "secret_key": "b"}}, ["s3_credentials.host"]),
        ({"statsite": {"host": "h", "sample_rate": 2}}, ["statsite.sample_rate", "2"]),
    ],
)
def test_errors_name_the_key_and_the_value(raw: dict[str, Any], names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        make(**raw)
    for name in names:
        assert name in str(info.value)


def test_password_never_appears_in_errors_or_repr() -> None:
    with pytest.raises(ConfigError) as info:
        make(basic_auth=":hunter2")
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(make(basic_auth="u:hunter2"))


def test_basic_auth_string_or_list() -> None:
    assert make(basic_auth="u:p:with:colons").basic_auth == (Credential("u", "p:with:colons"),)
    assert make(basic_auth=["a:1", "b:2"]).basic_auth == (Credential("a", "1"), Credential("b", "2"))


def test_stor_basic_auth_env_overrides_the_file() -> None:
    raw = {"storage_pairs": [["/a", "/b"]], "basic_auth": "file:pw"}
    assert config_from_mapping(raw, {"STOR_BASIC_AUTH": "env:pw"}).basic_auth == (Credential("env", "pw"),)
    several = config_from_mapping(raw, {"STOR_BASIC_AUTH": '["x:1", "y:2"]'}).basic_auth
    assert [c.user for c in several] == ["x", "y"]


def test_writable_regex_is_searched_and_every_member_must_match() -> None:
    config = make(writable_pairs_regex="data[12]")
    assert config.pair_writable_by_regex(("/mnt/data1", "/mnt/data2"))
    assert not config.pair_writable_by_regex(("/mnt/data1", "/mnt/data3"))
    assert make().pair_writable_by_regex(("/x", "/y"))


def test_stor_example_config_keys_load(tmp_path: Path) -> None:
    """Stor's own example (from its README) is accepted unchanged, apart from real paths."""
    stor_example = {
        "statsite": {"host": "STATSITE_HOST", "prefix": "stor.dev", "sample_rate": 0.1},
        "storage_pairs": [["/mnt/data1", "/mnt/data2"], ["/mnt/data3", "/mnt/data4"]],
        "writable_pairs_regex": "data[12]",
        "s3_enabled": True,
        "s3_credentials": {"access_key": "S3_ACCESS_KEY", "secret_key": "S3_SECRET_KEY", "host": "S3_HOST"},
        "memcached_servers": ["MEMCACHED_SERVER1"],
        "secret": "mojolicious secret",
        "basic_auth": "writer:writer_pass",
    }
    path = tmp_path / "stor.json"
    path.write_text(json.dumps(stor_example))
    config = load_config(path, env={})
    assert config.basic_auth == (Credential("writer", "writer_pass"),)
    assert [config.pair_writable_by_regex(p) for p in config.storage_pairs] == [True, False]


def test_shipped_example_is_valid() -> None:
    config = load_config(ROOT / "config.json.example", env={})
    assert len(config.storage_pairs) >= 1


def test_load_config_reports_bad_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json", env={})


def test_check_storage_dirs_refuses_a_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    config = make(storage_pairs=[[str(tmp_path / "a"), str(tmp_path / "gone")]], check_mountpoints=False)
    with pytest.raises(ConfigError, match=r"storage_pairs\[0\].*gone.*does not exist"):
        check_storage_dirs(config)


def test_check_storage_dirs_refuses_the_root_filesystem(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = make(storage_pairs=[[str(tmp_path / "a"), str(tmp_path / "b")]])
    if Path("/").stat().st_dev != tmp_path.stat().st_dev:
        pytest.skip("the temp dir is on its own filesystem here")
    with pytest.raises(ConfigError, match="root filesystem"):
        check_storage_dirs(config)
    check_storage_dirs(make(storage_pairs=[list(p) for p in config.storage_pairs], check_mountpoints=False))


# --- `stor check-config`: valid, but nothing can be uploaded (DESIGN.md §5) --------------------

NOBODY_WRITES = "stor: warning: nobody can write"
NO_PAIR_WRITES = "stor: warning: no pair takes writes"


def check_config(tmp_path: Path, env: dict[str, str] | None = None, **raw: Any) -> Result:
    """`stor check-config` on a config of two real pairs, in an environment without the
    credential variables unless `env` sets them."""
    pairs = [[str(tmp_path / f"data{n}"), str(tmp_path / f"data{n + 1}")] for n in (1, 3)]
    for member in (m for pair in pairs for m in pair):
        Path(member).mkdir(exist_ok=True)
    path = tmp_path / "stor.json"
    path.write_text(json.dumps({"storage_pairs": pairs, "check_mountpoints": False, **raw}))
    unset: dict[str, str | None] = {variable: None for variable in (*ROLE_KEYS.values(), "CONFIG_FILE")}
    return CliRunner().invoke(main, ["check-config", "--config", str(path)], env={**unset, **(env or {})})


@pytest.mark.parametrize(
    ("raw", "env", "warnings"),
    [
        ({"basic_auth": "w:p"}, {}, []),
        ({"admin_auth": ["a:p"]}, {}, []),  # admins may upload too
        ({}, {}, [NOBODY_WRITES]),
        ({"read_auth": ["r:p"], "metrics_auth": ["m:p"]}, {}, [NOBODY_WRITES]),
        ({}, {"STOR_BASIC_AUTH": "w:p"}, []),
        ({}, {"STOR_ADMIN_AUTH": '["a:p"]'}, []),
        ({"basic_auth": "w:p", "writable_pairs_regex": "data[1-4]"}, {}, []),
        ({"basic_auth": "w:p", "writable_pairs_regex": "data[12]"}, {}, []),  # one pair is enough
        ({"basic_auth": "w:p", "writable_pairs_regex": "data[13]"}, {}, [NO_PAIR_WRITES]),  # every member must match
        ({"basic_auth": "w:p", "writable_pairs_regex": "^nowhere$"}, {}, [NO_PAIR_WRITES]),
        ({"writable_pairs_regex": "x^"}, {}, [NOBODY_WRITES, NO_PAIR_WRITES]),
    ],
    ids=[
        "writer",
        "admin-only",
        "nobody",
        "readers-only",
        "writer-from-env",
        "admin-from-env",
        "regex-matches-all",
        "regex-matches-one-pair",
        "regex-matches-half-of-each-pair",
        "regex-matches-nothing",
        "both",
    ],
)
def test_check_config_warns_when_no_upload_can_succeed(
    tmp_path: Path, raw: dict[str, Any], env: dict[str, str], warnings: list[str]
) -> None:
    result = check_config(tmp_path, env, **raw)
    assert result.exit_code == 0, result.output
    assert "stor.json: OK (2 pairs" in result.stdout
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("stor: warning: ")] == lines  # only warnings, one line each
    assert [w for w in (NOBODY_WRITES, NO_PAIR_WRITES) if any(line.startswith(w) for line in lines)] == warnings
    assert len(lines) == len(warnings)


def test_check_config_warnings_name_the_cause(tmp_path: Path) -> None:
    result = check_config(tmp_path, writable_pairs_regex="^nowhere$")
    nobody, no_pair = result.stderr.splitlines()
    assert "basic_auth" in nobody and "admin_auth" in nobody and "STOR_BASIC_AUTH" in nobody
    assert "STOR_ADMIN_AUTH" in nobody and "401" in nobody
    assert "'^nowhere$'" in no_pair


def test_check_config_warns_on_stderr_and_exits_0_as_a_command(tmp_path: Path) -> None:
    """The same through a real `stor check-config` process: the OK line on stdout, the warning on stderr."""
    pair = [str(tmp_path / "a"), str(tmp_path / "b")]
    for member in pair:
        Path(member).mkdir()
    path = tmp_path / "stor.json"
    path.write_text(json.dumps({"storage_pairs": [pair], "check_mountpoints": False}))
    env = {k: v for k, v in os.environ.items() if k not in (*ROLE_KEYS.values(), "CONFIG_FILE")}
    result = subprocess.run(
        [sys.executable, "-m", "stor", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0
    assert result.stdout.startswith(f"{path}: OK (1 pairs")
    assert result.stderr.startswith(NOBODY_WRITES) and len(result.stderr.splitlines()) == 1
    with_writer = subprocess.run(
        [sys.executable, "-m", "stor", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "STOR_BASIC_AUTH": "w:p"},
    )
    assert with_writer.returncode == 0 and with_writer.stderr == ""
