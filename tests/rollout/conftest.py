import os
import shutil
import sys
import tempfile

import pytest

# Spawned trainer ranks and Ray workers import the helper modules of this folder by name.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.join(os.path.dirname(HERE), "models"))  # the tiny Qwen3-VL checkpoints of vl_jobs.py
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)

RAY_ENV = {"RAY_AUTH_MODE": "disabled",  # else Ray writes ~/.ray/auth_token
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session (temp files under a directory of ours, removed after)."""
    os.environ.update(RAY_ENV)
    import ray

    tmp = tempfile.mkdtemp(prefix="prism_ray_", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    ray.init(num_cpus=8, include_dashboard=False, object_store_memory=256 * 2**20, _temp_dir=tmp,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
