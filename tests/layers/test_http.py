"""http: strict range GETs and the one retry policy, against the devserver's object store."""

from __future__ import annotations

import base64
import http.server
import logging
import random
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import requests

from dcorfs.devserver.server import DevServer
from dcorfs.errors import (
    AccessDenied,
    DcorfsError,
    DeadlineExceeded,
    NotFound,
    ProtocolError,
    TransientError,
)
from dcorfs.remote import http as remote_http
from dcorfs.remote.http import Http, RetryPolicy, ca_options, proxy_for

from ..conftest import TOKENS, ServerProcess, api, resource

FAST = RetryPolicy(attempts=12, base_delay=0.001, max_delay=0.01, read_timeout=2.0)


def object_and_bytes(
    server: DevServer | ServerProcess, dataset: str = "generated"
) -> tuple[str, bytes, str]:
    entry = resource(server, dataset, "M001_data.rtdc")
    _, body = api(server, "resource_show", TOKENS["alice"], id=entry["id"])
    data = Path(entry["path"]).read_bytes()
    return body["result"]["s3_url"], data, body["result"]["etag"]


def test_range_probe_and_checks(devserver: DevServer) -> None:
    url, data, etag = object_and_bytes(devserver)
    http = Http(policy=FAST)
    deadline = time.monotonic() + 30
    assert http.get_range(url, 10, 5000, deadline=deadline) == data[10:5000]
    last = http.get_range(
        url, len(data) - 7, len(data), expect_etag=etag, expect_size=len(data), deadline=deadline
    )
    assert last == data[-7:]
    info = http.probe(url, deadline=deadline)
    assert (info.size, info.etag) == (len(data), etag)
    with pytest.raises(DcorfsError, match="ETag"):
        http.get_range(url, 0, 10, expect_etag="other", deadline=deadline)
    with pytest.raises(AccessDenied):  # S3 without list permission: unknown keys are 403
        http.get_range(url + "x", 0, 10, deadline=deadline)
    http.close()


def test_private_object_is_403_and_not_retried(fresh_devserver: DevServer) -> None:
    url, _, _ = object_and_bytes(fresh_devserver, "secret-study")
    sleeps: list[float] = []
    http = Http(policy=FAST, sleep=sleeps.append)
    with pytest.raises(AccessDenied):
        http.get_range(url, 0, 10, deadline=time.monotonic() + 30)
    http.close()
    assert sleeps == []  # no retry


def test_faults_never_give_wrong_bytes(fresh_devserver: DevServer) -> None:
    url, data, etag = object_and_bytes(fresh_devserver)
    fresh_devserver.faults.update(
        {
            "error_rate": 0.15,
            "reset_rate": 0.15,
            "short_rate": 0.15,
            "wrong_range_rate": 0.15,
            "ignore_range_rate": 0.15,
        }
    )
    http = Http(policy=FAST)
    dice = random.Random(5)
    good = failed = 0
    for _ in range(150):
        start = dice.randrange(len(data) - 1)
        stop = min(len(data), start + dice.randrange(1, 300_000))
        try:
            got = http.get_range(
                url,
                start,
                stop,
                expect_etag=etag,
                expect_size=len(data),
                deadline=time.monotonic() + 30,
            )
        except DcorfsError:
            failed += 1
            continue
        assert got == data[start:stop]
        good += 1
    assert good > 100 and sum(fresh_devserver.stats.snapshot()["faults"].values()) > 50
    http.close()


def test_a_range_is_held_once(data_dir: Path, devserver: DevServer) -> None:
    """A range GET reads into one buffer and hands on a view of it, not a copy; a failed
    attempt's buffer is let go before the retry. Measured with tracemalloc against a devserver
    in a process of its own (its buffers are not counted): nothing of the failed attempt held
    during the backoff after a short body, about one range at the peak of the whole GET."""
    server = ServerProcess(data_dir)
    policy = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01, read_timeout=30.0)
    http = Http(policy=policy, sleep=lambda seconds: backoff())
    tracing = tracemalloc.is_tracing()
    try:
        url, data, etag = object_and_bytes(server)
        length = min(len(data), 4 << 20)
        faults = f"{server.url}/_devserver/faults"
        base, in_backoff = 0, []

        def backoff() -> None:
            in_backoff.append(tracemalloc.get_traced_memory()[0] - base)
            requests.put(faults, json={"short_rate": 0.0}, timeout=30).raise_for_status()

        requests.put(faults, json={"short_rate": 1.0}, timeout=30).raise_for_status()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        got = http.get_range(url, 0, length, expect_etag=etag, deadline=time.monotonic() + 60)
        peak = tracemalloc.get_traced_memory()[1] - base
        assert got == data[:length]
        assert in_backoff and in_backoff[0] < length / 2
        assert length <= peak < 1.5 * length
    finally:
        if not tracing:
            tracemalloc.stop()
        http.close()
        server.close()


