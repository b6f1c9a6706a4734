"""The name records' tree: listings in name order at a cost set by the page, any name a client
may send, the flat layout of stor 0.2 moved in at start-up; the directory indexes kept up to
date through the journals, across stores (processes, nodes) and past damaged journals."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stor.backends import nameindex
from stor.backends.disk import Disk
from stor.backends.namerecord import NameRecord
from stor.backends.namestore import NAMES_DIR, NameStore
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


# -- the directory indexes and their journals ---------------------------------------------------


def journals(base: Path, name_: str) -> list[Path]:
    """The journal of the directory holding `name_`'s record, on each member."""
    return [name_record(base / member, name_).parent / nameindex.JOURNAL for member in ("m1", "m2")]


def hand_made(base: Path, name_: str, members: tuple[str, ...] = ("m1", "m2")) -> None:
    """A record written as a stor without journals (or a hand) would: no journal line."""
    for member in members:
        path = name_record(base / member, name_)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"path": name_, "sha": SHA, "size": 1, "mtime": 3000.0}))


def test_two_stores_on_the_same_members_see_each_others_writes(tmp_path: Path) -> None:
    """As two processes (or nodes) would, listing right after each other's writes (within the
    mtime tick, so through the journal)."""
    a = store_with(tmp_path, ["d/a", "d/c"])
    b = NameStore(a.members)
    assert listed(a, "d/") == listed(b, "d/") == ["d/a", "d/c"]
    b.put(NameRecord("d/b", SHA, 1, 2000.0), create_only=False)
    b.put(NameRecord("d/sub/x", SHA, 1, 2000.0), create_only=False)  # a new directory, journaled in d/
    assert listed(a, "d/") == ["d/a", "d/b", "d/c", "d/sub/x"]
    assert b.delete("d/b") and a.delete("d/a")
    assert listed(a, "d/") == listed(b, "d/") == ["d/c", "d/sub/x"]
    a.put(NameRecord("d/b", SHA, 1, 2001.0), create_only=False)  # "-" then "+" again
    assert listed(b, "d/") == ["d/b", "d/c", "d/sub/x"]
    assert listed(b, "d/", after="d/b", limit=1) == ["d/c"]


def test_a_page_after_a_write_reads_no_directory_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once read, a directory is followed through its journal: neither an unchanged directory nor
    one just written to by another store is listed again."""
    a = store_with(tmp_path, [f"big/{n:05d}" for n in range(500)])
    b = NameStore(a.members)
    time.sleep(0.1)  # past the mtime tick of the last write: an unchanged mtime is trusted
    assert len(listed(a, "big/", limit=5)) == 5
    read: list[str] = []
    real = os.listdir

    def counting(path: str) -> list[str]:
        read.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", counting)
    assert listed(a, "big/", after="big/00100", limit=3) == ["big/00101", "big/00102", "big/00103"]
    for n in range(3):
        b.put(NameRecord(f"big/{n:05d}x", SHA, 1, 2000.0), create_only=False)
        assert listed(a, "big/", after=f"big/{n:05d}", limit=2) == [f"big/{n:05d}x", f"big/{n + 1:05d}"]
    assert b.delete("big/00001x")
    assert listed(a, "big/", after="big/00001", limit=1) == ["big/00002"]
    assert read == []


def test_a_change_without_a_journal_line_is_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stor without journals, or a hand: the directory's mtime moved while its journal did not
    grow, so it is read whole; while the journal grew too, the periodic whole read finds it."""
    a = store_with(tmp_path, ["d/a"])
    assert listed(a, "d/") == ["d/a"]
    hand_made(tmp_path, "d/b")
    hand_made(tmp_path, "d/new/c")
    assert listed(a, "d/") == ["d/a", "d/b", "d/new/c"]
    name_record(tmp_path / "m1", "d/b").unlink()
    name_record(tmp_path / "m2", "d/b").unlink()
    assert listed(a, "d/") == ["d/a", "d/new/c"]
    time.sleep(0.1)
    assert listed(a, "d/") == ["d/a", "d/new/c"]  # trusted now
    hand_made(tmp_path, "d/e")
    a.put(NameRecord("d/f", SHA, 1, 2000.0), create_only=False)  # the journal grew meanwhile
    monkeypatch.setattr(nameindex, "_REREAD_NS", 0)
    assert listed(a, "d/") == ["d/a", "d/e", "d/f", "d/new/c"]


