"""Every knob of a mount and its default, in one frozen dataclass; plus the secret token type.

`cli` builds a `MountSettings`; `mount` (the composition root) passes its fields on as explicit
parameters. Nothing below `mount` sees this module's dataclass.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError

DEFAULT_HOST = "dcor.mpl.mpg.de"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


class Token:
    """An API token: compares and hashes by value, but never shows it in `repr`/`str`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        value = value.strip()
        if not value or any(c.isspace() for c in value):
            raise ConfigError("the API token is empty or contains whitespace")
        self._value = value

    def reveal(self) -> str:
        """The secret itself: only for the `Authorization` header of the DCOR host."""
        return self._value

    def __repr__(self) -> str:
        return "Token(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Token) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def read_token(key_file: Path | None, environ: dict[str, str] | None = None) -> Token | None:
    """The token from `--api-key-file` or else `DCOR_API_KEY`; None for anonymous access."""
    env = os.environ if environ is None else environ
    if key_file is not None:
        try:
            text = key_file.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read API key file {key_file}: {exc.strerror}") from None
        return Token(text)
    value = env.get("DCOR_API_KEY", "")
    return Token(value) if value.strip() else None


def parse_host(text: str) -> str:
    """The base URL for `--host`: a bare host means https; an explicit scheme/port is honoured."""
    text = text.strip().rstrip("/")
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not a DCOR host: {text!r} (expected e.g. dcor.mpl.mpg.de)")
    if parts.path or parts.query or parts.username:
        raise ConfigError(f"--host takes a host (and port), not a URL path: {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"bad port in --host {text!r}") from None
    netloc = parts.hostname + (f":{port}" if port else "")
    return f"{parts.scheme}://{netloc}"


def parse_size(text: str) -> int:
    """'10G', '512M', '1.5GiB', '1000000' → bytes (binary multiples)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"not a size: {text!r} (use e.g. 10G, 512M)")
    number, unit = match.groups()
    scale = 1 << (10 * " kmgt".index(unit.lower() or " "))
    return int(float(number) * scale)


def default_cache_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dcorfs"


@dataclass(frozen=True)
class MountSettings:
    mountpoint: Path
    host: str = f"https://{DEFAULT_HOST}"
    token: Token | None = field(default=None, repr=False)
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_size: int = 10 << 30
    memory_cache: int = 128 << 20
    prefetch_memory: int = 64 << 20  # read-ahead windows of all open files together
    prefetch_threads: int = 4
    block_size: int = 64 << 10  # small: HDF5 metadata is scattered; data reads coalesce
    timeout: float = 60.0
    dir_cache_time: float = 300.0
    negative_time: float = 10.0
    attr_time: float = 3600.0
    foreground: bool = False
    allow_other: bool = False
    log_level: str = "INFO"
    log_file: Path | None = None
    network_threads: int = 16
    kernel_tuning: bool = False  # root only: raise read_ahead_kb and max_background
    read_ahead_kb: int = 1024
    max_background: int = 64
