"""`dcorfs warmup`'s parts on local files (`admin.warmup`): which files it reads, the journal
that lets an interrupted run resume (torn lines, other hosts, a completed run forgotten), and the
readers (every byte read, failures reported, not journaled)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from tqdm import tqdm

from dcorfs.admin.warmup import Item, Journal, Mount, Reader, collect, warmup


def tree(root: Path) -> Mount:
    (root / "datasets" / "a").mkdir(parents=True)
    (root / ".dcorfs").mkdir()
    (root / ".dcorfs" / "status.json").write_text("{}")
    (root / "datasets" / "a" / "deform.npy").write_bytes(b"x" * 1000)
    (root / "datasets" / "a" / "empty.txt").write_bytes(b"")
    (root / "README.txt").write_bytes(b"hello")
    return Mount(root=root, host="https://h", cache_dir=root / "cache", cache_limit=1 << 30)


def test_collect_reads_regular_nonempty_files_but_not_the_status(tmp_path: Path) -> None:
    mount = tree(tmp_path)
    found = {item.relative: item.size for item in collect(mount, tmp_path)}
    assert found == {"README.txt": 5, "datasets/a/deform.npy": 1000}
    assert [i.relative for i in collect(mount, tmp_path / "README.txt")] == ["README.txt"]


def test_the_journal_resumes_and_forgets_a_completed_run(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    one, two = Item(tmp_path / "1", "x/1", 10), Item(tmp_path / "2", "x/2", 20)
    journal = Journal(path, "https://h")
    journal.record(one)
    with path.open("a") as handle:  # a line torn by a crash, and another host's entry
        handle.write('{"host": "https://h", "pa\n')
        handle.write(json.dumps({"host": "https://other", "path": "x/2", "size": 20}) + "\n")
    again = Journal(path, "https://h")
    assert one in again and two not in again
    assert Item(one.path, one.relative, 11) not in again  # another size: another version
    again.record(two)
    again.forget([one, two])
    assert one not in again and two not in again
    left = [json.loads(line) for line in path.read_text().splitlines()]
    assert left == [{"host": "https://other", "path": "x/2", "size": 20}]


def test_readers_read_every_byte_and_journal_only_what_they_finished(tmp_path: Path) -> None:
    mount = tree(tmp_path)
    items = list(collect(mount, tmp_path))
    items.append(Item(tmp_path / "gone", "gone", 3))  # fails: not there
    journal = Journal(tmp_path / "journal", mount.host)
    with tqdm(total=sum(i.size for i in items), file=io.StringIO()) as bar:
        reader = Reader(bar, journal, items, jobs=3)
        assert reader.join(30)
    assert reader.finished == 2 and reader.nbytes == 1005
    assert [item.relative for item, _ in reader.failed] == ["gone"]
    assert all(item in journal for item in items[:2]) and items[2] not in journal


@pytest.mark.parametrize(("limit", "warned"), [(0, True), (1000, True), (1 << 20, False)])
def test_a_warmup_larger_than_the_cache_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, warned: bool
) -> None:
    """A warm-up of more bytes than the disk cache holds says so before it reads, also for
    a mount without a disk cache (`--cache-size 0`: nothing warmed stays)."""
    root = tmp_path / "mnt"
    (root / ".dcorfs").mkdir(parents=True)
    report = {"host": "h", "cache_dir": str(tmp_path / "cache"), "cache": {"disk_limit": limit}}
    (root / ".dcorfs" / "status.json").write_text(json.dumps(report))
    (root / "a.npy").write_bytes(bytes(5000))
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == root)
    out = io.StringIO()
    assert warmup([root / "a.npy"], dry_run=True, again=False, jobs=1, out=out) == 0
    assert ("warning: the cache holds" in out.getvalue()) is warned, out.getvalue()
