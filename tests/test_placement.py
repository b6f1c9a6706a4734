from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from stor.backends.disk import Disk
from stor.backends.pairs import Candidate, Pair, StoragePool, pick_pair
from stor.errors import InsufficientStorage, StorageUnavailable

GiB = 1024**3


def pairs(n: int, members: int = 2) -> list[Pair]:
    return [Pair(i, tuple(Disk(f"/p{i}m{m}", require_mount=False) for m in range(members)), True) for i in range(n)]


def test_no_pair_with_room_is_insufficient_storage() -> None:
    p = pairs(2)
    with pytest.raises(InsufficientStorage):
        pick_pair([Candidate(p[0], 10), Candidate(p[1], 99)], 100, GiB, random.Random(1))
    with pytest.raises(InsufficientStorage):
        pick_pair([], 0, GiB, random.Random(1))


def test_below_the_threshold_the_pair_with_most_free_space_wins() -> None:
    p = pairs(3)
    candidates = [Candidate(p[0], 500), Candidate(p[1], 900), Candidate(p[2], 700)]
    for seed in range(20):
        assert pick_pair(candidates, 10, GiB, random.Random(seed)) is p[1]


def test_above_the_threshold_pick_is_random_and_proportional_to_free_space() -> None:
    p = pairs(3)
    candidates = [Candidate(p[0], 3 * GiB), Candidate(p[1], 1 * GiB + 1), Candidate(p[2], GiB // 2)]
    rng = random.Random(42)
    counts = Counter(pick_pair(candidates, 10, GiB, rng).index for _ in range(4000))
    assert counts[2] == 0  # below the threshold: not a candidate while others are above it
    assert 0.70 < counts[0] / 4000 < 0.80  # 3 / (3 + 1) of the picks


def test_a_pair_too_small_for_the_blob_is_never_picked() -> None:
    p = pairs(2)
    candidates = [Candidate(p[0], 2 * GiB), Candidate(p[1], 50 * GiB)]
    for seed in range(50):
        assert pick_pair(candidates, 10 * GiB, GiB, random.Random(seed)) is p[1]


def test_probe_order_puts_one_member_of_every_pair_before_the_partners() -> None:
    pool = StoragePool(pairs(3), placement_threshold=GiB, rng=random.Random(7))
    firsts_seen = set()
    for _ in range(50):
        order = pool.probe_order()
        assert len(order) == 6
        assert len(set(order)) == 6
        first_round = {pool.pair_of[d.root].index for d in order[:3]}
        assert first_round == {0, 1, 2}
        firsts_seen.add(order[0].root)
    assert len(firsts_seen) > 3  # random pairs and random members come first


def real_pool(tmp_path: Path, n: int = 2) -> StoragePool:
    made = []
    for i in range(n):
        members = []
        for m in range(2):
            root = tmp_path / f"p{i}m{m}"
            root.mkdir()
            members.append(Disk(str(root), require_mount=False))
        made.append(Pair(i, tuple(members), True))
    return StoragePool(made, placement_threshold=0, rng=random.Random(3))


def test_reservations_steer_but_never_refuse(tmp_path: Path) -> None:
    """Bytes promised by uploads in flight steer new blobs to other pairs; they never make a
    pair whose disks have room refuse one (DESIGN §3)."""
    pool = real_pool(tmp_path, 1)
    free = pool.pairs[0].members[0].free_bytes()
    with pool.reservation(pool.pairs[0], free // 2 + 4096 * 1024):
        assert pool.reserved(pool.pairs[0]) > free // 2
        assert pool.choose_pair(free // 2, lambda pair: True) is pool.pairs[0]  # the disks have room
        with pytest.raises(InsufficientStorage):
            pool.choose_pair(free * 2, lambda pair: True)  # they have not
    assert pool.reserved(pool.pairs[0]) == 0
    p = pairs(2)
    full_of_promises = Candidate(p[0], -GiB, 50 * GiB)
    for seed in range(20):
        assert pick_pair([full_of_promises, Candidate(p[1], 10 * GiB, 10 * GiB)], 100, GiB, random.Random(seed)) is p[1]
    assert pick_pair([full_of_promises], 100, GiB, random.Random(1)) is p[0]


def test_unhealthy_and_unwritable_pairs_take_no_writes(tmp_path: Path) -> None:
    pool = real_pool(tmp_path, 2)
    healthy_only_1 = lambda pair: pair.index == 1  # noqa: E731
    for _ in range(20):
        assert pool.choose_pair(1, healthy_only_1) is pool.pairs[1]
    readonly = StoragePool([pool.pairs[0], Pair(1, pool.pairs[1].members, False)], placement_threshold=0)
    for _ in range(20):
        assert readonly.choose_pair(1, lambda pair: True) is readonly.pairs[0]
    with pytest.raises(StorageUnavailable, match="unhealthy"):  # down, not full: worth a retry
        readonly.choose_pair(1, healthy_only_1)
    with pytest.raises(InsufficientStorage):
        readonly.choose_pair(1 << 60, lambda pair: True)
