"""Real S3 over HTTP on loopback for tests: one moto server per session, a fresh bucket per test.

tests/conftest.py registers the fixtures; take ``moto_s3`` as a fixture argument.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

# Values a test can search logs and artifacts for: they must never leak.
DUMMY_KEY = "AKIADELTATUNETESTKEY"
DUMMY_SECRET = "deltatune-test-secret-must-not-leak"


class MotoS3(NamedTuple):
    """A bucket on the session's moto server and the fsspec options that reach it."""

    endpoint_url: str
    storage_options: dict[str, Any]
    bucket: str


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Start moto's threaded S3 server on a free loopback port; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def moto_s3(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> MotoS3:
    """A fresh, empty bucket plus storage_options for s3fs (dummy credentials, loopback endpoint)."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # S3-compatible stores may reject botocore's default CRC32 checksums (docs/environment.md).
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    options: dict[str, Any] = {
        "key": DUMMY_KEY,
        "secret": DUMMY_SECRET,
        "client_kwargs": {"endpoint_url": moto_server},
    }
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
    return MotoS3(endpoint_url=moto_server, storage_options=options, bucket=bucket)
