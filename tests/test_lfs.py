"""stor as a git-lfs server, driven by the real client (Debian's `git-lfs`): push, clone, fsck,
a second push that uploads nothing, an object the store lacks; and the Batch API's errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Storage, StorProcess, app_client
from tests.helpers import AUTH, PASSWORD, USER, layout_path, sha256, wait_for

needs_git_lfs = pytest.mark.skipif(
    shutil.which("git-lfs") is None or shutil.which("git") is None,
    reason="git-lfs is not installed (make test installs it)",
)
MEDIA = "application/vnd.git-lfs+json"


class Git:
    """git and git-lfs in an isolated HOME: no system or user config, a credential helper that
    knows stor's writer, no prompts."""

    def __init__(self, home: Path, url: str) -> None:
        home.mkdir()
        self.home = home
        self.env = {
            "HOME": str(home),
            "PATH": os.environ["PATH"],
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.org",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.org",
        }
        (home / "credentials").write_text(url.replace("http://", f"http://{USER}:{PASSWORD}@") + "\n")
        self("config", "--global", "credential.helper", f"store --file={home / 'credentials'}")
        self("config", "--global", "init.defaultBranch", "main")
        self("lfs", "install")

    def __call__(self, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["git", *args], cwd=cwd or self.home, env=self.env, capture_output=True, text=True, timeout=60
        )
        if check and done.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done


def uploads_in(log: str) -> int:
    return sum(1 for line in log.splitlines() if '"PUT /' in line and " 201 " in line)


@needs_git_lfs
def test_git_lfs_pushes_clones_and_checks_through_stor(
    storage: Storage, start_stor: Callable[..., StorProcess], tmp_path: Path
) -> None:
    path = storage.base / "config.json"
    path.write_text(json.dumps(storage.config()))
    server = start_stor("--config", str(path))
    git = Git(tmp_path / "home", server.url)
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    git("init", "--bare", str(remote))
    git("init", str(work))
    small, big = b"a small tracked file\n" * 3, os.urandom(3 * 1024 * 1024 + 17)
    (work / "small.bin").write_bytes(small)
    (work / "big.bin").write_bytes(big)
    (work / ".lfsconfig").write_text(f'[lfs]\n\turl = "{server.url}/lfs"\n')
    git("lfs", "track", "*.bin", cwd=work)
    git("add", ".gitattributes", ".lfsconfig", "small.bin", "big.bin", cwd=work)
    git("commit", "-m", "samples", cwd=work)
    git("remote", "add", "origin", str(remote), cwd=work)
    pushed = git("push", "origin", "main", cwd=work)
    assert "warning" not in (pushed.stdout + pushed.stderr).lower()  # the locks API answers too
    for data in (small, big):
        assert httpx.get(f"{server.url}/{sha256(data)}").content == data  # stored, verified, by stor
    assert wait_for(lambda: uploads_in(server.log()) == 2)  # (access lines are written in batches)

    clone = tmp_path / "clone"
    git("clone", str(remote), str(clone))
    assert (clone / "small.bin").read_bytes() == small and (clone / "big.bin").read_bytes() == big
    git("lfs", "fsck", cwd=clone)

    git("lfs", "push", "--all", "origin", "main", cwd=work)  # asks the batch API again
    time.sleep(0.5)  # the access lines of the clone's requests written out
    assert uploads_in(server.log()) == 2  # nothing uploaded twice

    for root in storage.roots:  # the store loses the big object
        layout_path(root, sha256(big)).unlink(missing_ok=True)
    skip_smudge = {**git.env, "GIT_LFS_SKIP_SMUDGE": "1"}
    lacking = tmp_path / "lacking"
    subprocess.run(["git", "clone", str(remote), str(lacking)], env=skip_smudge, capture_output=True, check=True)
    pulled = git("lfs", "pull", cwd=lacking, check=False)
    assert pulled.returncode != 0
    assert "does not exist" in pulled.stdout + pulled.stderr or "404" in pulled.stdout + pulled.stderr


@pytest.mark.anyio
async def test_the_batch_api_answers_per_object(storage: Storage) -> None:
    data = os.urandom(100)
    sha = sha256(data)
    absent = sha256(b"not here")
    async with app_client(storage.config(admin_auth="admin:admin-pass")) as http:
        assert (await http.post(f"/{sha}", content=data, auth=AUTH)).status_code == 201

        async def batch(body: object, *, anonymous: bool = False) -> httpx.Response:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = {"Content-Type": MEDIA}
            if anonymous:
                return await http.post("/lfs/objects/batch", content=raw, headers=headers)
            return await http.post("/lfs/objects/batch", content=raw, auth=AUTH, headers=headers)

        objects = [
            {"oid": sha, "size": 100},
            {"oid": absent, "size": 8},
            {"oid": sha, "size": 99},
            {"oid": "not-a-sha", "size": 1},
            {"oid": sha.upper(), "size": 100},
        ]
        down = await batch({"operation": "download", "objects": objects})
        assert down.status_code == 200 and down.headers["content-type"].startswith(MEDIA)
        answers = down.json()["objects"]
        assert answers[0]["actions"]["download"]["href"].endswith(f"/{sha}")
        assert [a.get("error", {}).get("code") for a in answers] == [None, 404, 422, 422, 422]
        up = (await batch({"operation": "upload", "objects": objects[:2]})).json()["objects"]
        assert "actions" not in up[0]  # stored already: nothing to upload
        assert up[1]["actions"]["upload"]["href"].endswith(f"/{absent}")
        assert (await batch({"operation": "upload", "objects": objects[:1]}, anonymous=True)).status_code == 401
        taken = await http.delete(f"/{sha}", auth=("admin", "admin-pass"), headers={"X-Stor-Reason": "test"})
        assert taken.status_code == 200
        gone = (await batch({"operation": "download", "objects": objects[:1]})).json()["objects"][0]
        assert gone["error"]["code"] == 410
        for bad in [b"not json", {"operation": "delete", "objects": []}, {"operation": "download"}, [1, 2]]:
            refused = await batch(bad)
            assert refused.status_code == 422 and refused.json()["message"]
        verify = await http.post("/lfs/locks/verify", json={}, auth=AUTH)
        assert verify.status_code == 200 and verify.json()["ours"] == []
