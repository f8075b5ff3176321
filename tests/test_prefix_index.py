"""The prefix cache's parts that need no model: the radix trie and the disk tier's file checks."""

from __future__ import annotations

import random
from pathlib import Path

from edged.backends.prefix_disk import HEADER, PrefixDisk
from edged.backends.prefix_index import PrefixIndex


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_longest_prefix_matches_a_brute_force_search() -> None:
    rng = random.Random(7)
    base = [rng.randrange(50) for _ in range(300)]
    index = PrefixIndex()
    held: dict[str, list[int]] = {}
    for i in range(40):
        cut = rng.randrange(len(base))
        tokens = base[:cut] + [rng.randrange(50) for _ in range(rng.randrange(60))]
        holder = f"h{i % 12}"  # re-inserting replaces what a holder had
        index.insert(holder, tokens)
        held[holder] = tokens
        if rng.random() < 0.2:
            gone = rng.choice(sorted(held))
            index.remove(gone)
            del held[gone]
        query = base[: rng.randrange(len(base))] + [rng.randrange(50) for _ in range(5)]
        best = max((common(t, query) for t in held.values()), default=0)
        holder_found, n = index.longest(query)
        assert n == best
        if best:
            assert common(held[holder_found], query) == best  # type: ignore[index]
        else:
            assert holder_found is None


def test_empty_index_and_removal_of_everything() -> None:
    index = PrefixIndex()
    assert index.longest([1, 2, 3]) == (None, 0)
    index.insert("a", [1, 2, 3])
    index.insert("b", [1, 2, 4])
    assert index.longest([1, 2, 4, 9]) == ("b", 3)
    index.remove("a")
    index.remove("b")
    assert index.longest([1, 2, 3]) == (None, 0)
    assert len(index) == 0


def saved(directory: Path, tokens: tuple[int, ...], state: bytes) -> Path:
    disk = PrefixDisk(directory, "model-key", budget_bytes=10_000_000)
    disk.save(tokens, state, lambda _entry: None)
    disk.close()
    (path,) = (directory / "model-key").glob("*.pfx")
    return path


def test_an_intact_entry_loads_and_bad_ones_are_deleted_not_used(tmp_path: Path) -> None:
    tokens, state = tuple(range(100)), bytes(range(256)) * 40
    path = saved(tmp_path, tokens, state)
    disk = PrefixDisk(tmp_path, "model-key", 10_000_000)
    (entry,) = disk.scan()
    assert entry.tokens == tokens
    assert disk.load(entry) == state

    data = bytearray(path.read_bytes())
    data[HEADER.size + 4 * len(tokens) + 5] ^= 1  # one bit of the state
    path.write_bytes(bytes(data))
    assert disk.load(entry) is None
    assert disk.rejected == 1 and not path.exists()

    path = saved(tmp_path, tokens, state)
    path.write_bytes(path.read_bytes()[:-10])  # truncated: caught by the size check at scan
    fresh = PrefixDisk(tmp_path, "model-key", 10_000_000)
    assert fresh.scan() == [] and fresh.rejected == 1 and not path.exists()


def test_another_model_key_never_sees_the_entries(tmp_path: Path) -> None:
    saved(tmp_path, (1, 2, 3), b"state")
    assert PrefixDisk(tmp_path, "other-model", 10_000_000).scan() == []


def test_the_disk_tier_stays_within_its_budget(tmp_path: Path) -> None:
    disk = PrefixDisk(tmp_path, "k", budget_bytes=5_000)
    for i in range(5):
        disk.save((i, i + 1), bytes(2_000), lambda _entry: None)
    disk.close()
    files = list((tmp_path / "k").glob("*.pfx"))
    assert sum(f.stat().st_size for f in files) <= 5_000
    assert len(files) == 2


def test_an_unwritable_directory_is_reported_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    disk = PrefixDisk(blocker, "k", 1_000_000)
    assert disk.scan() == []
    disk.save((1,), b"s", lambda _entry: None)
    disk.close()
    assert disk.errors and disk.saves == 0
