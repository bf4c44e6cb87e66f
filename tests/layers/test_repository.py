"""The devserver's data directory model: layouts, stable ids, digests, bad input."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from dcorfs.devserver import repository
from dcorfs.devserver.datadir import write_json
from dcorfs.devserver.repository import DataDirError, file_digests, load


def test_flat_folder_becomes_one_public_dataset(tmp_path: Path) -> None:
    flat = tmp_path / "My Measurements"
    flat.mkdir()
    (flat / "a.rtdc").write_bytes(b"first")
    (flat / "b.rtdc").write_bytes(b"second")
    (flat / "notes.txt").write_text("hello")
    repo = load(flat, tmp_path / "state")
    (dataset,) = repo.datasets.values()
    assert dataset.name == "my-measurements" and dataset.circle.name == "devserver"
    assert not dataset.private
    assert [r.name for r in dataset.resources] == ["a.rtdc", "b.rtdc", "notes.txt"]
    assert [r.is_rtdc for r in dataset.resources] == [True, True, False]


def test_ids_are_stable_and_follow_content(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "lab" / "ds").mkdir(parents=True)
    file = data / "lab" / "ds" / "m.rtdc"
    file.write_bytes(b"version one")
    first = load(data, tmp_path / "state")
    again = load(data, tmp_path / "state")
    ids = lambda repo: [r.id for _, r in repo.iter_resources()]  # noqa: E731
    assert ids(first) == ids(again)
    assert first.datasets["ds"].id == again.datasets["ds"].id
    file.write_bytes(b"version two")
    os.utime(file, ns=(1, 2))
    changed = load(data, tmp_path / "state")
    assert ids(changed) != ids(first)
    assert (
        changed.datasets["ds"].resources[0].digests.sha256
        == hashlib.sha256(b"version two").hexdigest()
    )


def test_layout_with_metadata_users_and_collections(tmp_path: Path) -> None:
    write_json(
        tmp_path / "dcor.json",
        {
            "users": {"eve": {"token": "t-eve", "circles": ["lab"]}},
            "collections": {"Best Of": {"title": "Best of"}},
        },
    )
    write_json(tmp_path / "lab" / "circle.json", {"title": "The Lab"})
    write_json(
        tmp_path / "lab" / "ds" / "dataset.json",
        {
            "private": True,
            "collections": ["best-of"],
            "tags": ["x"],
            "resources": {"m.rtdc": {"name": "renamed.rtdc", "description": "d"}},
        },
    )
    (tmp_path / "lab" / "ds" / "m.rtdc").write_bytes(b"data")
    (tmp_path / "lab" / "empty").mkdir()
    repo = load(tmp_path, tmp_path / ".state")
    ds = repo.datasets["ds"]
    assert ds.private and ds.collections == ("best-of",) and ds.circle.title == "The Lab"
    assert ds.resources[0].name == "renamed.rtdc" and ds.resources[0].description == "d"
    assert "empty" not in repo.datasets  # CKAN keeps datasets without resources as drafts
    assert repo.collections["best-of"].title == "Best of"
    eve = repo.user_for_token("t-eve")
    assert eve is not None and repo.can_read(ds, eve)
    assert not repo.can_read(ds, None) and repo.user_for_token("") is None


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"dcor.json": "{not json"}, "cannot read"),
        ({"dcor.json": "[1, 2]"}, "JSON object"),
        ({"dcor.json": '{"users": {"x": {"circles": []}}}'}, "has no token"),
        ({"dcor.json": '{"users": {"x": {"token": "t", "circles": ["nope"]}}}'}, "unknown circles"),
    ],
)
def test_bad_data_dirs_are_explained(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataDirError, match=message):
        load(tmp_path, tmp_path / ".state")
    with pytest.raises(DataDirError, match="does not exist"):
        load(tmp_path / "missing", tmp_path / ".state")


def test_multipart_etag_like_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repository, "MULTIPART_THRESHOLD", 4)
    path = tmp_path / "f"
    path.write_bytes(b"abcdefghij")
    digest = file_digests(path, block=2)
    parts = [hashlib.md5(p).digest() for p in (b"abcd", b"efgh", b"ij")]
    assert digest.etag == hashlib.md5(b"".join(parts)).hexdigest() + "-3"
    assert digest.md5 == hashlib.md5(b"abcdefghij").hexdigest() and digest.size == 10
    small = tmp_path / "g"
    small.write_bytes(b"abc")
    assert file_digests(small).etag == hashlib.md5(b"abc").hexdigest()