def test_a_change_without_a_line_in_the_tick_of_a_whole_read_is_seen(tmp_path: Path) -> None:
    """The directory's mtime, as recent as the read, would not move for a change in the same tick."""
    a = store_with(tmp_path, ["d/a"])
    for n in range(5):
        hand_made(tmp_path, f"d/h{n}")
        assert listed(a, "d/") == ["d/a"] + [f"d/h{m}" for m in range(n + 1)]


def test_a_journal_line_for_an_entry_never_created_is_harmless(tmp_path: Path) -> None:
    a = store_with(tmp_path, ["d/a"])
    assert listed(a, "d/") == ["d/a"]
    for directory in (name_record(tmp_path / m, "d/a").parent for m in ("m1", "m2")):
        nameindex.before_creating(str(directory), "rghost")  # a crash before the rename
        nameindex.before_creating(str(directory), "dghosts")  # … before the mkdir
        nameindex.before_creating(str(directory), "h" + "0" * 64)
    assert listed(a, "d/") == ["d/a"]
    assert listed(NameStore(a.members), "d/") == ["d/a"]
    hand_made(tmp_path, "d/ghost")  # created after all (no second line): its first line stands
    assert listed(a, "d/") == ["d/a", "d/ghost"]


def test_a_torn_or_garbled_journal_does_not_hide_names(tmp_path: Path) -> None:
    """A line cut short (a power cut) with later lines appended after it, plain garbage, a journal
    truncated in mid-line."""
    a = store_with(tmp_path, ["d/a"])
    b = NameStore(a.members)
    assert listed(a, "d/") == ["d/a"]
    for journal in journals(tmp_path, "d/a"):
        with journal.open("ab") as handle:
            handle.write(b'+"rhalf')
    b.put(NameRecord("d/b", SHA, 1, 2000.0), create_only=False)
    assert listed(a, "d/") == ["d/a", "d/b"]
    for journal in journals(tmp_path, "d/a"):
        with journal.open("ab") as handle:
            handle.write(b'\x00\x00\x00\n-"\n')
    b.put(NameRecord("d/c", SHA, 1, 2000.0), create_only=False)
    assert b.delete("d/a")
    assert listed(a, "d/") == ["d/b", "d/c"]
    assert listed(NameStore(a.members), "d/") == ["d/b", "d/c"]
    for journal in journals(tmp_path, "d/a"):  # cut short in mid-line, behind the reader's offset
        os.truncate(journal, journal.stat().st_size - 3)
    assert listed(a, "d/") == ["d/b", "d/c"]
    b.put(NameRecord("d/e", SHA, 1, 2000.0), create_only=False)
    assert listed(a, "d/") == ["d/b", "d/c", "d/e"]


def test_a_journal_removed_by_hand_is_made_again(tmp_path: Path) -> None:
    a = store_with(tmp_path, ["d/a"])
    b = NameStore(a.members)
    assert listed(a, "d/") == ["d/a"]
    for journal in journals(tmp_path, "d/a"):
        journal.unlink()
    assert listed(a, "d/") == ["d/a"]
    b.put(NameRecord("d/b", SHA, 1, 2000.0), create_only=False)
    assert all(journal.exists() for journal in journals(tmp_path, "d/a"))
    assert listed(a, "d/") == ["d/a", "d/b"]
    for journal in journals(tmp_path, "d/a"):
        journal.unlink()
    assert b.delete("d/a")
    assert listed(a, "d/") == ["d/b"]


def test_a_whole_read_between_the_first_line_and_the_rename_misses_nothing(tmp_path: Path) -> None:
    """A reader that reads the directory whole after a writer's first line but before its rename
    (so the line is behind its offset and the record not in its listdir) has the second line,
    though other writers' lines came in between."""
    store_with(tmp_path, ["d/a"])
    directory = str(name_record(tmp_path / "m1", "d/a").parent)
    nameindex.before_creating(directory, "rslow")
    a = NameStore(tuple(prepared_disks_again(tmp_path)))
    assert listed(a, "d/") == ["d/a"]  # read whole: the line is behind, the record not there yet
    hand_made(tmp_path, "d/slow", members=("m1",))
    nameindex.after_creating(directory, "rslow")
    NameStore(a.members).put(NameRecord("d/z", SHA, 1, 2000.0), create_only=False)
    assert listed(a, "d/") == ["d/a", "d/slow", "d/z"]


