"""`mount.dcorfs`, mount(8)'s helper: options map one to one onto `dcorfs mount`'s, what fstab
says for every filesystem is ignored, anything else is refused; the fstab line of the README
yields an automount unit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dcorfs.cli import helper_argv
from dcorfs.errors import ConfigError

GENERATOR = Path("/usr/lib/systemd/system-generators/systemd-fstab-generator")


def test_options_map_onto_the_mount_command() -> None:
    options = (
        "rw,_netdev,comment=systemd.automount,x-systemd.automount,x-systemd.idle-timeout=30min,nofail,cache_dir=/var/c,"
        "cache-size=50G,memory_limit=200M,allow_other,api_key_file=/etc/dcorfs/key,nosuid,nodev"
    )
    assert helper_argv(["dcor.mpl.mpg.de", "/mnt/dcor", "-o", options]) == [
        "/mnt/dcor",
        "--host",
        "dcor.mpl.mpg.de",
        "--cache-dir",
        "/var/c",
        "--cache-size",
        "50G",
        "--memory-limit",
        "200M",
        "--allow-other",
        "--api-key-file",
        "/etc/dcorfs/key",
    ]
    assert helper_argv(["dcorfs", "/mnt/dcor", "-n", "-v", "-t", "dcorfs"]) == ["/mnt/dcor"]
    assert helper_argv(["-f", "dcorfs", "/mnt/dcor"]) is None  # mount -f: pretend


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dcorfs", "/mnt", "-o", "cache_dir"], "unknown mount option 'cache_dir'"),
        (["dcorfs", "/mnt", "-o", "allow_other=1"], "unknown mount option 'allow_other'"),
        (["dcorfs", "/mnt", "-o", "uid=1000"], "unknown mount option 'uid'"),
        (["dcorfs"], "usage"),
    ],
)
def test_what_dcorfs_does_not_know_is_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        helper_argv(argv)
    if len(argv) > 1:  # sloppy (-s): unknown options are let through
        assert helper_argv(["-s", *argv]) == [argv[1]]


@pytest.mark.skipif(not GENERATOR.exists(), reason=f"{GENERATOR} missing (apt install systemd)")
def test_the_readme_fstab_line_yields_an_automount(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = next(
        x for x in readme.splitlines() if x.startswith("dcor.mpl.mpg.de ") and "dcorfs" in x
    )
    fstab = tmp_path / "fstab"
    fstab.write_text(line + "\n")
    out = tmp_path / "units"
    out.mkdir()
    subprocess.run(
        [str(GENERATOR), str(out), str(out), str(out)],
        check=True,
        env={**os.environ, "SYSTEMD_FSTAB": str(fstab)},
        capture_output=True,
    )
    mount = (out / "mnt-dcor.mount").read_text()
    assert "What=dcor.mpl.mpg.de" in mount and "Type=dcorfs" in mount
    assert "Where=/mnt/dcor" in (out / "mnt-dcor.automount").read_text()
    assert (out / "remote-fs.target.requires" / "mnt-dcor.automount").exists()


CLUSTER = Path(__file__).resolve().parents[2] / "doc" / "CLUSTER.md"


def test_the_cluster_notes_mount_lines_are_dcorfs_options() -> None:
    """doc/CLUSTER.md's fstab line and DaemonSet command are options `dcorfs mount` takes."""
    from dcorfs.cli import build_parser

    text = CLUSTER.read_text()
    line = next(x for x in text.splitlines() if x.startswith("dcor.mpl.mpg.de ") and "dcorfs" in x)
    source, mountpoint, kind, options = line.split()[:4]
    assert kind == "dcorfs"
    args = helper_argv([source, mountpoint, "-o", options])
    assert args is not None
    parsed = build_parser().parse_args(["mount", *args])
    assert parsed.shared_cache == "s3://dcorfs-cache/cluster"
    assert parsed.shared_cache_credentials == Path("/etc/dcorfs/shared-cache.ini")
    yaml = pytest.importorskip("yaml")
    documents = list(yaml.safe_load_all(text.split("```yaml\n", 1)[1].split("```", 1)[0]))
    daemonset = next(d for d in documents if d["kind"] == "DaemonSet")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["privileged"] is True
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["mnt"]["mountPropagation"] == "Bidirectional"
    assert mounts["fuse"]["mountPath"] == "/dev/fuse"
    command = container["command"]
    assert command[:2] == ["dcorfs", "mount"]
    parsed = build_parser().parse_args([str(part) for part in command[1:]])
    assert parsed.shared_cache and parsed.shared_cache_endpoint and parsed.allow_other
