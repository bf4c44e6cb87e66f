"""doc/SEMANTICS.md's examples, run against a real mount: each `$` command's output, exactly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import REPO, DevServer
from ..mounts import mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse]
DOC = REPO / "doc" / "SEMANTICS.md"


def examples() -> list[tuple[str, str]]:
    """(command, expected output) of every `$` line in the document's console blocks."""
    found: list[tuple[str, str]] = []
    for block in re.findall(r"```console\n(.*?)```", DOC.read_text(), flags=re.S):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, _, output = chunk.partition("\n")
            found.append((command, output))
    return found


@pytest.fixture(scope="module")
def mount(devserver: DevServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("semantics")
    with mounted(root / "mnt", devserver.url, root / "cache") as mnt:
        yield mnt


def test_the_document_has_examples() -> None:
    assert len(examples()) >= 12


@pytest.mark.parametrize(("command", "expected"), examples(), ids=lambda v: v[:60])
def test_example(mount: Path, command: str, expected: str) -> None:
    env = {
        **os.environ,
        "LC_ALL": "C",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=mount,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout + done.stderr == expected
