"""A real S3 endpoint for tests and benchmarks: moto's server on 127.0.0.1 (as s3fs tests do)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

#: Dummy credentials: moto accepts any; tests check they never leak into outputs or logs.
ACCESS_KEY = "AKIATESTRESNETFEATURES"
SECRET_KEY = "s3cr3t-Do-Not-Leak-7f9c2b"


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT

    def storage_options(self) -> dict:
        """fsspec/s3fs options for this server, credentials included (the --storage-options way)."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def env(self) -> dict[str, str]:
        """The same through the standard environment variables (the instance/CI way)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY,
                     region_name="us-east-1").create_bucket(Bucket=name)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())


@contextlib.contextmanager
def moto_s3(port: int = 0) -> Iterator[S3Server]:
    """Start moto's threaded server on 127.0.0.1 (a free port by default); stop it on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, bound = server.get_host_and_port()
    try:
        yield S3Server(endpoint=f"http://{host}:{bound}")
    finally:
        server.stop()
