"""daemon/webdav.py before it serves: who may read a share (`check`, README "From Windows and
macOS") and what the command prints once serving (the URL, the TLS warning beyond loopback)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from dcorfs.daemon import webdav
from dcorfs.errors import ConfigError
from dcorfs.settings import MountSettings, S3Credentials, Token, WebDavSettings

USERS = {"carol": "a-webdav-password-4321"}
OPEN = MountSettings(mountpoint=Path("share"))
WITH_TOKEN = MountSettings(mountpoint=Path("share"), token=Token("a-dcor-token-1234"))
WITH_S3 = MountSettings(
    mountpoint=Path("share"), s3_credentials=S3Credentials("a-key-id", "a-s3-secret")
)


@pytest.mark.parametrize(
    ("settings", "host", "refusal"),
    [
        (OPEN, "0.0.0.0", "beyond this machine"),
        (OPEN, "192.0.2.7", "beyond this machine"),
        (WITH_TOKEN, "127.0.0.1", "DCOR token"),
        (WITH_S3, "::1", "S3 credentials"),
    ],
)
def test_a_share_that_would_expose_data_needs_users(
    settings: MountSettings, host: str, refusal: str
) -> None:
    with pytest.raises(ConfigError, match=refusal) as refused:
        webdav.check(settings, WebDavSettings(host=host, port=8080))
    assert "--password-file" in str(refused.value) and "\n" not in str(refused.value)
    for secret in ("a-dcor-token-1234", "a-s3-secret"):
        assert secret not in str(refused.value)
    webdav.check(settings, WebDavSettings(host=host, port=8080, users=USERS))  # with users: fine


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_an_open_share_on_loopback_without_secrets_needs_no_users(host: str) -> None:
    webdav.check(OPEN, WebDavSettings(host=host, port=8080))


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_the_command_prints_the_url_and_beyond_loopback_a_tls_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], host: str, warned: bool
) -> None:
    def serve(settings: MountSettings, web: WebDavSettings, *, ready: Any) -> int:
        ready(f"http://{web.host}:8080/")
        return 0

    monkeypatch.setattr(webdav, "serve", serve)
    assert webdav.main(OPEN, WebDavSettings(host=host, port=8080, users=USERS)) == 0
    out, err = capsys.readouterr()
    assert out == f"dcorfs webdav: serving http://{host}:8080/\n"
    assert (err.count("\n"), "TLS" in err) == ((1, True) if warned else (0, False))
    assert USERS["carol"] not in out + err


def test_refused_writes_are_not_logged_as_errors() -> None:
    """WsgiDAV logs every write refused by the read-only share (PUT, DELETE, MKCOL: 405) as an
    ERROR "Invalid HTTP method" (wsgidav/request_server.py); dcorfs's log leaves those out and
    keeps WsgiDAV's other errors."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    keep = Keep()
    ours, theirs = logging.getLogger("dcorfs"), logging.getLogger("wsgidav")
    ours.addHandler(keep)
    try:
        webdav._share_handlers("wsgidav")
        server_log = logging.getLogger("wsgidav.request_server")
        server_log.error("Invalid HTTP method 'PUT'")  # as WsgiDAV says it
        server_log.error("something else went wrong")
    finally:
        ours.removeHandler(keep)
        theirs.removeHandler(keep)
        theirs.setLevel(logging.NOTSET)
        theirs.propagate = True
    assert records == ["something else went wrong"]
