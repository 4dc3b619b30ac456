import logging
import os

import pytest

from tests.helpers import write_coco, write_tiny_clip
from tests.s3_fixtures import s3_server  # noqa: F401  (session-scoped moto server fixture)

# Fake AWS credentials for the whole session, set before any Ray worker starts so that workers inherit them (the
# moto server accepts any); never let an SDK reach for the EC2 metadata service from a test.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (start-up and actor pools cost seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def coco_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    info = write_coco(root, n_images=10)
    return root, info

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request at INFO
