"""Shared fixtures: one local Ray instance per session, real photos, realistic test weights."""

from __future__ import annotations

import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/: `import helpers`

from helpers import make_calibrated_state_dict  # noqa: E402

from resnet_features.core.samples import write_samples  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_s3fs_clients():
    """Tests start moto servers on ports of their own and point AWS_ENDPOINT_URL at them, while
    fsspec caches one S3FileSystem per set of arguments (the endpoint from the environment is
    not one of them): without this, a test could reach an earlier test's stopped server."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (Ray's testing guide).

    address="local": never join a cluster someone else started on this machine (a bare
    ray.init() connects to the latest one it finds in /tmp/ray)."""
    import ray

    if not ray.is_initialized():
        # address="local": a private instance, never a cluster another process started here.
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The session Ray's GCS address: a job subprocess given it as RAY_ADDRESS joins that Ray
    (as a driver joins a running cluster) instead of starting and stopping one of its own."""
    return ray_local.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def submit_head():
    """`(address, env)` of one `ray start --head` (token auth, 2 CPUs) for the whole session:
    the tests that go through `ray job submit` share it instead of each starting a cluster."""
    from raycluster import cluster_env, ray_head

    env = cluster_env()
    with ray_head(env=env) as address:
        yield address, env


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> str:
    """A folder of 16 real photos (crops and rescales), JPEG, PNG and WebP, varied sizes."""
    folder = str(tmp_path_factory.mktemp("photos"))
    write_samples(folder, count=16, seed=1)
    return folder


@pytest.fixture(scope="session")
def few_photos(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("few_photos"))
    write_samples(folder, count=6, seed=2)
    return folder


@pytest.fixture()
def blobs(few_photos) -> dict[str, bytes]:
    """The bytes of each of `few_photos`' files, by name."""
    names = sorted(os.listdir(few_photos))
    return {n: open(os.path.join(few_photos, n), "rb").read() for n in names}


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def resnet18_weights(weights_dir) -> str:
    return make_calibrated_state_dict("resnet18", os.path.join(weights_dir, "resnet18.pth"))


@pytest.fixture(scope="session")
def calibrated(weights_dir):
    """`calibrated(name)` -> path of a BN-calibrated state_dict for that model (cached)."""
    def get(name: str) -> str:
        return make_calibrated_state_dict(name, os.path.join(weights_dir, f"{name}.pth"))
    return get
