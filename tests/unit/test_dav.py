"""fs/dav.py without a server: dcorfs's errors as HTTP statuses with one line, the stream WsgiDAV
reads a GET from, and the refusal of PROPFIND Depth infinity (doc/SEMANTICS.md, WebDAV)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from wsgidav.dav_error import DAVError, PRECONDITION_CODE_PropfindFiniteDepth

from dcorfs.errors import (
    AccessDenied,
    DcorfsError,
    DeadlineExceeded,
    NotFound,
    ServerError,
    TransientError,
)
from dcorfs.fs.activity import Activity
from dcorfs.fs.content import StaticContent
from dcorfs.fs.dav import ContentStream, TreeProvider, http_error


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotFound("gone"), 404),
        (AccessDenied("private"), 403),
        (DeadlineExceeded("late"), 504),
        (TransientError("busy"), 502),
        (ServerError("broken"), 502),
    ],
)
def test_errors_become_statuses_with_one_line(error: DcorfsError, status: int) -> None:
    error.args = (f"{error}: first line\nTraceback (most recent call last):\n  more",)
    answer = http_error(error)
    assert answer.value == status
    assert answer.context_info is not None and "\n" not in answer.context_info
    assert "Traceback" not in answer.context_info


class Failing:
    """A content whose reads fail as a remote that is down makes them fail."""

    size = 1000

    def read(self, offset: int, length: int, *, deadline: float) -> bytes:
        raise TransientError("http://dcor.example/x: failed 6 times (HTTP 503)")

    def peek(self, offset: int, length: int) -> bytes | None:
        return None


def test_the_stream_seeks_and_reads_like_a_file() -> None:
    data = bytes(range(256)) * 4
    activity = Activity()
    stream = ContentStream(StaticContent(data), timeout=5, activity=activity)
    assert stream.seek(1000) == 1000 and stream.read(100) == data[1000:]
    assert stream.read(10) == b""
    assert stream.seek(-24, io.SEEK_END) == 1000 and stream.read() == data[1000:]
    stream.seek(10)
    buffer = bytearray(5)
    assert stream.readinto(buffer) == 5 and bytes(buffer) == data[10:15]
    assert stream.tell() == 15
    assert activity.counters["bytes_served"] == 24 + 24 + 5


def test_a_failing_read_is_a_502_not_an_os_error() -> None:
    activity = Activity()
    stream = ContentStream(Failing(), timeout=5, activity=activity)  # type: ignore[arg-type]
    with pytest.raises(DAVError) as raised:
        stream.read(100)
    assert raised.value.value == 502
    assert activity.counters["errors"] == 1 and activity.counters["bytes_served"] == 0


@pytest.mark.parametrize("depth", [{"HTTP_DEPTH": "infinity"}, {"HTTP_DEPTH": "Infinity"}, {}])
def test_propfind_depth_infinity_is_refused(depth: dict[str, str]) -> None:
    provider = TreeProvider(None, timeout=5, prefetcher=None, activity=Activity())  # type: ignore[arg-type]
    environ: dict[str, Any] = {"REQUEST_METHOD": "PROPFIND", **depth}
    with pytest.raises(DAVError) as raised:
        provider.get_resource_inst("/datasets/", environ)
    assert raised.value.value == 403
    assert raised.value.err_condition.condition_code == PRECONDITION_CODE_PropfindFiniteDepth
