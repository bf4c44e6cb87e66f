"""The devserver's modes for who sees what (doc/DCOR.md §4, §5, §11), with dclab's DCOR client
run against them: collection members read the collection's private datasets, drafts and
deleted datasets are never searched, group listings may order equal titles anyhow."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dclab
import numpy as np
import pytest
import requests
from dclab.rtdc_dataset.fmt_dcor.api import DCORAccessError

from dcorfs.devserver.datadir import write_json
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.devserver.server import DevServer
from dcorfs.devserver.site import SiteOptions

from ..conftest import api, resource
from ..dclab_client import forget_api_keys, open_remote  # noqa: F401 (fixture)
from .test_devserver_ckan import error, ok

pytestmark = [
    pytest.mark.filterwarnings("ignore::dclab.http_utils.ConnectionTimeoutWarning"),
    # private data: dclab removes the condensed file's own basins it cannot reach
    pytest.mark.filterwarnings("ignore:Removed unavailable basin:UserWarning"),
]

ACCESS_TOKENS = {
    "carol": "carol-collection-member-token-0123",  # member of the collection only
    "dave": "dave-member-of-nothing-token-4567",
    "erin": "erin-member-of-the-lab-token-89ab",  # member of the circle
}
STUDIES = {  # dataset -> dataset.json
    "shared-secret": {"private": True, "collections": ["shared-work"]},
    "lab-secret": {"private": True},
    "draft-study": {"state": "draft", "collections": ["shared-work"]},
    "deleted-study": {"state": "deleted"},
    "open-study": {"collections": ["shared-work"]},
}


def make_access_site(root: Path) -> Path:
    """One circle, `closed-lab`, with a private dataset shared through a collection, one
    that is not, a draft, a deleted and a public dataset (doc/DCOR.md §11)."""
    write_json(
        root / "dcor.json",
        {
            "users": {
                "carol": {"token": ACCESS_TOKENS["carol"], "collections": ["shared-work"]},
                "dave": {"token": ACCESS_TOKENS["dave"]},
                "erin": {"token": ACCESS_TOKENS["erin"], "circles": ["closed-lab"]},
            },
            "collections": {"shared-work": {"title": "Shared work"}},
        },
    )
    for number, (name, meta) in enumerate(STUDIES.items()):
        write_json(root / "closed-lab" / name / "dataset.json", {"title": name, **meta})
        write_rtdc(
            root / "closed-lab" / name / "M001_data.rtdc",
            SampleSpec(events=60, seed=40 + number, traces=False),
        )
    return root


@pytest.fixture(scope="module")
def access_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    with DevServer(make_access_site(tmp_path_factory.mktemp("access"))) as server:
        yield server


def searched(server: DevServer, token: str = "", **params: Any) -> list[str]:
    answer = ok(api(server, "package_search", token, include_private="true", rows=1000, **params))
    return sorted(ds["name"] for ds in answer["results"])


# -- collections grant access; drafts and deleted datasets (§11) ----------------------------


def test_search_finds_active_datasets_only(access_site: DevServer) -> None:
    assert searched(access_site) == ["open-study"]
    assert searched(access_site, ACCESS_TOKENS["dave"]) == ["open-study"]
    # a collection member finds the collection's private dataset, not the circle's other one
    assert searched(access_site, ACCESS_TOKENS["carol"]) == ["open-study", "shared-secret"]
    assert searched(access_site, ACCESS_TOKENS["erin"]) == [
        "lab-secret",
        "open-study",
        "shared-secret",
    ]
    assert searched(access_site, ACCESS_TOKENS["carol"], fq="groups:shared-work") == [
        "open-study",
        "shared-secret",
    ]
    # as CKAN: asked for, drafts are found by those who may read them
    assert searched(access_site, ACCESS_TOKENS["erin"], include_drafts="true") == [
        "draft-study",
        "lab-secret",
        "open-study",
        "shared-secret",
    ]
    assert searched(access_site, ACCESS_TOKENS["dave"], fq="+state:deleted") == []
    group = ok(api(access_site, "group_show", ACCESS_TOKENS["carol"], id="shared-work"))
    assert group["package_count"] == 2  # the draft is not counted


def test_package_show_of_drafts_and_deleted_datasets(access_site: DevServer) -> None:
    for name, state in (("draft-study", "draft"), ("deleted-study", "deleted")):
        # CKAN's permission labels: not active → only for members (ckan lib/plugins.py)
        error(api(access_site, "package_show", id=name), 403, "Authorization Error")
        error(
            api(access_site, "package_show", ACCESS_TOKENS["dave"], id=name),
            403,
            "Authorization Error",
        )
        shown = ok(api(access_site, "package_show", ACCESS_TOKENS["erin"], id=name))
        assert shown["state"] == state
    # carol is a member of the draft's collection: group labels are the dataset's in any state
    assert ok(api(access_site, "package_show", ACCESS_TOKENS["carol"], id="draft-study"))
    shared = ok(api(access_site, "package_show", ACCESS_TOKENS["carol"], id="shared-secret"))
    assert shared["private"] is True and shared["state"] == "active"
    error(
        api(access_site, "package_show", ACCESS_TOKENS["carol"], id="lab-secret"),
        403,
        "Authorization Error",
    )


def test_a_drafts_objects_are_not_public(access_site: DevServer) -> None:
    entry = resource(access_site, "draft-study", "M001_data.rtdc")
    record = ok(api(access_site, "resource_show", ACCESS_TOKENS["erin"], id=entry["id"]))
    answer = requests.get(record["s3_url"], headers={"Range": "bytes=0-9"}, timeout=10)
    assert answer.status_code == 403  # the public=true tag comes once the dataset is active
    public = resource(access_site, "open-study", "M001_data.rtdc")
    url = ok(api(access_site, "resource_show", id=public["id"]))["s3_url"]
    assert requests.get(url, headers={"Range": "bytes=0-9"}, timeout=10).status_code == 206


def test_dclab_reads_a_collections_private_dataset_as_a_member(access_site: DevServer) -> None:
    entry = resource(access_site, "shared-secret", "M001_data.rtdc")
    with (
        open_remote(access_site, entry["id"], ACCESS_TOKENS["carol"]) as remote,
        dclab.new_dataset(entry["path"]) as local,
    ):
        np.testing.assert_array_equal(remote["deform"], local["deform"])
        np.testing.assert_array_equal(remote["image"][5], local["image"][5])


@pytest.mark.parametrize("user", ["", "dave"])
def test_dclab_is_refused_a_collections_private_dataset_otherwise(
    access_site: DevServer, user: str
) -> None:
    entry = resource(access_site, "shared-secret", "M001_data.rtdc")
    with pytest.raises(DCORAccessError, match="not authorized to read resource"):
        open_remote(access_site, entry["id"], ACCESS_TOKENS.get(user, ""))


@pytest.mark.parametrize("dataset", ["draft-study", "deleted-study"])
def test_dclab_and_drafts_or_deleted_datasets(access_site: DevServer, dataset: str) -> None:
    entry = resource(access_site, dataset, "M001_data.rtdc")
    for token in ("", ACCESS_TOKENS["dave"]):
        with pytest.raises(DCORAccessError, match="not authorized to read resource"):
            open_remote(access_site, entry["id"], token)


def test_state_hook_changes_what_is_searched(tmp_path: Path) -> None:
    with DevServer(make_access_site(tmp_path / "data")) as server:
        hook = f"{server.url}/_devserver/state"
        change = {"dataset": "draft-study", "state": "active"}
        assert requests.put(hook, json=change, timeout=10).json() == change
        assert searched(server) == ["draft-study", "open-study"]
        requests.put(hook, json={"dataset": "open-study", "state": "deleted"}, timeout=10)
        assert searched(server) == ["draft-study"]
        entry = resource(server, "draft-study", "M001_data.rtdc")
        with open_remote(server, entry["id"]) as remote:  # now public and active
            assert len(remote) == 60
        bad = requests.put(hook, json={"dataset": "open-study", "state": "gone"}, timeout=10)
        assert bad.status_code == 400


# -- circles and collections (§5) -----------------------------------------------------------


def test_equal_titles_may_repeat_or_skip_across_all_fields_pages(tmp_path: Path) -> None:
    """CKAN sorts group listings by title with no tie-breaker: 40 circles of one title, asked
    in pages of 25, come back with repeats and gaps; by name, pages are exact."""
    root = tmp_path / "data"
    for i in range(40):
        write_json(root / f"twin-{i:02d}" / "circle.json", {"title": "Twin lab"})
        (root / f"twin-{i:02d}" / f"data-{i:02d}").mkdir(parents=True)
        (root / f"twin-{i:02d}" / f"data-{i:02d}" / "notes.txt").write_text(f"{i}\n")
    options = SiteOptions(title_ties_unordered=True)
    with DevServer(root, options=options) as server:
        names = {f"twin-{i:02d}" for i in range(40)}
        for _ in range(5):
            pages = [
                ok(api(server, "organization_list", all_fields="true", offset=offset))
                for offset in (0, 25)
            ]
            listed = [g["name"] for page in pages for g in page]
            if len(set(listed)) < len(names):
                break
        else:
            pytest.fail("five times no repeat across pages of equal titles")
        by_name = [
            ok(api(server, "organization_list", sort="name asc", limit=25, offset=offset))
            for offset in (0, 25, 50)
        ]
        assert by_name[2] == [] and sorted(by_name[0] + by_name[1]) == sorted(names)


# -- listing refresh on a real-size site (§4) -----------------------------------------------


def test_search_latency(tmp_path: Path) -> None:
    options = SiteOptions(search_latency=0.5)
    with DevServer(make_access_site(tmp_path / "data"), options=options) as server:
        elapsed = requests.get(
            f"{server.url}/api/3/action/package_search", timeout=10
        ).elapsed.total_seconds()
        assert elapsed >= 0.5
        assert requests.get(f"{server.url}/api/3/action/status_show", timeout=10).ok


def test_dclab_reads_through_the_listing_modes(tmp_path: Path) -> None:
    """doc/DCOR.md §4, §5: dclab's client does not list (it asks `resource_show` and dcserv
    only), so slow search pages and title ties without tie-breaker must leave what it reads
    as it is: run against both modes at once, public and through a collection."""
    options = SiteOptions(search_latency=0.5, title_ties_unordered=True)
    with DevServer(make_access_site(tmp_path / "data"), options=options) as server:
        for dataset, token in (("open-study", ""), ("shared-secret", ACCESS_TOKENS["carol"])):
            entry = resource(server, dataset, "M001_data.rtdc")
            with (
                open_remote(server, entry["id"], token) as remote,
                dclab.new_dataset(entry["path"]) as local,
            ):
                np.testing.assert_array_equal(remote["deform"], local["deform"])
                np.testing.assert_array_equal(remote["image"][7], local["image"][7])
        stats = requests.get(f"{server.url}/_devserver/stats", timeout=10).json()
        assert "package_search" not in stats.get("api", {}), stats
