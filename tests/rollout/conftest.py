import os
import shutil
import sys
import tempfile

import pytest

# Spawned trainer ranks and Ray workers import the helper modules of this folder by name.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)

RAY_ENV = {"RAY_AUTH_MODE": "disabled",  # else Ray writes ~/.ray/auth_token
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
# Tiny engines: 64 MiB of KV cache is 1000s of tokens for this model; 4 sequences at a time. Prompts are
# token ids and no test uses stop strings, so the engines skip loading the 18 MB tokenizer (~15 s each).
ENGINE_KWARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=4, kv_cache_bytes=64 << 20, seed=0,
                     skip_tokenizer_init=True)


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


def rollout_config(**overrides):
    from prism_mcore.config import load_config

    base = {"num_engines": 2, "timeout_s": 240, "mode": "disaggregated"}
    return load_config(None, [f"rollout.{k}={v}" for k, v in {**base, **overrides}.items()]).rollout


def start_pool(model_dir, namespace, **overrides):
    from prism_mcore.rollout.engine_pool import EnginePool, make_placement

    rollout = rollout_config(**overrides)
    placement = make_placement(rollout, trainer_ranks=2)
    return EnginePool(str(model_dir), rollout, ENGINE_KWARGS, placement=placement, namespace=namespace).start()
