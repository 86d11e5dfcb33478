"""Fixtures for the object-store tests: a SeaweedFS S3 server for the session, a fresh bucket for each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_helpers import SeaweedS3, weed_missing


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS server for the whole session (skipped, saying why, when `weed` or s3fs is absent)."""
    missing = weed_missing()
    if missing is not None:
        pytest.skip(missing)
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    """The server, with this process's environment set as a client's: dummy credentials and the endpoint."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_url(s3_env: SeaweedS3) -> str:
    """A store URL in a new bucket of the session's server."""
    return f"s3://{s3_env.make_bucket()}/hub"


@pytest.fixture
def own_s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedS3]:
    """A server of the test's own, which the test may kill and restart."""
    missing = weed_missing()
    if missing is not None:
        pytest.skip(missing)
    server = SeaweedS3(tmp_path / "seaweedfs")
    server.start()
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    try:
        yield server
    finally:
        server.stop()
