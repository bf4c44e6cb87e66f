"""dclab's own DCOR client against a devserver: the proof that a devserver mode is faithful."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from typing import Any

import dclab
import pytest
from dclab.rtdc_dataset.fmt_dcor.api import APIHandler

from dcorfs.devserver.server import DevServer

from .conftest import ServerProcess


@pytest.fixture(autouse=True)
def forget_api_keys() -> Iterator[None]:
    """dclab remembers tokens class-wide and tries them all; every test starts without
    (autouse in each module that imports it). Afterwards, the sockets dclab's client leaves
    open (its HTTP sessions, in reference cycles) are collected here, where their
    ResourceWarning is dclab's: else a later collection raises it in whatever test runs then."""
    APIHandler.api_keys = []
    yield
    APIHandler.api_keys = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def open_remote(server: DevServer | ServerProcess, rid: str, token: str = "") -> Any:
    """A resource of `server` opened with dclab's DCOR client (token only if given)."""
    host = server.url.split("://", 1)[1]
    return dclab.new_dataset(rid, host=host, use_ssl=False, api_key=token, remember_api_key=False)
