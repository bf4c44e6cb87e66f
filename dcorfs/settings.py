"""Every knob of a mount and its default, in one frozen dataclass; plus the secret types
(DCOR's API token, S3 credentials) and where they are read from.

`cli` builds a `MountSettings`; `mount` (the composition root) passes its fields on as explicit
parameters. Nothing below `mount` sees this module's dataclass.
"""

from __future__ import annotations

import configparser
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError

DEFAULT_HOST = "dcor.mpl.mpg.de"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def fingerprint(*secrets: str) -> str:
    """A short keyed hash naming secrets in the cache (whose answers these are) without them:
    different secrets (a wrong S3 secret for the same key id, too) give different names."""
    digest = hashlib.blake2b(key=b"dcorfs-scope", digest_size=16)
    digest.update("\0".join(secrets).encode())
    return digest.hexdigest()


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

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._value)

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
        return Token(_private_text(key_file, "API key file"))
    value = env.get("DCOR_API_KEY", "")
    return Token(value) if value.strip() else None


def parse_host(text: str) -> str:
    """The base URL for `--host`: a bare host means https; an explicit scheme/port is honoured."""
    text = text.strip().rstrip("/")
    if "://" not in text:
        text = "https://" + text
    return _origin(text, "--host", f"not a DCOR host: {text!r} (expected e.g. dcor.mpl.mpg.de)")


def parse_endpoint(text: str, option: str = "--s3-endpoint") -> str:
    """The base URL of an S3 endpoint (`--s3-endpoint`, `option`): scheme, host and port."""
    text = text.strip().rstrip("/")
    return _origin(text, option, f"not an S3 endpoint: {text!r} (expected e.g. https://host:port)")


def _origin(text: str, option: str, not_a_url: str) -> str:
    """`scheme://host[:port]` of an http(s) URL that has nothing more, else ConfigError."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(not_a_url)
    if parts.path or parts.query or parts.username:
        raise ConfigError(f"{option} takes scheme, host and port only, not a URL path: {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"bad port in {option} {text!r}") from None
    return f"{parts.scheme}://{parts.hostname}" + (f":{port}" if port else "")


_CIRCLE = re.compile(r"^[0-9a-z][0-9a-z-]{0,62}$")


BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


def parse_bucket_template(text: str) -> str:
    """`--s3-bucket-template`: a bucket name with `{organization_id}` once, nothing else in
    braces (as DCOR's `dcor_object_store.bucket_name`; doc/DCOR.md §10)."""
    field_name = "{organization_id}"
    filled = text.replace(field_name, "x")
    if text.count(field_name) != 1 or not BUCKET_NAME.match(filled) or not 3 <= len(filled) <= 63:
        raise ConfigError(
            f"not a bucket template: {text!r} (expected a bucket name holding "
            f"{field_name} once, e.g. circle-{field_name})"
        )
    return text


def parse_circle(text: str) -> str:
    """A circle (CKAN organization) id for `--circle`: it names the bucket (`circle-<id>`)."""
    if not _CIRCLE.match(text):
        raise ConfigError(f"not a circle id: {text!r} (expected the circle's id, a UUID)")
    return text


class S3Credentials:
    """An S3 access key pair. The secret never shows in `repr`/`str`; the access key id
    shows only as a fingerprint (it names the metadata scope of an --s3-only mount)."""

    __slots__ = ("_key_id", "_secret")

    def __init__(self, access_key_id: str, secret_access_key: str) -> None:
        key_id, secret = access_key_id.strip(), secret_access_key.strip()
        for value in (key_id, secret):
            if not value or any(c.isspace() for c in value):
                raise ConfigError("an S3 access key id or secret is empty or contains whitespace")
        self._key_id = key_id
        self._secret = secret

    def reveal(self) -> tuple[str, str]:
        """(access key id, secret): only for botocore's signer (`s3.ObjectStore`)."""
        return self._key_id, self._secret

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._key_id, self._secret)

    def __repr__(self) -> str:
        return "S3Credentials(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Credentials) and other.reveal() == self.reveal()

    def __hash__(self) -> int:
        return hash(self.reveal())


S3_KEY_ID_ENV = "DCORFS_S3_ACCESS_KEY_ID"
S3_SECRET_ENV = "DCORFS_S3_SECRET_ACCESS_KEY"
SHARED_KEY_ID_ENV = "DCORFS_SHARED_CACHE_ACCESS_KEY_ID"
SHARED_SECRET_ENV = "DCORFS_SHARED_CACHE_SECRET_ACCESS_KEY"
_FILE_KEYS = (
    ("aws_access_key_id", "aws_secret_access_key"),
    ("access_key_id", "secret_access_key"),
)


def read_s3_credentials(
    credentials_file: Path | None,
    environ: dict[str, str] | None = None,
    *,
    key_id_env: str = S3_KEY_ID_ENV,
    secret_env: str = S3_SECRET_ENV,
) -> S3Credentials | None:
    """S3 credentials from `--s3-credentials-file` (an INI file as ~/.aws/credentials: the
    `[default]` section or the only one) or else from $DCORFS_S3_ACCESS_KEY_ID and
    $DCORFS_S3_SECRET_ACCESS_KEY (the shared cache's: `key_id_env`, `secret_env`); None for
    anonymous access. Errors never quote a value."""
    env = os.environ if environ is None else environ
    if credentials_file is not None:
        parser = configparser.ConfigParser(interpolation=None)
        text = _private_text(credentials_file, "S3 credentials file")
        try:
            parser.read_string(text, source=str(credentials_file))
        except configparser.Error:
            raise ConfigError(
                f"S3 credentials file {credentials_file} is not an INI file"
            ) from None
        sections = parser.sections()
        name = "default" if "default" in sections else sections[0] if len(sections) == 1 else None
        if name is not None:
            section = parser[name]
            for key_id, secret in _FILE_KEYS:
                if section.get(key_id) and section.get(secret):
                    return S3Credentials(section[key_id], section[secret])
        raise ConfigError(
            f"S3 credentials file {credentials_file}: expected a [default] section with "
            "aws_access_key_id and aws_secret_access_key"
        )
    key_id, secret = env.get(key_id_env, "").strip(), env.get(secret_env, "").strip()
    if not key_id and not secret:
        return None
    if not (key_id and secret):
        raise ConfigError(f"set both {key_id_env} and {secret_env}, or neither")
    return S3Credentials(key_id, secret)


