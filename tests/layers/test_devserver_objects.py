"""The devserver's object store: Range semantics, ETags, access control, presigned URLs."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcorfs.devserver.objects import RangeNotSatisfiable, parse_range
from dcorfs.devserver.server import DevServer

from ..conftest import TOKENS, api, resource


def object_url(server: DevServer, dataset: str, name: str, artifact: str = "resource") -> str:
    entry = resource(server, dataset, name)
    _, result = api(server, "resource_show", TOKENS["alice"], id=entry["id"])
    url: str = result["result"]["s3_url"]
    return url.replace("/resource/", f"/{artifact}/") if artifact != "resource" else url


def presigned(server: DevServer, dataset: str, name: str, artifact: str = "resource") -> str:
    entry = resource(server, dataset, name)
    _, basins = api(server, "dcserv", TOKENS["alice"], id=entry["id"], query="basins")
    urls = {b["name"].split("-")[0]: b["urls"][0] for b in basins["result"]}
    return urls[artifact]


@pytest.fixture(scope="module")
def public_file(devserver: DevServer) -> tuple[str, bytes]:
    entry = resource(devserver, "generated", "M001_data.rtdc")
    return object_url(devserver, "generated", "M001_data.rtdc"), Path(entry["path"]).read_bytes()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(start=st.integers(min_value=0), length=st.integers(min_value=1, max_value=3_000_000))
def test_random_ranges_equal_file_bytes(
    public_file: tuple[str, bytes], start: int, length: int
) -> None:
    url, data = public_file
    start %= len(data)
    stop = min(start + length, len(data))
    answer = requests.get(url, headers={"Range": f"bytes={start}-{start + length - 1}"}, timeout=30)
    assert answer.status_code == 206
    assert answer.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(data)}"
    assert int(answer.headers["Content-Length"]) == stop - start
    assert answer.content == data[start:stop]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=-100", (-100, None)),
        ("bytes=100-", (100, None)),
        ("bytes=0-0", (0, 1)),
        ("bytes=5-4", "whole"),  # invalid: ignored
        ("bytes=0-9,20-29", "whole"),  # multiple ranges: S3 ignores them
        ("items=0-9", "whole"),
        ("bytes=abc", "whole"),
    ],
)
def test_range_forms(public_file: tuple[str, bytes], header: str, expected: object) -> None:
    url, data = public_file
    answer = requests.get(url, headers={"Range": header}, timeout=30)
    if expected == "whole":
        assert answer.status_code == 200
        assert answer.content == data
        assert "Content-Range" not in answer.headers
    else:
        assert isinstance(expected, tuple)
        assert answer.status_code == 206
        assert answer.content == data[slice(*expected)]


def test_whole_object_has_length_and_quoted_md5_etag(public_file: tuple[str, bytes]) -> None:
    url, data = public_file
    answer = requests.get(url, timeout=30)
    assert answer.status_code == 200
    assert int(answer.headers["Content-Length"]) == len(data)
    assert answer.headers["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert answer.headers["Accept-Ranges"] == "bytes"
    assert answer.content == data
    head = requests.head(url, timeout=30)
    assert head.status_code == 200 and head.headers["ETag"] == answer.headers["ETag"]
    assert int(head.headers["Content-Length"]) == len(data)


@pytest.mark.parametrize("header", ["bytes=999999999-", "bytes=999999999-1000000000", "bytes=-0"])
def test_unsatisfiable_range_is_416(public_file: tuple[str, bytes], header: str) -> None:
    url, data = public_file
    answer = requests.get(url, headers={"Range": header}, timeout=30)
    assert answer.status_code == 416
    assert answer.headers["Content-Range"] == f"bytes */{len(data)}"
    assert b"<Code>InvalidRange</Code>" in answer.content


def test_parse_range_unit() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=2-5", 10) == (2, 6)
    assert parse_range("bytes=2-50", 10) == (2, 10)
    assert parse_range("bytes=-3", 10) == (7, 10)
    assert parse_range("bytes=-30", 10) == (0, 10)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=10-", 10)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-", 0)


def test_private_object_needs_a_presigned_url(devserver: DevServer) -> None:
    plain = object_url(devserver, "secret-study", "M001_data.rtdc")
    answer = requests.get(plain, headers={"Range": "bytes=0-9"}, timeout=30)
    assert answer.status_code == 403
    assert b"<Code>AccessDenied</Code>" in answer.content
    signed = presigned(devserver, "secret-study", "M001_data.rtdc")
    query = dict(parse_qsl(urlsplit(signed).query))
    assert set(query) == {"AWSAccessKeyId", "Signature", "Expires"}
    data = Path(resource(devserver, "secret-study", "M001_data.rtdc")["path"]).read_bytes()
    answer = requests.get(signed, headers={"Range": "bytes=100-199"}, timeout=30)
    assert answer.status_code == 206 and answer.content == data[100:200]
    # a presigned GET URL is not valid for HEAD (as on S3)
    assert requests.head(signed, timeout=30).status_code == 403


def test_tampered_and_expired_presigned_urls_are_refused(devserver: DevServer) -> None:
    signed = presigned(devserver, "secret-study", "M001_data.rtdc")
    base, _, _ = signed.partition("?")
    query = dict(parse_qsl(urlsplit(signed).query))
    later = dict(query, Expires=str(int(query["Expires"]) + 10))
    answer = requests.get(f"{base}?{urlencode(later)}", timeout=30)
    assert answer.status_code == 403 and b"SignatureDoesNotMatch" in answer.content
    other = base.replace("/resource/", "/condensed/")
    assert requests.get(f"{other}?{urlencode(query)}", timeout=30).status_code == 403
    presigner = devserver.site.presigner  # type: ignore[union-attr]
    bucket, _, key = urlsplit(base).path.lstrip("/").partition("/")
    expired, expires = presigner.url(devserver.url, bucket, key, 60, now=time.time() - 3600)
    assert expires < time.time()
    answer = requests.get(expired, timeout=30)
    assert answer.status_code == 403 and b"Request has expired" in answer.content


def test_missing_objects(devserver: DevServer) -> None:
    url = object_url(devserver, "generated", "M001_data.rtdc")
    missing = url[:-6] + "000000"
    assert requests.get(missing, timeout=30).status_code == 403  # anonymous: no ListBucket
    bucket, _, _ = urlsplit(url).path.lstrip("/").partition("/")
    presigner = devserver.site.presigner  # type: ignore[union-attr]
    signed, _ = presigner.url(devserver.url, bucket, "resource/abc/def/gh", 60)
    answer = requests.get(signed, timeout=30)
    assert answer.status_code == 404 and b"<Code>NoSuchKey</Code>" in answer.content
    assert requests.put(url, data=b"x", timeout=30).status_code == 403


def test_condensed_object_is_public_for_public_datasets(devserver: DevServer) -> None:
    url = object_url(devserver, "generated", "M001_data.rtdc", artifact="condensed")
    answer = requests.get(url, headers={"Range": "bytes=0-7"}, timeout=30)
    assert answer.status_code == 206 and answer.content == b"\x89HDF\r\n\x1a\n"


def test_download_routes_redirect_to_presigned_urls(devserver: DevServer) -> None:
    entry = resource(devserver, "generated", "notes.txt")
    route = (
        f"{devserver.url}/dataset/{entry['dataset_id']}/resource/{entry['id']}/download/notes.txt"
    )
    redirect = requests.get(route, allow_redirects=False, timeout=30)
    assert redirect.status_code == 302
    assert "Signature=" in redirect.headers["Location"]
    final = requests.get(route, timeout=30)
    assert final.status_code == 200 and final.content == b"a plain text resource\n"
    assert final.headers["Content-Disposition"] == "attachment; filename = notes.txt"

    secret = resource(devserver, "secret-study", "M001_data.rtdc")
    base = f"{devserver.url}/dataset/{secret['dataset_id']}/resource/{secret['id']}"
    assert requests.get(f"{base}/download/x", timeout=30).status_code == 404
    with_token = requests.get(
        f"{base}/condensed.rtdc", headers={"Authorization": TOKENS["alice"]}, timeout=30
    )
    assert with_token.status_code == 200 and with_token.content.startswith(b"\x89HDF")
    assert "M001_data_condensed.rtdc" in with_token.headers["Content-Disposition"]
    assert (
        requests.get(
            f"{base}/preview.jpg", headers={"Authorization": TOKENS["alice"]}, timeout=30
        ).status_code
        == 404
    )
