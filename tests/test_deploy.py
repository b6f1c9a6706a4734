"""The operations kit in deploy/ holds to the code: the dashboard queries metrics that /metrics
really has, and the systemd unit runs commands the CLI really takes."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import pytest

from stor.cli.main import main
from tests.conftest import Storage, app_client
from tests.helpers import AUTH, sha256

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
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
