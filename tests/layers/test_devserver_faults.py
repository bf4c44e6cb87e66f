"""Each fault switch of the devserver does what it says; counters count; the CLI behaves."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from dcorfs.devserver.faults import Fault, FaultConfig, Faults
from dcorfs.devserver.server import DevServer

from ..conftest import TOKENS, api, resource


def object_and_bytes(server: DevServer) -> tuple[str, bytes]:
    entry = resource(server, "generated", "M001_data.rtdc")
    _, body = api(server, "resource_show", id=entry["id"])
    return body["result"]["s3_url"], Path(entry["path"]).read_bytes()


def test_latency_is_added_to_every_request(fresh_devserver: DevServer) -> None:
    url, _ = object_and_bytes(fresh_devserver)
    fresh_devserver.faults.update({"latency_ms": 150})
    for target in (url, f"{fresh_devserver.url}/api/3/action/status_show"):
        started = time.monotonic()
        requests.get(target, headers={"Range": "bytes=0-99"}, timeout=30)
        assert time.monotonic() - started >= 0.15


def test_error_rate(fresh_devserver: DevServer) -> None:
    url, _ = object_and_bytes(fresh_devserver)
    fresh_devserver.faults.update({"error_rate": 1.0})
    codes = set()
    for _ in range(20):
        answer = requests.get(url, headers={"Range": "bytes=0-99"}, timeout=30)
        assert answer.status_code in (500, 503)
        assert (
            b"<Code>InternalError</Code>" in answer.content
            or b"<Code>SlowDown</Code>" in answer.content
        )
        codes.add(answer.status_code)
    assert codes == {500, 503}
    assert fresh_devserver.stats.snapshot()["faults"] == {"error": 20}
    # API calls are untouched unless api_faults is on
    assert api(fresh_devserver, "status_show")[0] == 200
    fresh_devserver.faults.update({"api_faults": True})
    assert api_status(fresh_devserver) == 503


def api_status(server: DevServer) -> int:
    return requests.get(f"{server.url}/api/3/action/status_show", timeout=30).status_code


def test_reset_mid_body(fresh_devserver: DevServer) -> None:
    url, data = object_and_bytes(fresh_devserver)
    fresh_devserver.faults.update({"reset_rate": 1.0})
    answer = requests.get(url, headers={"Range": "bytes=0-1999999"}, stream=True, timeout=30)
    assert answer.status_code == 206  # the headers arrive, then the body breaks
    with pytest.raises(requests.exceptions.ChunkedEncodingError, match="reset by peer"):
        answer.content  # noqa: B018
    entry = next(iter(fresh_devserver.stats.snapshot()["objects"].values()))
    assert 0 < entry["bytes"] < 2_000_000


def test_stall_mid_body(fresh_devserver: DevServer) -> None:
    url, data = object_and_bytes(fresh_devserver)
    fresh_devserver.faults.update({"stall_rate": 1.0, "stall_seconds": 0.6})
    started = time.monotonic()
    answer = requests.get(url, headers={"Range": "bytes=0-999999"}, timeout=30)
    assert time.monotonic() - started >= 0.6
    assert answer.content == data[:1_000_000]  # a stall delays, it does not corrupt
    with pytest.raises(requests.exceptions.ConnectionError):  # urllib3 read timeout
        requests.get(url, headers={"Range": "bytes=0-999999"}, timeout=(5, 0.2)).content  # noqa: B018


def test_short_body(fresh_devserver: DevServer) -> None:
    url, data = object_and_bytes(fresh_devserver)
    fresh_devserver.faults.update({"short_rate": 1.0})
    answer = requests.get(url, headers={"Range": "bytes=0-99999"}, stream=True, timeout=30)
    assert int(answer.headers["Content-Length"]) == 100_000
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        answer.content  # noqa: B018


def test_wrong_content_range(fresh_devserver: DevServer) -> None:
    url, data = object_and_bytes(fresh_devserver)
    fresh_devserver.faults.update({"wrong_range_rate": 1.0})
    answer = requests.get(url, headers={"Range": "bytes=1000-1999"}, timeout=30)
    assert answer.status_code == 206
    assert answer.headers["Content-Range"] != f"bytes 1000-1999/{len(data)}"
    first, last = answer.headers["Content-Range"].split()[1].split("/")[0].split("-")
    assert answer.content == data[int(first) : int(last) + 1]  # honest about what it sent
    whole = requests.get(url, timeout=30)  # range faults only hit ranged requests
    assert whole.status_code == 200 and whole.content == data


def test_200_instead_of_206(fresh_devserver: DevServer) -> None:
    url, data = object_and_bytes(fresh_devserver)
    fresh_devserver.faults.update({"ignore_range_rate": 1.0})
    answer = requests.get(url, headers={"Range": "bytes=1000-1999"}, timeout=30)
    assert answer.status_code == 200 and "Content-Range" not in answer.headers
    assert answer.content == data


def test_url_lifetime(fresh_devserver: DevServer) -> None:
    fresh_devserver.faults.update({"url_lifetime": 2.0})
    rid = resource(fresh_devserver, "secret-study", "M001_data.rtdc")["id"]
    _, body = api(fresh_devserver, "dcserv", TOKENS["alice"], id=rid, query="basins")
    basin = body["result"][1]
    assert basin["time_expiration"] - basin["time_request"] <= 3.0
    url = basin["urls"][0]
    assert requests.get(url, headers={"Range": "bytes=0-9"}, timeout=30).status_code == 206
    time.sleep(max(0.0, basin["time_expiration"] - time.time()) + 1.1)
    assert requests.get(url, headers={"Range": "bytes=0-9"}, timeout=30).status_code == 403


def test_faults_admin_endpoint_and_counters(fresh_devserver: DevServer) -> None:
    base = fresh_devserver.url
    assert (
        requests.put(f"{base}/_devserver/faults", json={"error_rate": 2}, timeout=30).status_code
        == 400
    )
    assert (
        requests.put(f"{base}/_devserver/faults", json={"bogus": 1}, timeout=30).status_code == 400
    )
    config = requests.put(f"{base}/_devserver/faults", json={"latency_ms": 5}, timeout=30).json()
    assert (
        config["latency_ms"] == 5
        and requests.get(f"{base}/_devserver/faults", timeout=30).json() == config
    )
    requests.delete(f"{base}/_devserver/stats", timeout=30)
    url, data = object_and_bytes(fresh_devserver)
    for start in (0, 500, 1000):
        headers = {"Range": f"bytes={start}-{start + 99}"}
        if start == 500:
            headers["Authorization"] = "a token where it does not belong"
        requests.get(url, headers=headers, timeout=30)
    stats = requests.get(f"{base}/_devserver/stats", params={"log": "1"}, timeout=30).json()
    (entry,) = stats["objects"].values()
    assert entry == {
        "resource_id": entry["resource_id"],
        "artifact": "resource",
        "requests": 3,
        "bytes": 300,
        "authorized": 1,
    }
    assert stats["object_requests"] == 3 and stats["object_bytes"] == 300
    assert stats["object_requests_authorized"] == 1
    assert {e["host"] for e in stats["log"] if "object" in e} == {base.split("//")[1]}
    assert [e["range"] for e in stats["log"] if "object" in e] == [
        [0, 100],
        [500, 600],
        [1000, 1100],
    ]
    assert stats["api"] == {"resource_show": 1}


def test_fault_dice_follow_the_rates() -> None:
    faults = Faults(FaultConfig(error_rate=0.1, wrong_range_rate=0.2), seed=1)
    drawn = [faults.draw(api=False, ranged=True) for _ in range(5000)]
    assert 0.08 < drawn.count(Fault.ERROR) / 5000 < 0.12
    assert 0.17 < drawn.count(Fault.WRONG_RANGE) / 5000 < 0.23
    unranged = [faults.draw(api=False, ranged=False) for _ in range(2000)]
    assert Fault.WRONG_RANGE not in unranged
    assert {faults.draw(api=True, ranged=False) for _ in range(100)} == {Fault.NONE}
    with pytest.raises(ValueError):
        FaultConfig(error_rate=0.7, reset_rate=0.5)


def test_cli_prints_url_when_ready_and_stops_on_sigterm(data_dir: Path, tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dcorfs",
            "devserver",
            "--data",
            str(data_dir),
            "--port",
            "0",
            "--latency",
            "5",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        status = requests.get(f"{url}/api/3/action/status_show", timeout=30).json()
        assert status["result"]["site_url"] == url
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
        if process.stdout is not None:
            process.stdout.close()


def test_cli_rejects_bad_input(tmp_path: Path) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "dcorfs", "devserver", "--data", str(tmp_path / "nope")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert missing.stderr.count("\n") <= 2
    rate = subprocess.run(
        [sys.executable, "-m", "dcorfs", "devserver", "--error-rate", "1.5"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rate.returncode == 2 and "not a fraction" in rate.stderr
