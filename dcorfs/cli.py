"""The `dcorfs` command line: argparse to explicit parameters, one-line errors, exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .cache.budget import SMALLEST
from .errors import ConfigError, DcorfsError
from .settings import (
    DEFAULT_HOST,
    S3_KEY_ID_ENV,
    S3_SECRET_ENV,
    SHARED_KEY_ID_ENV,
    SHARED_SECRET_ENV,
    MountSettings,
    SharedCache,
    WebDavSettings,
    default_cache_dir,
    default_hdf5_workers,
    parse_bucket_template,
    parse_circle,
    parse_endpoint,
    parse_host,
    parse_listen,
    parse_shared_cache,
    parse_size,
    read_password_file,
    read_s3_credentials,
    read_token,
)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return value


def _add_devserver(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "devserver",
        help="run a local DCOR-compatible server (CKAN API, dcserv, object store)",
        description=(
            "Serve a data directory as a DCOR instance on loopback. Prints its base URL on "
            "stdout once ready; stops on Ctrl-C/SIGTERM. Without --data, serves freshly "
            "generated sample data from a temporary directory."
        ),
    )
    parser.add_argument(
        "--data", type=Path, help="data directory (see README) or a folder of .rtdc files"
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    parser.add_argument(
        "--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--state-dir", type=Path, help="condensed files and caches (default DATA/.devserver)"
    )
    parser.add_argument(
        "--sample-data", action="store_true", help="generate sample data into an empty --data"
    )
    parser.add_argument(
        "--sample-events", type=int, default=5000, help="events of the main sample (5000)"
    )
    faults = parser.add_argument_group("latency and faults (fractions of object requests)")
    faults.add_argument(
        "--latency", type=float, default=0.0, metavar="MS", help="added to every request"
    )
    faults.add_argument("--error-rate", type=_fraction, default=0.0, help="500/503 answers")
    faults.add_argument(
        "--reset-rate", type=_fraction, default=0.0, help="connection reset mid-body"
    )
    faults.add_argument("--stall-rate", type=_fraction, default=0.0, help="pause mid-body")
    faults.add_argument("--stall-seconds", type=float, default=5.0, help="length of a stall (5)")
    faults.add_argument("--short-rate", type=_fraction, default=0.0, help="body ends early")
    faults.add_argument(
        "--wrong-range-rate", type=_fraction, default=0.0, help="206 for another range"
    )
    faults.add_argument(
        "--ignore-range-rate", type=_fraction, default=0.0, help="200 instead of 206"
    )
    faults.add_argument(
        "--url-lifetime", type=float, default=3600.0, metavar="S", help="presigned URLs (3600)"
    )
    faults.add_argument(
        "--api-faults", action="store_true", help="apply the rates to API calls too"
    )
    faults.add_argument("--seed", type=int, help="seed of the fault dice")
    dcor = parser.add_argument_group("DCOR behaviour")
    dcor.add_argument(
        "--no-intra-basin-features",
        action="store_true",
        help=(
            "enable_intra_dataset_basins off: no intra-dataset basins in condensed files, and "
            "the condensed basin lists only its own features (ckanext.dc_serve default: "
            "dcnum-processed files read image, mask, … from their raw resource; doc/DCOR.md §3)"
        ),
    )
    dcor.add_argument(
        "--no-trace-list-quirk",
        action="store_true",
        help="answer trace_list of files without traces with [] instead of DCOR's 500",
    )
    dcor.add_argument(
        "--no-condensed",
        action="store_true",
        help="condensed files never appear (DCOR's condensing job off or failed): listed "
        "in basins without features, anonymous GET 403, no condensing logs",
    )
    dcor.add_argument(
        "--condensed-lag",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="condensed files (their basin features, the condensing logs) appear this long "
        "after the server starts, as DCOR's background job lags uploads",
    )
    dcor.add_argument(
        "--fields-lag",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="resource records lack etag, sha256, s3_*, dc:*, size and url_type, and public "
        "originals their public tag (anonymous GET 403), this long after the server starts",
    )
    dcor.add_argument(
        "--object-host",
        default="",
        metavar="NAME",
        help="host name in object URLs, e.g. localhost while binding 127.0.0.1: the object "
        "store then is another host, as on DCOR",
    )
    dcor.add_argument(
        "--search-latency",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds each package_search call takes (DCOR's pages of 1000 datasets are slow)",
    )
    dcor.add_argument(
        "--title-ties-unordered",
        action="store_true",
        help="organization_list/group_list order equal titles differently on every call, "
        "as CKAN's title sort without tie-breaker may",
    )
    dcor.add_argument(
        "--external-host",
        default="",
        metavar="ADDR",
        help='serve link resources (storage "link" in dataset.json) from a second web '
        "server on this address, e.g. 127.0.0.62",
    )
    dcor.add_argument(
        "--bucket-template",
        default="circle-{organization_id}",
        metavar="TEMPLATE",
        help="how circles' buckets are named (dcor_object_store.bucket_name; DCOR: %(default)s)",
    )
    parser.set_defaults(run=_run_devserver, console_log=logging.WARNING)  # its progress


def _run_devserver(args: argparse.Namespace) -> int:
    from .devserver.faults import FaultConfig
    from .devserver.run import serve
    from .devserver.site import SiteOptions

    try:
        faults = FaultConfig(
            latency_ms=args.latency,
            error_rate=args.error_rate,
            reset_rate=args.reset_rate,
            stall_rate=args.stall_rate,
            stall_seconds=args.stall_seconds,
            short_rate=args.short_rate,
            wrong_range_rate=args.wrong_range_rate,
            ignore_range_rate=args.ignore_range_rate,
            url_lifetime=args.url_lifetime,
            api_faults=args.api_faults,
        )
    except ValueError as exc:
        print(f"dcorfs devserver: {exc}", file=sys.stderr)
        return 2
    options = SiteOptions(
        intra_basin_features=not args.no_intra_basin_features,
        trace_list_quirk=not args.no_trace_list_quirk,
        condensed=not args.no_condensed,
        condensed_lag=args.condensed_lag,
        fields_lag=args.fields_lag,
        object_host=args.object_host,
        search_latency=args.search_latency,
        title_ties_unordered=args.title_ties_unordered,
        external_host=args.external_host,
        bucket_template=args.bucket_template,
    )
    return serve(
        args.data,
        bind=args.bind,
        port=args.port,
        state_dir=args.state_dir,
        faults=faults,
        options=options,
        seed=args.seed,
        sample_data=args.sample_data,
        sample_events=args.sample_events,
    )


def _add_mount(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "mount",
        help="mount DCOR at MOUNTPOINT (read-only)",
        description=(
            "Mount a DCOR instance as a read-only filesystem. Returns once the mount is ready; "
            "the daemon stays in the background (unless --foreground). The API token for "
            "private data comes from $DCOR_API_KEY or --api-key-file, never the command line."
        ),
    )
    parser.add_argument("mountpoint", type=Path, help="an existing, empty directory")
    _add_source_options(parser)
    parser.add_argument("--foreground", action="store_true", help="stay attached, log to stderr")
    parser.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    parser.add_argument(
        "--kernel-tuning",
        action="store_true",
        help="as root, raise the kernel's read-ahead (1 MiB) and background requests of the mount",
    )
    _add_s3_options(parser)
    _add_shared_options(parser)
    parser.set_defaults(run=_run_mount)


def _add_webdav(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "webdav",
        help="serve DCOR's tree read-only over WebDAV (Windows, macOS, no FUSE)",
        description=(
            "Serve the tree of a mount read-only over WebDAV, for Windows Explorer, macOS "
            "Finder, davfs2 and rclone; in the foreground (Ctrl-C or SIGTERM stops it). Prints "
            "its URL once serving. Loopback only unless --password-file names the users who "
            "may read (HTTP basic or digest; put a TLS reverse proxy in front). Same cache, "
            "token and S3 options as `dcorfs mount`."
        ),
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:8080; port 0: a free one)",
    )
    parser.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="users who may read, one user:password per line (chmod 600)",
    )
    _add_source_options(parser)
    _add_s3_options(parser)
    _add_shared_options(parser)
    parser.set_defaults(run=_run_webdav)


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    """What is served and how (`mount` and `webdav`): host, token, cache, timeouts, logs."""
    parser.add_argument(
        "--host",
        help=f"DCOR host; bare = https, or e.g. http://127.0.0.1:8765 (default {DEFAULT_HOST})",
    )
    parser.add_argument("--api-key-file", type=Path, help="file holding the DCOR API token")
    parser.add_argument(
        "--cache-dir", type=Path, help="persistent cache (default $XDG_CACHE_HOME/dcorfs)"
    )
    parser.add_argument("--cache-size", default="10G", help="cache limit, e.g. 10G, 500M (10G)")
    parser.add_argument(
        "--memory-limit",
        default="300M",
        help="all in-memory buffers of the daemon together, e.g. 300M, 1G (300M; at least 150M)",
    )
    parser.add_argument(
        "--hdf5-workers",
        type=int,
        help="processes reading small files' HDF5 structure beside the daemon "
        "(default: the cores but one, at most 2; 0: in the daemon itself)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds before a read fails with EIO (60)"
    )
    parser.add_argument(
        "--dir-cache-time",
        type=float,
        default=300.0,
        help="seconds listings of datasets/circles/collections are kept (300)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    parser.add_argument("--log-file", type=Path, help="default: CACHE_DIR/dcorfs.log")
    parser.add_argument(
        "--metrics-file",
        type=Path,
        metavar="PATH",
        help="rewrite OpenMetrics text here every 15 s (node_exporter's textfile collector)",
    )


def _credentials_file(group: argparse._ArgumentGroup, option: str) -> None:
    group.add_argument(
        option,
        type=Path,
        metavar="FILE",
        help="INI file as ~/.aws/credentials: [default] aws_access_key_id, aws_secret_access_key",
    )


def _add_s3_options(parser: argparse.ArgumentParser) -> None:
    s3 = parser.add_argument_group(
        "S3 bypass",
        "Read objects straight from DCOR's S3 object store instead of the URLs dcserv hands "
        "out: public data anonymously, with S3 credentials whatever they may read (signed); "
        "private datasets without S3 credentials keep dcserv's presigned URLs. "
        f"Credentials: ${S3_KEY_ID_ENV} and ${S3_SECRET_ENV}, or --s3-credentials-file; "
        "never the command line.",
    )
    s3.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="the object store, e.g. https://objectstore.hpccloud.mpcdf.mpg.de",
    )
    _credentials_file(s3, "--s3-credentials-file")
    s3.add_argument(
        "--s3-only",
        action="store_true",
        help="no DCOR API at all: circles/<circle-id>/<resource-id>/ from the buckets",
    )
    s3.add_argument(
        "--circle",
        action="append",
        default=[],
        metavar="ID",
        help="with --s3-only: a circle (organization) id whose bucket to mount; repeatable",
    )
    s3.add_argument(
        "--s3-bucket-template",
        default="circle-{organization_id}",
        metavar="TEMPLATE",
        help="how the server names a circle's bucket (DCOR: %(default)s; doc/DCOR.md §10)",
    )


def _add_shared_options(parser: argparse.ArgumentParser) -> None:
    shared = parser.add_argument_group(
        "shared cache tier",
        "A second cache on the site's S3 store, read and filled by the mounts of many nodes: "
        "memory, local disk, shared tier, then DCOR (doc/CLUSTER.md). Objects of public "
        "datasets only, unless --shared-cache-private. Credentials: "
        f"${SHARED_KEY_ID_ENV} and ${SHARED_SECRET_ENV}, or --shared-cache-credentials; "
        "never the command line.",
    )
    shared.add_argument(
        "--shared-cache", metavar="s3://BUCKET/PREFIX", help="where the shared pieces are kept"
    )
    shared.add_argument(
        "--shared-cache-endpoint", metavar="URL", help="the S3 store, e.g. https://s3.site:9000"
    )
    _credentials_file(shared, "--shared-cache-credentials")
    shared.add_argument(
        "--shared-cache-readonly",
        action="store_true",
        help="read the shared tier, never fill it (short-lived jobs)",
    )
    shared.add_argument(
        "--shared-cache-private",
        action="store_true",
        help="objects of private datasets too: whoever can read the tier can read them",
    )


def _shared_cache(args: argparse.Namespace) -> SharedCache | None:
    """`--shared-cache` and the options that go with it."""
    if args.shared_cache is None:
        given = [
            option
            for option, value in (
                ("--shared-cache-endpoint", args.shared_cache_endpoint),
                ("--shared-cache-credentials", args.shared_cache_credentials),
                ("--shared-cache-readonly", args.shared_cache_readonly or None),
                ("--shared-cache-private", args.shared_cache_private or None),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(f"{given[0]} goes with --shared-cache")
        return None
    bucket, prefix = parse_shared_cache(args.shared_cache)
    if args.shared_cache_endpoint is None:
        raise ConfigError("--shared-cache needs --shared-cache-endpoint (the S3 store's URL)")
    return SharedCache(
        endpoint=parse_endpoint(args.shared_cache_endpoint, "--shared-cache-endpoint"),
        bucket=bucket,
        prefix=prefix,
        credentials=read_s3_credentials(
            args.shared_cache_credentials,
            key_id_env=SHARED_KEY_ID_ENV,
            secret_env=SHARED_SECRET_ENV,
        ),
        readonly=args.shared_cache_readonly,
        private=args.shared_cache_private,
    )


def _hdf5_workers(value: int | None) -> int:
    if value is None:
        return default_hdf5_workers()
    if value < 0:
        raise ConfigError(f"--hdf5-workers {value}: a number of processes, 0 or more")
    return value


def _memory_limit(text: str) -> int:
    limit = parse_size(text)
    if limit < SMALLEST:
        raise ConfigError(f"--memory-limit {text} is too small: at least {SMALLEST >> 20}M")
    return limit


def _positive(value: float, name: str) -> float:
    if not value > 0:
        raise ConfigError(f"{name} must be positive")
    return value


def _check_s3_options(args: argparse.Namespace) -> None:
    if args.s3_only:
        if args.s3_endpoint is None:
            raise ConfigError(
                "--s3-only needs --s3-endpoint (DCOR's: https://objectstore.hpccloud.mpcdf.mpg.de)"
            )
        if not args.circle:
            raise ConfigError("--s3-only needs at least one --circle ID")
        if args.host is not None or args.api_key_file is not None:
            raise ConfigError("--s3-only talks to no DCOR host: drop --host and --api-key-file")
    elif args.circle:
        raise ConfigError("--circle goes with --s3-only")
    if args.s3_credentials_file is not None and args.s3_endpoint is None:
        raise ConfigError("--s3-credentials-file goes with --s3-endpoint")
    if args.s3_bucket_template != "circle-{organization_id}" and args.s3_endpoint is None:
        raise ConfigError("--s3-bucket-template goes with --s3-endpoint")


def _settings(args: argparse.Namespace, mountpoint: Path, **more: object) -> MountSettings:
    """The settings of the source options (`_add_source_options`, `_add_s3_options`)."""
    _check_s3_options(args)
    endpoint = parse_endpoint(args.s3_endpoint) if args.s3_endpoint is not None else None
    return MountSettings(
        mountpoint=mountpoint,
        host=parse_host(args.host or DEFAULT_HOST),
        token=None if args.s3_only else read_token(args.api_key_file),
        s3_endpoint=endpoint,
        s3_credentials=read_s3_credentials(args.s3_credentials_file) if endpoint else None,
        s3_only=args.s3_only,
        circles=tuple(dict.fromkeys(parse_circle(c) for c in args.circle)),
        s3_bucket_template=parse_bucket_template(args.s3_bucket_template),
        cache_dir=(args.cache_dir or default_cache_dir()).absolute(),
        cache_size=parse_size(args.cache_size),
        memory_limit=_memory_limit(args.memory_limit),
        timeout=_positive(args.timeout, "--timeout"),
        dir_cache_time=_positive(args.dir_cache_time, "--dir-cache-time"),
        log_level=args.log_level,
        log_file=args.log_file.absolute() if args.log_file else None,
        metrics_file=args.metrics_file.absolute() if args.metrics_file else None,
        shared_cache=_shared_cache(args),
        hdf5_workers=_hdf5_workers(args.hdf5_workers),
        **more,  # type: ignore[arg-type]
    )


def _run_mount(args: argparse.Namespace) -> int:
    from .daemon.mount import mount

    settings = _settings(
        args,
        args.mountpoint.absolute(),
        foreground=args.foreground,
        allow_other=args.allow_other,
        kernel_tuning=args.kernel_tuning,
    )
    return mount(settings)


def _run_webdav(args: argparse.Namespace) -> int:
    from .daemon import webdav

    host, port = parse_listen(args.listen)
    users = read_password_file(args.password_file) if args.password_file else None
    web = WebDavSettings(host=host, port=port, users=users)
    settings = _settings(args, Path(f"webdav-{host}-{port}"), foreground=True)
    return webdav.main(settings, web)


def _add_umount(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "umount",
        help="unmount a dcorfs mount (lazily when its daemon is gone)",
        description="Unmount MOUNTPOINT with fusermount3 -u; lazily (-z) if that fails.",
    )
    parser.add_argument("mountpoint", type=Path)
    parser.set_defaults(run=_run_umount)


def _run_umount(args: argparse.Namespace) -> int:
    from .admin.unmount import unmount

    return unmount(args.mountpoint.absolute())


def _add_status(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "status",
        help="what a mount or share is doing: cache use, hit ratio, bytes fetched, errors",
        description=(
            "Summarize MOUNTPOINT/.dcorfs/status.json of a running mount, or URL/.dcorfs/"
            "status.json of a running `dcorfs webdav` share (asked as the first user of "
            "--password-file when it has users)."
        ),
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT|URL")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true", help="the whole report as JSON")
    how.add_argument("--openmetrics", action="store_true", help="as OpenMetrics text (Prometheus)")
    parser.add_argument(
        "--password-file", type=Path, metavar="FILE", help="the share's users (user:password)"
    )
    parser.set_defaults(run=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from .admin.status import show

    users = read_password_file(args.password_file) if args.password_file else None
    return show(args.mountpoint, as_json=args.json, as_metrics=args.openmetrics, users=users)


def _add_warmup(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "warmup",
        help="read files or trees of a mount into the cache, with progress",
        description=(
            "Read PATHs (files or directories inside one dcorfs mount) once, so that their "
            "bytes are in the persistent cache: before going offline or a long job. Resumes "
            "where an interrupted run stopped (files finished before are skipped)."
        ),
    )
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    parser.add_argument("--dry-run", action="store_true", help="only count files and bytes")
    parser.add_argument("--again", action="store_true", help="re-read files warmed before")
    parser.add_argument(
        "--jobs", type=int, default=4, help="files read at the same time (%(default)s)"
    )
    parser.set_defaults(run=_run_warmup)


def _run_warmup(args: argparse.Namespace) -> int:
    from .admin.warmup import warmup

    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    return warmup(args.paths, dry_run=args.dry_run, again=args.again, jobs=args.jobs)


def _add_cache(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "cache",
        help="what the cache holds (info) or empty it (clear)",
        description="Inspect or empty a dcorfs cache dir (default as for mount).",
    )
    parser.add_argument("action", choices=["info", "clear"])
    parser.add_argument(
        "--cache-dir", type=Path, help="the cache dir (default $XDG_CACHE_HOME/dcorfs)"
    )
    parser.add_argument("--json", action="store_true", help="info: as JSON")
    parser.add_argument(
        "--force", action="store_true", help="clear: even while a mount uses the dir"
    )
    parser.set_defaults(run=_run_cache)


def _run_cache(args: argparse.Namespace) -> int:
    from .admin import cache_admin

    cache_dir = (args.cache_dir or default_cache_dir()).absolute()
    if args.action == "info":
        return cache_admin.info(cache_dir, as_json=args.json)
    return cache_admin.clear(cache_dir, force=args.force)


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "demo",
        help="mount a sample DCOR served on loopback: try dcorfs offline",
        description=(
            "Generate sample data (circles, public and private datasets), serve it with the "
            "devserver on 127.0.0.1 and mount it at MOUNTPOINT in the foreground. Ctrl-C or "
            "`dcorfs umount MOUNTPOINT` unmounts and removes everything."
        ),
    )
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument(
        "--events", type=int, default=5000, help="events of the main measurement (5000)"
    )
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .admin.demo import demo

    if args.events < 10:
        raise ConfigError("--events must be at least 10")
    return demo(args.mountpoint.absolute(), events=args.events)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcorfs",
        description=(
            "Mount DCOR (deformability cytometry open repository) as a read-only filesystem."
        ),
    )
    parser.add_argument("--version", action="version", version=f"dcorfs {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_mount(commands)
    _add_webdav(commands)
    _add_umount(commands)
    _add_status(commands)
    _add_warmup(commands)
    _add_cache(commands)
    _add_demo(commands)
    _add_devserver(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    # Commands report failures in one line themselves; only the devserver logs to the console.
    # The mount daemon configures its own logging (logs.configure).
    level = getattr(args, "console_log", logging.ERROR)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"dcorfs: {exc}", file=sys.stderr)
        return 2
    except DcorfsError as exc:
        print(f"dcorfs: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a stale mount under a path given to a command
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dcorfs: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# `mount.dcorfs`: mount(8)'s helper interface (`mount -t dcorfs SOURCE DIR -o OPTIONS`, fstab
# lines with `_netdev,x-systemd.automount`): the options of `dcorfs mount`, one to one
HELPER_VALUES = (
    "cache_dir",
    "cache_size",
    "memory_limit",
    "hdf5_workers",
    "timeout",
    "dir_cache_time",
    "api_key_file",
    "log_file",
    "log_level",
    "s3_endpoint",
    "s3_credentials_file",
    "metrics_file",
    "shared_cache",
    "shared_cache_endpoint",
    "shared_cache_credentials",
)
HELPER_FLAGS = ("allow_other", "kernel_tuning", "shared_cache_readonly", "shared_cache_private")
# what mount(8) and fstab say for every filesystem: nothing for dcorfs to do (the mount is
# read-only whatever rw says)
HELPER_GENERIC = (
    "defaults", "ro", "rw", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
    "owner", "group", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
    "relatime", "norelatime", "strictatime", "lazytime", "nolazytime", "sync", "async",
)  # fmt: skip


def helper_argv(argv: Sequence[str]) -> list[str] | None:
    """`dcorfs mount`'s arguments for mount(8)'s `SOURCE DIR [-sfnv] [-o OPTS] [-t TYPE]`;
    None for `-f` (pretend). SOURCE is the DCOR host (`dcorfs`: the default one)."""
    positional: list[str] = []
    options: list[str] = []
    sloppy = fake = False
    items = iter(argv)
    for item in items:
        if item == "-o":
            options += next(items, "").split(",")
        elif item in ("-t", "-N"):
            next(items, None)
        elif item.startswith("-") and len(item) > 1:
            sloppy |= "s" in item
            fake |= "f" in item
        else:
            positional.append(item)
    if len(positional) != 2:
        raise ConfigError("usage: mount.dcorfs HOST MOUNTPOINT [-o OPTIONS]")
    source, mountpoint = positional
    args = [mountpoint] + ([] if source in ("dcorfs", "none") else ["--host", source])
    for option in filter(None, options):
        name, sep, value = option.partition("=")
        key = name.replace("-", "_")
        if key in HELPER_VALUES and sep:
            args += [f"--{key.replace('_', '-')}", value]
        elif key in HELPER_FLAGS and not sep:
            args.append(f"--{key.replace('_', '-')}")
        elif key in HELPER_GENERIC or name.startswith("x-") or name == "comment" or sloppy:
            continue
        else:
            raise ConfigError(f"unknown mount option {name!r} for dcorfs")
    return None if fake else args


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """The `mount.dcorfs` program (install it as /sbin/mount.dcorfs: README)."""
    try:
        args = helper_argv(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"mount.dcorfs: {exc}", file=sys.stderr)
        return 2
    return 0 if args is None else main(["mount", *args])
