"""The proof of fidelity: dclab's own DCOR client reads through the devserver."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dclab
import numpy as np
import pytest
import requests
from dclab.rtdc_dataset.fmt_dcor.api import APIHandler, DCORAccessError

from dcorfs.devserver.server import DevServer

from ..conftest import (
    FIXTURE_FILES,
    LAG,
    TOKENS,
    ServerProcess,
    api,
    lag_over,
    needs_fixtures,
    resource,
)
from ..dclab_client import forget_api_keys, open_remote  # noqa: F401 (fixture)

pytestmark = [
    # dclab retries its 0.5 s requests when the machine is busy and says so: not a failure
    pytest.mark.filterwarnings("ignore::dclab.http_utils.ConnectionTimeoutWarning"),
]


def assert_same_as_local(remote: Any, local: Any, events: list[int] | None = None) -> None:
    assert len(remote) == len(local)
    scalars = [f for f in local.features_innate if dclab.dfn.scalar_feature_exists(f)]
    assert scalars
    for feat in scalars:
        np.testing.assert_array_equal(remote[feat][:], local[feat][:], err_msg=feat)
    picks = range(len(local)) if events is None else events
    for feat in ("image", "mask", "image_bg"):
        if feat in local.features_innate:
            for i in picks:
                np.testing.assert_array_equal(
                    remote[feat][i], local[feat][i], err_msg=f"{feat}[{i}]"
                )
    if "trace" in local.features_innate:
        assert sorted(remote["trace"]) == sorted(local["trace"])
        for name in local["trace"]:
            for i in picks:
                np.testing.assert_array_equal(remote["trace"][name][i], local["trace"][name][i])
    for name in local.logs:
        assert list(remote.logs[name]) == list(local.logs[name]), name
    assert "dclab-condense" in remote.logs  # from the condensed file, as on DCOR
    assert sorted(remote.tables) == sorted(local.tables)
    for name in local.tables:
        table = local.tables[name]
        for column in table.keys():  # noqa: SIM118 (a MetaTable, not a dict)
            np.testing.assert_array_equal(
                np.ravel(remote.tables[name][column]), np.ravel(table[column]), err_msg=column
            )
    for section in ("experiment", "imaging", "setup"):
        for key, value in local.config[section].items():
            assert remote.config[section][key] == value, (section, key)


def test_generated_public_resource(devserver: DevServer) -> None:
    entry = resource(devserver, "generated", "M001_data.rtdc")
    with open_remote(devserver, entry["id"]) as remote, dclab.new_dataset(entry["path"]) as local:
        assert_same_as_local(remote, local, events=[0, 1, 150, len(local) - 1])
        # features DCOR computed into the condensed file are there too
        np.testing.assert_allclose(remote["volume"], local["volume"])
        np.testing.assert_array_equal(remote["time"], local["time"])


@pytest.mark.filterwarnings("ignore:Removed unavailable basin:UserWarning")
def test_generated_private_resource_with_token(devserver: DevServer) -> None:
    # With DCOR's default intra-dataset basin setting the condensed basin advertises `image`;
    # dclab then probes the condensed file's own basins, which are unavailable for private
    # data, removes them (the warning) and falls back to the resource basin, as on DCOR.
    entry = resource(devserver, "secret-study", "M001_data.rtdc")
    with (
        open_remote(devserver, entry["id"], TOKENS["alice"]) as remote,
        dclab.new_dataset(entry["path"]) as local,
    ):
        assert_same_as_local(remote, local, events=[0, 77, len(local) - 1])


@pytest.mark.parametrize("token", ["", TOKENS["bob"], "not-a-token"])
def test_private_resource_refused_without_valid_token(devserver: DevServer, token: str) -> None:
    entry = resource(devserver, "secret-study", "M001_data.rtdc")
    with pytest.raises(
        DCORAccessError, match="Access denied: User .*not authorized to read resource"
    ):
        open_remote(devserver, entry["id"], token)


@needs_fixtures
@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[p.name for p in FIXTURE_FILES])
# 2020-10_image_bg.rtdc stores integer ROI positions as floats; dclab says so on every read
@pytest.mark.filterwarnings("ignore::dclab.rtdc_dataset.config.WrongConfigurationTypeWarning")
def test_field_fixture(devserver: DevServer, path: Path) -> None:
    entry = resource(devserver, "field-fixtures", path.name)
    with open_remote(devserver, entry["id"]) as remote, dclab.new_dataset(path) as local:
        assert_same_as_local(remote, local)


@pytest.mark.filterwarnings("ignore:Removed unavailable basin:UserWarning")
# dclab drops the basin of an expired URL without closing its HTTP connection; collected at
# some point of this test, its socket warns (dclab's leak)
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)
def test_expired_presigned_url_is_renewed_by_dclab(data_dir: Path, devserver: DevServer) -> None:
    # A devserver process of its own: dclab reads through h5py here, holding h5py's lock
    # while it waits for the server, and a cycle collection in an in-process server's thread
    # that frees an h5py object waits for that lock (the read then stalled until dclab's
    # timeout, ~100 s, one run in six, and its basin was dropped: "cannot get its data").
    # Scaled-down clock: URLs live ~3 s (DCOR: 3600 s) and dclab re-asks for basins after
    # 0.5 s (dclab: 600 s); dclab's own 30 s safety margin then renews on every access.
    server = ServerProcess(data_dir)  # (`devserver`: the data are condensed by then)
    try:
        faults = requests.put(
            f"{server.url}/_devserver/faults", json={"url_lifetime": 3.0}, timeout=30
        )
        assert faults.status_code == 200, faults.text
        entry = resource(server, "secret-study", "M001_data.rtdc")
        with (
            open_remote(server, entry["id"], TOKENS["alice"]) as remote,
            dclab.new_dataset(entry["path"]) as local,
        ):
            remote.cache_basin_dict_time = 0.5
            np.testing.assert_array_equal(remote["deform"], local["deform"])
            first_urls = [b["urls"][0] for b in remote.basins_get_dicts()]
            time.sleep(4.0)
            # the URLs dclab was given have expired on the server ...
            for url in first_urls:
                answer = requests.get(url, headers={"Range": "bytes=0-9"}, timeout=10)
                assert answer.status_code == 403 and b"Request has expired" in answer.content
            basin_calls = server.stats.snapshot()["api"]["dcserv"]
            # ... yet reading goes on: dclab asked for new ones
            np.testing.assert_array_equal(remote["image"][42], local["image"][42])
            np.testing.assert_array_equal(
                remote["trace"]["fl2_raw"][7], local["trace"]["fl2_raw"][7]
            )
            assert server.stats.snapshot()["api"]["dcserv"] > basin_calls
            assert [b["urls"][0] for b in remote.basins_get_dicts()] != first_urls
    finally:
        server.close()


def test_dclab_with_intra_basin_features_off(data_dir: Path, tmp_path: Path) -> None:
    """With the option off (dc_serve's test setting) the condensed basin lists scalars only
    and dclab reads images straight from the resource basin, without nested probes."""
    from dcorfs.devserver.site import SiteOptions

    options = SiteOptions(intra_basin_features=False)
    with DevServer(data_dir, state_dir=tmp_path / "state", options=options) as server:
        entry = resource(server, "secret-study", "M001_data.rtdc")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", category=dclab.http_utils.ConnectionTimeoutWarning)
            remote = open_remote(server, entry["id"], TOKENS["alice"])
            with remote, dclab.new_dataset(entry["path"]) as local:
                assert_same_as_local(remote, local, events=[3, 99])


# -- DCOR in motion (doc/DCOR.md §1, §2, §7): dclab against each mode ------------------------


def _basin(remote: Any, kind: str) -> Any:
    return next(b for b in remote.basins if b.name.startswith(kind))


def test_dclab_with_the_condensed_file_missing(data_dir: Path, devserver: DevServer) -> None:
    """The condensed basin is listed without `features`; its object answers an anonymous GET
    with 403 (a presigned one with 404); dclab marks it unavailable and reads every feature
    from the resource basin. `volume` is no basin's then: dclab computes it from `contour`
    (an ancillary feature), a mount of stored features has none."""
    from dcorfs.devserver.site import SiteOptions

    entry = resource(devserver, "generated", "M001_data.rtdc")
    private = resource(devserver, "secret-study", "M001_data.rtdc")
    with DevServer(data_dir, options=SiteOptions(condensed=False)) as server:
        status, basins = api(server, "dcserv", id=entry["id"], query="basins", version="2")
        assert status == 200
        condensed, original = basins["result"]
        assert condensed["name"].startswith("condensed") and "features" not in condensed
        assert "features" in original
        answer = requests.get(condensed["urls"][0], timeout=10)
        assert answer.status_code == 403 and b"<Code>AccessDenied</Code>" in answer.content
        status, basins = api(
            server, "dcserv", TOKENS["alice"], id=private["id"], query="basins", version="2"
        )
        answer = requests.get(basins["result"][0]["urls"][0], timeout=10)
        assert answer.status_code == 404 and b"<Code>NoSuchKey</Code>" in answer.content
        with open_remote(server, entry["id"]) as remote, dclab.new_dataset(entry["path"]) as local:
            assert not _basin(remote, "condensed").is_available()
            assert _basin(remote, "resource").is_available()
            assert "dclab-condense" not in remote.logs
            assert "volume" not in remote.features_basin
            assert "volume" in remote.features_ancillary
            for feat in local.features_innate:
                if dclab.dfn.scalar_feature_exists(feat):
                    np.testing.assert_array_equal(remote[feat][:], local[feat][:], err_msg=feat)
            np.testing.assert_array_equal(remote["image"][5], local["image"][5])


def test_dclab_sees_a_condensed_file_that_appears(data_dir: Path, devserver: DevServer) -> None:
    """Before condensing has run, as with the file missing; after, a new client finds the
    condensed basin's `features`, its object and the condensing logs. (The server in a
    process of its own, as for every client reading with h5py while a lag ends: see
    `ServerProcess`.)"""
    entry = resource(devserver, "generated", "M001_data.rtdc")
    with ServerProcess(data_dir, "--condensed-lag", str(LAG)) as server:
        with open_remote(server, entry["id"]) as remote:
            assert not _basin(remote, "condensed").is_available()
            assert "dclab-condense" not in remote.logs
        lag_over(server)
        with open_remote(server, entry["id"]) as remote, dclab.new_dataset(entry["path"]) as local:
            assert _basin(remote, "condensed").is_available()
            assert "volume" in remote.features_basin
            assert "dclab-condense" in remote.logs
            np.testing.assert_allclose(remote["volume"], local["volume"])


@pytest.mark.filterwarnings("ignore:Removed unavailable basin:UserWarning")
@pytest.mark.filterwarnings("ignore::dclab.rtdc_dataset.core.FeatureShouldExistButNotFoundWarning")
def test_dclab_with_late_fields_and_public_tag(data_dir: Path, devserver: DevServer) -> None:
    """Until DCOR's jobs ran, records lack the fields they fill and the original is not
    tagged public: dclab finds the resource basin unavailable (403) and serves the scalar
    features of the condensed file only; afterwards everything."""
    entry = resource(devserver, "generated", "M001_data.rtdc")
    with ServerProcess(data_dir, "--fields-lag", str(LAG)) as server:
        status, record = api(server, "resource_show", id=entry["id"])
        assert status == 200
        fields = record["result"]
        assert fields["size"] is None and fields["url_type"] is None
        late = ("etag", "sha256", "s3_available", "s3_url")
        assert not [n for n in fields if n in late or n.startswith("dc:")]
        with open_remote(server, entry["id"]) as remote, dclab.new_dataset(entry["path"]) as local:
            assert not _basin(remote, "resource").is_available()
            np.testing.assert_array_equal(remote["deform"][:], local["deform"][:])
            with pytest.raises(KeyError):
                remote["image"][0]
        lag_over(server)
        status, record = api(server, "resource_show", id=entry["id"])
        assert record["result"]["etag"] and record["result"]["size"] == entry["size"]
        with open_remote(server, entry["id"]) as remote, dclab.new_dataset(entry["path"]) as local:
            np.testing.assert_array_equal(remote["image"][5], local["image"][5])


def assert_lagging(url: str, rid: str, lagging: bool) -> None:
    """Whether both lags are in effect (condensed file and fields) or neither."""
    base = f"{url}/api/3/action"
    params = {"id": rid, "query": "basins", "version": "2"}
    basins = requests.get(f"{base}/dcserv", params=params, timeout=10).json()["result"]
    record = requests.get(f"{base}/resource_show", params={"id": rid}, timeout=10).json()
    if lagging:
        assert "features" not in basins[0] and "etag" not in record["result"]
        assert requests.get(basins[1]["urls"][0], timeout=10).status_code == 403
        return
    assert "volume" in basins[0]["features"] and record["result"]["etag"]
    for basin in basins:
        answer = requests.get(basin["urls"][0], headers={"Range": "bytes=0-7"}, timeout=10)
        assert answer.status_code == 206


def test_the_lags_combine(data_dir: Path, devserver: DevServer) -> None:
    """`dcorfs devserver --condensed-lag S --fields-lag S`: both at once (lags far longer than
    the test, so no race with the server's start-up), then neither once they are over."""
    entry = resource(devserver, "generated", "M001_data.rtdc")
    lag = str(int(LAG))
    with ServerProcess(data_dir, "--condensed-lag", lag, "--fields-lag", lag) as server:
        assert_lagging(server.url, entry["id"], lagging=True)
        clock = f"{server.url}/_devserver/clock"
        for wrong in ({}, {"advance": -1}, {"advance": "nan"}, {"advance": "soon"}):
            assert requests.post(clock, json=wrong, timeout=10).status_code == 400, wrong
        assert_lagging(server.url, entry["id"], lagging=True)
        lag_over(server)
        assert_lagging(server.url, entry["id"], lagging=False)


# -- intra-dataset basins (doc/DCOR.md §3) -------------------------------------------------------

DOTTED_HOST = "127.0.0.83"  # unusual, so as not to meet other tests binding port 80


@pytest.fixture(scope="module")
def dotted_devserver(data_dir: Path) -> Iterator[DevServer]:
    """A devserver whose URLs dclab takes for full DCOR URLs (a dotted host, no port: dclab
    `fmt_dcor/basin.py` REGEXP_FULL_DCOR_URL), so that it follows `dcor` basins."""
    try:
        server = DevServer(data_dir, bind=DOTTED_HOST, port=80)
    except PermissionError:
        pytest.skip("binding port 80 needs root")
    with server:
        yield server


def condensed_basins(server: DevServer, rid: str) -> list[dict[str, Any]]:
    assert server.site is not None
    stored = server.site.resource_object(rid, "condensed")
    assert stored is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with dclab.new_dataset(stored.path, enable_basins=False) as dc:
            return list(dc.basins_get_dicts())


def dcserv_basins(server: DevServer, rid: str, token: str = "") -> dict[str, Any]:
    answer = requests.get(
        f"{server.url}/api/3/action/dcserv",
        params={"id": rid, "query": "basins"},
        headers={"Authorization": token},
        timeout=30,
    ).json()["result"]
    return {b["name"].split("-")[0]: b for b in answer}


def raw_index(processed: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with dclab.new_dataset(processed, enable_basins=False) as dc:
            if "basinmap0" in dc.features_innate:
                return np.asarray(dc["basinmap0"][:])
            return np.arange(len(dc))


@pytest.mark.parametrize(
    ("dataset", "name", "token"),
    [
        ("dcnum-pairs", "R001_data_dcn.rtdc", ""),
        ("dcnum-pairs", "R002_data_dcn.rtdc", ""),
        ("secret-pairs", "R001_data_dcn.rtdc", TOKENS["alice"]),
        ("secret-pairs", "R002_data_dcn.rtdc", TOKENS["alice"]),
    ],
    ids=["same", "mapped", "private", "private-mapped"],
)
# what dclab says about the basins DCOR writes into a processed file's condensed file: its
# dcnum file basin (not followed remotely), the S3 basins of a private resource (unavailable),
# the self-reference (a cycle) and what it then cannot read through those
@pytest.mark.filterwarnings("ignore:Ignored basin of format 'hdf5':UserWarning")
@pytest.mark.filterwarnings("ignore::dclab.rtdc_dataset.core.LocalBasinForbiddenWarning")
@pytest.mark.filterwarnings("ignore:Removed unavailable basin:UserWarning")
@pytest.mark.filterwarnings(
    "ignore::dclab.rtdc_dataset.feat_basin.basin_common.CyclicBasinDependencyFoundWarning"
)
@pytest.mark.filterwarnings("ignore::dclab.rtdc_dataset.core.FeatureShouldExistButNotFoundWarning")
def test_intra_dataset_basin_followed_by_dclab(
    dotted_devserver: DevServer, dataset: str, name: str, token: str
) -> None:
    """A dcnum-processed file's upstream features (`image`, `mask`, …), as DCOR's condense
    job and dcserv offer them, are what dclab's own client shows, equal to the raw file's."""
    server = dotted_devserver
    processed = resource(server, dataset, name)
    raw = resource(server, dataset, name.replace("_dcn", ""))
    mapped = name.startswith("R002")
    # the condense job wrote the intra-dataset basin (dc_serve jobs.py ~264-283) ...
    intra = [b for b in condensed_basins(server, processed["id"]) if b["format"] == "dcor"]
    by_name = {b["name"]: b for b in intra}
    upstream = by_name[f"DCOR intra-dataset for {raw['name']}"]
    assert upstream["urls"] == [f"{server.url}/api/3/action/dcserv?id={raw['id']}"]
    assert {"image", "mask", "deform", "volume"} <= set(upstream["features"])
    assert "trace" in upstream["features"] or (mapped and dataset == "dcnum-pairs")
    assert upstream["mapping"] == ("basinmap0" if mapped else "same")
    # ... with mapping `same` the processed file names itself too (same run identifier)
    assert (f"DCOR self-reference {name}" in by_name) is not mapped
    # dcserv lists the upstream features for the condensed basin, not for the resource
    basins = dcserv_basins(server, processed["id"], token)
    assert {"image", "mask"} <= set(basins["condensed"]["features"])
    assert not {"image", "mask", "trace"} & set(basins["resource"]["features"])
    # dclab's client follows it (the upstream with the tokens dclab remembers)
    index = raw_index(Path(processed["path"]))
    if token:
        APIHandler.add_api_key(token)
    with (
        open_remote(server, processed["id"], token) as remote,
        dclab.new_dataset(raw["path"]) as local,
    ):
        assert len(remote) == len(index)
        for feat in ("image", "mask"):
            for i in (0, 1, len(remote) - 1):
                np.testing.assert_array_equal(
                    remote[feat][i], local[feat][int(index[i])], err_msg=f"{feat}[{i}]"
                )
        if not mapped:  # (dclab 0.73 fails indexing `trace` through a mapped basin)
            np.testing.assert_array_equal(
                remote["trace"]["fl2_raw"][3], local["trace"]["fl2_raw"][3]
            )


def test_no_intra_dataset_basins_with_the_option_off(data_dir: Path, tmp_path: Path) -> None:
    """`enable_intra_dataset_basins` off: no such basin, the processed file shows no images."""
    from dcorfs.devserver.site import SiteOptions

    options = SiteOptions(intra_basin_features=False)
    with DevServer(data_dir, state_dir=tmp_path / "state", options=options) as server:
        processed = resource(server, "dcnum-pairs", "R001_data_dcn.rtdc")
        assert not [
            b
            for b in condensed_basins(server, processed["id"])
            if b["format"] == "dcor" and b["name"].startswith("DCOR intra")
        ]
        assert "image" not in dcserv_basins(server, processed["id"])["condensed"]["features"]
