"""The name records' tree: listings in name order at a cost set by the page, any name a client
may send, the flat layout of stor 0.2 moved in at start-up."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stor.backends.namestore import NAMES_DIR, NameRecord, NameStore
from stor.digest import Sha
from tests.helpers import name_record, prepared_disks, sha256

SHA = Sha(sha256(b"x"))


def store_with(base: Path, names: list[str]) -> NameStore:
    store = NameStore(tuple(prepared_disks(base)))
    store.prepare()
    for n, name in enumerate(names):
        store.put(NameRecord(name, SHA, n, 1000.0 + n), create_only=False)
    return store


def listed(store: NameStore, prefix: str = "", after: str = "", limit: int = 1000) -> list[str]:
    return [record.path for record in store.listing(prefix, after, limit)]


# Components with the characters that sort around "/" ("-", ".", "0"), empty ones, and long ones
# (over the 240 bytes a file name may hold here: filed under their hash).
component = st.one_of(
    st.text(alphabet="ab-./0~é", min_size=0, max_size=4).filter(lambda c: c not in (".", "..")),
    st.sampled_from(["x" * 300, "x" * 300 + "-", "é" * 130]),
)
name = st.lists(component, min_size=1, max_size=4).map("/".join).filter(lambda n: n and not n.startswith("/"))


@settings(max_examples=40, deadline=None)
@given(names=st.sets(name, min_size=1, max_size=25), prefix=st.sampled_from(["", "a", "a/", "a-", "x", "b/a"]))
def test_a_listing_is_the_sorted_names_page_by_page(names: set[str], prefix: str) -> None:
    with tempfile.TemporaryDirectory() as base:
        store = store_with(Path(base), sorted(names))
        expected = sorted(n for n in names if n.startswith(prefix))
        assert listed(store, prefix) == expected
        pages: list[str] = []
        while True:  # pages of 3, each after the last name of the one before
            page = listed(store, prefix, pages[-1] if pages else "", 3)
            pages.extend(page)
            if len(page) < 3:
                break
        assert pages == expected
        for name_ in sorted(names):
            assert store.get(name_) is not None


def test_a_page_reads_only_what_it_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names under other directories cost a page nothing: their directories are never read."""
    names = [f"big/{n:05d}" for n in range(300)] + [f"p/{n:03d}" for n in range(20)]
    store = store_with(tmp_path, names)
    read: list[str] = []
    real = os.listdir

    def counting(path: str) -> list[str]:
        read.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", counting)
    assert listed(store, "p/", limit=5) == [f"p/{n:03d}" for n in range(5)]
    assert read and not any("dbig" in path for path in read)


def test_a_deleted_name_leaves_the_listing(tmp_path: Path) -> None:
    store = store_with(tmp_path, ["d/a", "d/b", "d/c"])
    assert listed(store, "d/") == ["d/a", "d/b", "d/c"]
    assert store.delete("d/b")
    assert listed(store, "d/") == ["d/a", "d/c"]  # seen at once, though the directory changed within a tick
    store.put(NameRecord("d/b", SHA, 1, 2000.0), create_only=False)
    assert listed(store, "d/") == ["d/a", "d/b", "d/c"]


def test_the_flat_layout_is_moved_into_the_tree(tmp_path: Path) -> None:
    disks = prepared_disks(tmp_path)
    old = {"docs/a.txt": "docs%2Fa.txt", "100%": "100%25", ".hidden": "#" + sha256(b".hidden")}
    for disk in disks:
        names_dir = Path(disk.root) / NAMES_DIR
        names_dir.mkdir()
        for n, (name_, filename) in enumerate(old.items()):
            record = {"path": name_, "sha": SHA, "size": n, "mtime": 1000.0 + n}
            (names_dir / filename).write_text(json.dumps(record))
    store = NameStore(tuple(disks))
    store.prepare()
    assert listed(store) == sorted(old)
    for disk in disks:
        assert [p.name for p in (Path(disk.root) / NAMES_DIR).iterdir() if not p.name.startswith(".")] == []
        assert all(name_record(Path(disk.root), name_).exists() for name_ in old)
    assert store.get("100%") == NameRecord("100%", SHA, 1, 1001.0)