def test_the_environment_is_looked_at_once_per_host(
    devserver: DevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, data, _ = object_and_bytes(devserver)
    assert "//127.0.0.1:" in url
    for name in ("http_proxy", "no_proxy", "all_proxy", "ALL_PROXY"):  # (lower case wins)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # a proxy that is not there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    looked: list[str] = []
    proxy_for = remote_http.proxy_for

    def counted(url: str) -> str | None:
        looked.append(url)
        return proxy_for(url)

    monkeypatch.setattr(remote_http, "proxy_for", counted)
    http = Http(policy=RetryPolicy(attempts=2, base_delay=0.001))
    deadline = time.monotonic() + 30
    for start in range(3):
        assert http.get_range(url, start, start + 10, deadline=deadline) == data[start : start + 10]
    assert len(looked) == 1  # (not proxied: NO_PROXY names the host)
    # another name of the same host is proxied, as the environment says: through nothing
    with pytest.raises(TransientError):
        http.get_range(url.replace("127.0.0.1", "localhost"), 0, 10, deadline=deadline)
    assert len(looked) == 2
    http.close()


def test_deadline_bounds_the_retries() -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    http = Http(
        policy=RetryPolicy(attempts=1000, base_delay=1.0, max_delay=4.0, connect_timeout=0.5),
        sleep=sleep,
        clock=lambda: clock[0],
    )
    with pytest.raises(DeadlineExceeded):
        http.get_json("http://127.0.0.1:9/api/3/action/status_show", deadline=20.0)
    assert 20.0 <= clock[0] <= 25.0
    http.close()
    http = Http(policy=RetryPolicy(attempts=3, base_delay=0.001))
    with pytest.raises(TransientError, match="failed 3 times"):
        http.get_json("http://127.0.0.1:9/x", deadline=time.monotonic() + 30)
    http.close()


def test_token_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    http = Http(policy=RetryPolicy(attempts=2, base_delay=0.001))
    with pytest.raises(DcorfsError):
        http.get_json(
            "http://127.0.0.1:9/x?Signature=secret-sig",
            headers={"Authorization": TOKENS["alice"]},
            deadline=time.monotonic() + 10,
        )
    http.close()
    assert caplog.records
    assert TOKENS["alice"] not in caplog.text and "secret-sig" not in caplog.text


class _Counting(http.server.BaseHTTPRequestHandler):
    """Serves BLOB with ranges over keep-alive connections; counts connections and bytes
    sent. `/whole` answers a ranged GET with 200 and all of it (a store ignoring ranges);
    `/gone` with a 404 and a short S3 error body, `/busy` with a 503 and a short page."""

    protocol_version = "HTTP/1.1"
    connections = 0
    sent = 0

    def setup(self) -> None:
        super().setup()
        type(self).connections += 1

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/gone":
            body = b"<Error><Code>NoSuchKey</Code></Error>"
            self.send_response(404)
            self.send_header("Content-Type", "application/xml")
        elif self.path == "/busy":
            body = b"<html>the server is busy</html>" * 100
            self.send_response(503)
        elif self.path == "/whole":
            body = BLOB
            self.send_response(200)
        else:
            first, last = self.headers["Range"].removeprefix("bytes=").split("-")
            body = BLOB[int(first) : int(last) + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(BLOB)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"blob"')
        self.end_headers()
        try:
            for piece in range(0, len(body), 1 << 16):
                self.wfile.write(body[piece : piece + (1 << 16)])
                type(self).sent += min(1 << 16, len(body) - piece)
        except OSError:
            pass  # the client closed the connection: the rest is not sent


BLOB = random.Random(7).randbytes(64 << 20)


def test_connections_are_kept_unless_a_large_body_is_left() -> None:
    """Range GETs one after another, a probe and an S3 error (its body read for its code) use
    one connection; a body left unread (an error page, a 200 with a whole object to a ranged
    GET: not read to its end) closes its connection, as `requests` did."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    client = Http(policy=RetryPolicy(attempts=1))
    deadline = time.monotonic() + 30
    try:
        for start in range(0, 10 << 20, 1 << 20):
            got = client.get_range(f"{url}/blob", start, start + (1 << 20), deadline=deadline)
            assert got == BLOB[start : start + (1 << 20)]
        with pytest.raises(NotFound, match="NoSuchKey"):  # (its body read for the code)
            client.get_range(f"{url}/gone", 0, 10, deadline=deadline)
        assert client.probe(f"{url}/blob", deadline=deadline).size == len(BLOB)
        assert _Counting.connections == 1
        with pytest.raises(TransientError, match="503"):  # its page not read: closed
            client.get_range(f"{url}/busy", 0, 10, deadline=deadline)
        with pytest.raises(TransientError, match="HTTP 200"):
            client.get_range(f"{url}/whole", 0, 10, deadline=deadline)
        assert client.get_range(f"{url}/blob", 5, 9, deadline=deadline) == BLOB[5:9]
        assert _Counting.connections == 3
        assert _Counting.sent < 11 * (1 << 20) + len(BLOB) // 2
    finally:
        client.close()
        server.shutdown()
        server.server_close()
        thread.join(10)


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy for plain HTTP that answers every request itself (JSON), recording
    the request line and the proxy credentials it was sent."""

    seen: list[tuple[str, str | None]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).seen.append((self.path, self.headers.get("Proxy-Authorization")))
        body = b'{"success": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_proxies_as_requests_takes_them_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxy's credentials go to the proxy (Proxy-Authorization), never into a message;
    a proxy named without a scheme is HTTP; `no_proxy` with an IP range (CIDR), a host name
    and a port keeps those hosts direct."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    for name in ("http_proxy", "https_proxy", "all_proxy", "ALL_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://user:s%40cret@127.0.0.1:{port}")
    monkeypatch.setenv("no_proxy", "10.0.0.0/8,direct.example,::1")
    client = Http(policy=RetryPolicy(attempts=1))
    try:
        status, body = client.get_json(
            "http://dcor.example.invalid/api/3/action/status_show", deadline=time.monotonic() + 10
        )
        assert (status, body) == (200, {"success": True})
        expected = "Basic " + base64.b64encode(b"user:s@cret").decode()
        assert _Proxy.seen == [("http://dcor.example.invalid/api/3/action/status_show", expected)]
        for direct in ("http://10.1.2.3:8080/x", "http://direct.example/x", "http://[::1]:80/x"):
            assert proxy_for(direct) is None, direct
        assert proxy_for("http://elsewhere.example/x") is not None
        monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{port}")  # (no scheme: HTTP)
        plain = Http(policy=RetryPolicy(attempts=1))
        assert plain.get_json("http://other.invalid/a", deadline=time.monotonic() + 10)[0] == 200
        assert _Proxy.seen[-1] == ("http://other.invalid/a", None)
        plain.close()
        monkeypatch.setenv("HTTP_PROXY", "socks5://user:hunter2@127.0.0.1:1080")
        socks = Http(policy=RetryPolicy(attempts=3))
        with pytest.raises(ProtocolError, match="cannot be used") as refused:
            socks.get_json("http://third.invalid/a", deadline=time.monotonic() + 10)
        assert "hunter2" not in str(refused.value)
        socks.close()
    finally:
        client.close()
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_ca_directory_is_used_and_a_missing_bundle_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REQUESTS_CA_BUNDLE naming a directory of certificates is taken as one (as `requests`
    does); naming nothing that exists fails at once, not after retries."""
    sleeps: list[float] = []
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path))
    assert ca_options() == {"ca_cert_dir": str(tmp_path)}
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    client = Http(policy=RetryPolicy(attempts=3, base_delay=0.001), sleep=sleeps.append)
    with pytest.raises(ProtocolError, match="missing.pem"):
        client.get_json("https://127.0.0.1:9/x", deadline=time.monotonic() + 10)
    assert sleeps == []
    client.close()
