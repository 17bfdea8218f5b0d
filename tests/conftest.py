"""Shared fixtures: real encoded images, a real S3-protocol server (moto) on loopback,
one local Ray for the session."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Credentials for the loopback S3 server; set before Ray starts so workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)

from pipeline.testdata import images  # noqa: E402


@pytest.fixture(scope="session")
def photos():
    return images.photos()


@pytest.fixture(scope="session")
def good(photos):
    return images.good_images(photos)


@pytest.fixture(scope="session")
def hostile(photos):
    return images.hostile_images(photos)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto server mode) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket on the loopback server; yields (endpoint, bucket name)."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    yield s3_server, name
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=name, Key=obj["Key"])
    s3.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the test session (2 CPUs, like this machine)."""
    import ray

    if not ray.is_initialized():
        from pipeline.rundir import IDLE_WORKER_MS

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
                 _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_MS})
    yield ray
    ray.shutdown()
