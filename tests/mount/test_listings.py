"""Listings of a real mount against the devserver's site modes (doc/DCOR.md §4, §5, §11): a
stale listing is refreshed in the background, group listings are complete however CKAN orders
equal titles, collection members see the collection's private datasets, drafts and deleted
datasets never appear."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dclab
import numpy as np
import pytest
import requests

from dcorfs.devserver.datadir import write_json

from ..conftest import ServerProcess, info
from ..layers.test_devserver_access import ACCESS_TOKENS, make_access_site
from ..mounts import eventually, mounted

VISIBLE = {  # what each user's mount lists of the access site
    "carol": ["open-study", "shared-secret"],
    "erin": ["lab-secret", "open-study", "shared-secret"],
}


def names_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def set_state(server: ServerProcess, dataset: str, state: str) -> None:
    change = {"dataset": dataset, "state": state}
    requests.put(f"{server.url}/_devserver/state", json=change, timeout=10).raise_for_status()


@contextmanager
def served(data: Path, *options: str) -> Iterator[ServerProcess]:
    server = ServerProcess(data, *options)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def slow_search(tmp_path: Path) -> Iterator[ServerProcess]:
    """The access site, each package_search taking 3 s."""
    with served(make_access_site(tmp_path / "data"), "--search-latency", "3") as server:
        yield server


# -- listing refresh (§4) ---------------------------------------------------------------------


def test_a_stale_listing_is_shown_at_once_while_it_is_refreshed(
    slow_search: ServerProcess, tmp_path: Path
) -> None:
    with mounted(
        tmp_path / "mnt", slow_search.url, tmp_path / "cache", "--dir-cache-time", "1"
    ) as mnt:
        datasets = mnt / "datasets"
        assert names_in(datasets) == ["open-study"]  # the first listing is waited for
        set_state(slow_search, "draft-study", "active")  # its upload finished
        time.sleep(1.5)  # the listing is stale
        # the reader gets the older listing while the refresh (3 s) is under way: it does not
        # wait for it
        assert names_in(datasets) == ["open-study"]
        assert eventually(lambda: names_in(datasets) == ["draft-study", "open-study"])
        set_state(slow_search, "open-study", "deleted")
        assert eventually(lambda: names_in(datasets) == ["draft-study"])


def test_a_dataset_opened_by_its_path_goes_once_deleted(tmp_path: Path) -> None:
    """A dataset opened by its path on a new cache (asked of CKAN alone, not listed) is gone
    once CKAN no longer shows it, as a listed one is (after `--dir-cache-time`)."""
    with served(make_access_site(tmp_path / "data")) as server:
        options = ("--dir-cache-time", "1")
        with mounted(tmp_path / "mnt", server.url, tmp_path / "cache", *options) as mnt:
            study = mnt / "datasets" / "open-study"
            assert "dataset.json" in names_in(study)
            set_state(server, "open-study", "deleted")

            def gone() -> bool:
                try:
                    study.stat()
                except OSError as exc:
                    return exc.errno in (errno.ENOENT, errno.EACCES)
                return False

            assert eventually(gone)


def test_a_real_size_listing_takes_pages_each_with_its_own_deadline(tmp_path: Path) -> None:
    """1001 datasets: two pages of package_search, 2.5 s each, with `--timeout 4`: the whole
    listing takes longer than the timeout and longer than the 5 s a stale listing used to be
    given, each page less."""
    data = tmp_path / "data"
    for number in range(1001):
        ds = data / "big-lab" / f"set-{number:04d}"
        ds.mkdir(parents=True)
        (ds / "notes.txt").write_text(f"{number}\n")
    write_json(data / "big-lab" / "zz-late" / "dataset.json", {"state": "draft"})
    (data / "big-lab" / "zz-late" / "notes.txt").write_text("late\n")
    with served(data, "--search-latency", "2.5") as server:
        options = ("--dir-cache-time", "1", "--timeout", "4")
        with mounted(tmp_path / "mnt", server.url, tmp_path / "cache", *options) as mnt:
            datasets = mnt / "datasets"
            first = names_in(datasets)
            assert len(first) == 1001 and "zz-late" not in first
            set_state(server, "zz-late", "active")
            time.sleep(1.5)
            assert names_in(datasets) == first  # at once, the refresh is under way
            assert eventually(lambda: "zz-late" in names_in(datasets))
            assert len(names_in(datasets)) == 1002


# -- circles and collections (§5) ------------------------------------------------------------


def test_circles_and_collections_of_equal_titles_are_listed_whole(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sets = {f"set-{i:02d}": {"title": "Same set"} for i in range(30)}
    write_json(data / "dcor.json", {"collections": sets})
    twins = [f"twin-{i:02d}" for i in range(40)]
    for i, twin in enumerate(twins):
        write_json(data / twin / "circle.json", {"title": "Twin lab"})
        write_json(
            data / twin / f"data-{i:02d}" / "dataset.json", {"collections": [f"set-{i % 30:02d}"]}
        )
        (data / twin / f"data-{i:02d}" / "notes.txt").write_text(f"{i}\n")
    with served(data, "--title-ties-unordered") as server:
        server.stats.reset()
        with mounted(tmp_path / "mnt", server.url, tmp_path / "cache") as mnt:
            assert names_in(mnt / "circles") == twins
            assert names_in(mnt / "collections") == sorted(sets)
            assert names_in(mnt / "circles" / "twin-07") == ["data-07"]
            assert names_in(mnt / "collections" / "set-03") == ["data-03", "data-33"]
        calls = server.stats.snapshot()["api"]
        assert calls.get("organization_show", 0) == calls.get("group_show", 0) == 0
        assert calls["organization_list"] == calls["group_list"] == 2  # 40 names, then []


# -- collections grant access; drafts and deleted datasets (§11) ------------------------------


@pytest.fixture(scope="module")
def access_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(make_access_site(tmp_path_factory.mktemp("access"))) as server:
        yield server


@pytest.mark.parametrize("user", ["carol", "erin"])
def test_members_see_what_they_may_and_never_drafts_or_deleted_datasets(
    access_process: ServerProcess, tmp_path: Path, user: str
) -> None:
    entries = {e["dataset"]: e for e in info(access_process)}
    token = ACCESS_TOKENS[user]
    with mounted(tmp_path / "mnt", access_process.url, tmp_path / "cache", token=token) as mnt:
        assert names_in(mnt / "datasets") == VISIBLE[user]
        assert names_in(mnt / "circles" / "closed-lab") == VISIBLE[user]
        assert names_in(mnt / "collections" / "shared-work") == ["open-study", "shared-secret"]
        # the collection's private dataset reads
        shared = entries["shared-secret"]
        deform = np.load(mnt / "datasets" / "shared-secret" / "M001_data" / "deform.npy")
        with dclab.new_dataset(shared["path"]) as local:
            np.testing.assert_array_equal(deform, local["deform"][:])
        # drafts and deleted datasets are never listed; where CKAN shows them (to members of
        # their circle or collections) the mount does not either, else CKAN refuses them
        for hidden in ("draft-study", "deleted-study"):
            shown_by_ckan = user == "erin" or hidden == "draft-study"
            for path in (mnt / "datasets" / hidden, mnt / "by-id" / entries[hidden]["id"]):
                with pytest.raises(OSError) as caught:
                    path.stat()
                assert caught.value.errno == (errno.ENOENT if shown_by_ckan else errno.EACCES)
        if user == "carol":  # not a member of the circle: its other private dataset refuses
            with pytest.raises(PermissionError):
                (mnt / "datasets" / "lab-secret").stat()