@dataclass(frozen=True)
class SharedCache:
    """The shared cache tier (`--shared-cache s3://BUCKET/PREFIX`): a bucket on a site's S3
    store that the mounts of many nodes read and fill (doc/CLUSTER.md)."""

    endpoint: str
    bucket: str
    prefix: str  # without slashes at either end; may be empty
    credentials: S3Credentials | None = field(default=None, repr=False)
    readonly: bool = False  # borrow, never fill (short-lived jobs)
    private: bool = False  # objects of private datasets too (opt-in)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def parse_shared_cache(text: str) -> tuple[str, str]:
    """`--shared-cache s3://BUCKET/PREFIX` → (bucket, prefix)."""
    parts = urlsplit(text.strip())
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if (
        parts.scheme != "s3"
        or not BUCKET_NAME.match(bucket)
        or not 3 <= len(bucket) <= 63
        or parts.query
        or parts.fragment
        or "//" in prefix
    ):
        raise ConfigError(
            f"not a shared cache: {text!r} (expected s3://BUCKET/PREFIX, e.g. "
            "s3://dcorfs-cache/cluster)"
        )
    return bucket, prefix


def default_hdf5_workers() -> int:
    """HDF5 worker processes by default: the cores but one (the daemon's), at most 2."""
    return max(1, min(2, (os.cpu_count() or 1) - 1))


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
    # every in-memory buffer together: kept blocks and decoded values, read-ahead windows,
    # fetches and decodes in flight (shared out by `cache.budget.MemoryPlan`)
    memory_limit: int = 300 << 20
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
    metrics_file: Path | None = None  # OpenMetrics text, rewritten every few seconds
    network_threads: int = 16
    # worker pools of opening and tree work (doc/ARCHITECTURE.md, "Threads and pools")
    warm_threads: int = 4  # values and files warmed ahead of readers
    ask_threads: int = 8  # API questions of one opening, side by side
    prepare_threads: int = 8  # resources of a listed dataset opened ahead of readers
    build_threads: int = 2  # structures of synthesized files (CPU work)
    listing_threads: int = 4  # resource directory listings a reader waits for
    # processes reading small files' structure and building skeletons (hdf5/workers.py;
    # 0: in the daemon's threads)
    hdf5_workers: int = field(default_factory=default_hdf5_workers)
    malloc_arenas: int = 2  # glibc's, for all threads together (daemon/memory.py)
    kernel_tuning: bool = False  # root only: raise read_ahead_kb and max_background
    read_ahead_kb: int = 1024
    max_background: int = 64
    # the S3 bypass: objects from this endpoint instead of dcserv's URLs; with `s3_only`, no
    # DCOR host at all (the tree is `circles/<id>/<resource id>/` of the given circles)
    s3_endpoint: str | None = None
    s3_credentials: S3Credentials | None = field(default=None, repr=False)
    s3_only: bool = False
    circles: tuple[str, ...] = ()
    # how the server names a circle's bucket (doc/DCOR.md §10)
    s3_bucket_template: str = "circle-{organization_id}"
    # a second cache tier on a site's S3 store, shared by the mounts of many nodes
    shared_cache: SharedCache | None = None

    @property
    def source(self) -> str:
        """What is mounted: the DCOR host, or the S3 endpoint of an --s3-only mount."""
        return self.s3_endpoint if self.s3_only and self.s3_endpoint else self.host

    def secrets(self) -> list[str]:
        """Every secret the daemon knows, for the log filter."""
        found = [self.token.reveal()] if self.token else []
        for credentials in (
            self.s3_credentials,
            self.shared_cache.credentials if self.shared_cache else None,
        ):
            if credentials is not None:
                found += list(credentials.reveal())
        return found


def parse_listen(text: str) -> tuple[str, int]:
    """`--listen HOST:PORT` (an IPv6 host in brackets) → (host, port); port 0: a free one."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"not an address to listen on: {text!r} (expected e.g. 127.0.0.1:8080)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (an address or `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _private_text(path: Path, what: str) -> str:
    """The text of a file of secrets (`what` names it in one-line errors), refused when its
    group or others may read or write it (as ssh refuses such a key)."""
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"{what} {path} is readable by others: chmod 600 {path}")
    return text


def read_password_file(path: Path) -> dict[str, str]:
    """The users of `--password-file`: one `user:password` per line (# comments, blank lines
    skipped). One-line errors; the passwords never appear in them."""
    text = _private_text(path, "password file")
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise ConfigError(f"password file {path}, line {number}: expected user:password")
        users[user.strip()] = password
    if not users:
        raise ConfigError(f"password file {path} names no user (lines of user:password)")
    return users


@dataclass(frozen=True)
class WebDavSettings:
    """`dcorfs webdav`: where it listens and who may read (None: anyone who reaches it)."""

    host: str = "127.0.0.1"
    port: int = 8080
    users: dict[str, str] | None = field(default=None, repr=False)

    def secrets(self) -> list[str]:
        return list(self.users.values()) if self.users else []
