"""dcserv's answers made from the files (`opening.filetexts`, for `--s3-only`), held against
the devserver's own dcserv answers (`devserver.kernel`: dclab's, as DCOR's `get_resource_kernel`
makes them) for a generated measurement and every field fixture."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from dcorfs.cache.blockcache import BlockCache
from dcorfs.cache.derived import DerivedCache
from dcorfs.cache.identity import ObjectId
from dcorfs.devserver.kernel import compute
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.hdf5.rtdc import RemoteFile, RtdcResource, RtdcSource
from dcorfs.opening.filetexts import file_texts

from ..conftest import FIXTURE_FILES


def opened(path: Path) -> RtdcResource:
    data = path.read_bytes()
    obj = ObjectId(key=f"local/{path.name}", etag="e", size=len(data))
    cache = BlockCache(fetch=lambda o, a, b, d: data[a:b], store=None, block_size=1 << 16)
    source = RtdcSource(RemoteFile(cache, obj, timeout=60), kind="resource")
    source.features = source.scan(time.monotonic() + 60)
    events = int(compute(path, None, False).metadata["experiment"]["event count"])
    return RtdcResource(source, None, events, DerivedCache(store=None))


def same(ours: Any, theirs: Any) -> bool:
    """Equal as JSON values, numbers by value (dclab types metadata: 3000 may be 3000.0),
    NaN as dcserv's null."""
    if isinstance(ours, list) and isinstance(theirs, list | tuple):
        return len(ours) == len(theirs) and all(map(same, ours, theirs))
    if isinstance(ours, float) and math.isnan(ours):
        return theirs is None
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return bool(ours) == bool(theirs)
    if isinstance(ours, int | float) and isinstance(theirs, int | float):
        return math.isclose(ours, theirs, rel_tol=1e-12)
    return bool(ours == theirs)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    made = write_rtdc(tmp_path_factory.mktemp("texts") / "m.rtdc", SampleSpec(events=30, seed=71))
    return [made, *FIXTURE_FILES]


def test_logs_tables_and_metadata_are_dcservs(files: list[Path]) -> None:
    checked = 0
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel = compute(path, None, False)
        resource = opened(path)
        try:
            texts = file_texts(resource, deadline=time.monotonic() + 60)
        finally:
            resource.close()
        assert texts["logs"] == kernel.resource_logs, path.name
        assert set(texts["tables"]) == set(kernel.tables), path.name
        for name, (columns, rows) in kernel.tables.items():
            assert texts["tables"][name][0] == columns, (path.name, name)
            assert same(texts["tables"][name][1], rows), (path.name, name)
        for section, values in kernel.metadata.items():
            for key, value in values.items():
                assert key in texts["metadata"].get(section, {}), (path.name, section, key)
                assert same(texts["metadata"][section][key], value), (path.name, section, key)
                checked += 1
    assert checked > 30