def test_a_put_is_seen_by_a_reader_that_read_the_directory_whole_during_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader reads the directory between the writer's first line and its rename (one member,
    so the other's lines cannot stand in): the writer's second line brings the name."""
    writer = NameStore(tuple(prepared_disks(tmp_path, ("m1",))))
    writer.prepare()
    writer.put(NameRecord("d/a", SHA, 1, 2000.0), create_only=False)
    reader = NameStore(writer.members)
    real = os.replace

    def reading_first(source: str, target: str) -> None:
        if target.endswith("/rslow"):
            assert listed(reader, "d/") == ["d/a"]
        real(source, target)

    monkeypatch.setattr(os, "replace", reading_first)
    writer.put(NameRecord("d/slow", SHA, 1, 2000.0), create_only=False)
    writer.put(NameRecord("d/z", SHA, 1, 2000.0), create_only=False)
    assert listed(reader, "d/") == ["d/a", "d/slow", "d/z"]


def prepared_disks_again(base: Path) -> list[Disk]:
    disks = [Disk(str(base / member), require_mount=False) for member in ("m1", "m2")]
    for disk in disks:
        disk.prepare()
    return disks


def test_the_journal_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its bound a journal is removed (and made again by the next writer); readers follow."""
    monkeypatch.setattr(nameindex, "_JOURNAL_MAX", 300)
    a = store_with(tmp_path, ["d/a"])
    b = NameStore(a.members)
    expected = ["d/a"]
    for n in range(40):
        b.put(NameRecord(f"d/{n:03d}", SHA, 1, 2000.0), create_only=False)
        expected.append(f"d/{n:03d}")
        if n % 3 == 0:
            assert b.delete(expected.pop(0))
        assert listed(a, "d/") == sorted(expected)
        assert all(j.stat().st_size <= 300 + 20 for j in journals(tmp_path, "d/a") if j.exists())


def test_a_listing_has_every_name_acknowledged_before_it_began(tmp_path: Path) -> None:
    """A writer and a deleter on one store, a lister on another, at the same time."""
    lister = store_with(tmp_path, [f"d/{n:04d}" for n in range(200)])
    writer = NameStore(lister.members)
    acknowledged: set[str] = set()
    done = threading.Event()

    def write() -> None:
        for n in range(150):
            writer.put(NameRecord(f"d/w{n:04d}", SHA, 1, 2000.0), create_only=False)
            acknowledged.add(f"d/w{n:04d}")
            writer.delete(f"d/{n:04d}")
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        while not done.is_set():
            before = set(acknowledged)
            assert before <= set(listed(lister, "d/", limit=10_000))
    finally:
        thread.join()
    assert listed(lister, "d/", limit=10_000) == sorted(acknowledged | {f"d/{n:04d}" for n in range(150, 200)})


# Operations by either of two stores, then a listing by either, compared with the names put.
operation = st.tuples(st.sampled_from(["put", "delete"]), st.integers(0, 1), name)


@settings(max_examples=30, deadline=None)
@given(operations=st.lists(operation, min_size=1, max_size=20), prefix=st.sampled_from(["", "a", "a/", "x"]))
def test_two_stores_agree_with_the_names_put(operations: list[tuple[str, int, str]], prefix: str) -> None:
    with tempfile.TemporaryDirectory() as base:
        first = store_with(Path(base), [])
        stores = (first, NameStore(first.members))
        names: set[str] = set()
        for n, (action, by, name_) in enumerate(operations):
            if action == "put":
                stores[by].put(NameRecord(name_, SHA, n, 1000.0 + n), create_only=False)
                names.add(name_)
            else:
                assert stores[by].delete(name_) == (name_ in names)
                names.discard(name_)
            expected = sorted(n_ for n_ in names if n_.startswith(prefix))
            assert listed(stores[1 - by], prefix) == expected
            assert listed(stores[by], prefix) == expected


def test_a_journal_replaced_by_one_with_the_same_inode_is_not_taken_for_it(tmp_path: Path) -> None:
    """Inode numbers are reused: a reader tells journals apart by their header line too. Here the
    new journal is written in place, longer than the reader's offset, which falls on a line end."""
    a = store_with(tmp_path, ["d/a", "d/b"])
    assert listed(a, "d/") == ["d/a", "d/b"]
    hand_made(tmp_path, "d/new")  # its line is in the part of the new journal the reader would skip
    for journal in journals(tmp_path, "d/a"):
        offset = journal.stat().st_size
        head = b"#" + b"0" * 32 + b'\n+"rnew"\n'
        filler = b"+" + b" " * (offset - len(head) - 6) + b'"ra"\n'
        journal.write_bytes(head + filler + b'+"rb"\n')
    assert listed(a, "d/") == ["d/a", "d/b", "d/new"]
