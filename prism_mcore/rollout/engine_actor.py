"""One rollout engine as a Ray actor (`EngineActor`, created by engine_pool.EnginePool), and the temp dir each
engine process keeps to itself so that what vLLM leaves in the temp dir goes with the engine.
"""
from __future__ import annotations

from typing import Any

import ray

from prism_mcore.rollout.engine import EngineHealth

DEFAULT_ENGINE = "prism_mcore.rollout.vllm_engine:VLLMEngine"


class EngineActor:
    """The Ray actor around one `VLLMEngine`. Health runs on its own thread so it answers mid-generation."""

    def __init__(self, engine_id: int, engine_kwargs: dict[str, Any], engine_cls: str = DEFAULT_ENGINE):
        import importlib
        import os

        self.scratch = engine_scratch()
        engine_kwargs = dict(engine_kwargs)
        devices = engine_kwargs.pop("cuda_visible_devices", None)
        if devices is not None:  # before the engine touches CUDA (Placement.cuda_devices says why)
            os.environ["CUDA_VISIBLE_DEVICES"] = devices

        module, name = engine_cls.split(":")
        self.engine = getattr(importlib.import_module(module), name)(engine_id=engine_id, **engine_kwargs)

    def generate(self, prompts, params, expect_version=None):
        return self.engine.generate(prompts, params, expect_version)

    def score(self, sequences):
        return self.engine.score(sequences)

    def receive_bucket(self, version, bucket):
        return self.engine.receive_bucket(version, bucket)

    def commit_update(self, version, expected_tensors, digest=False):
        return self.engine.commit_update(version, expected_tensors, digest)

    def abort_update(self, version=None):
        return self.engine.abort_update(version)

    def sleep(self):
        return self.engine.sleep()

    def wake_up(self):
        return self.engine.wake_up()

    def read_params(self, names=None):
        return self.engine.read_params(names)

    def join_weight_group(self, spec, rank):
        """torch_distributed transport: become member `rank` of a trainer rank's weight group."""
        from prism_mcore.rollout.transport_dist import join_group

        join_group(spec, rank)

    def has_weight_group(self, key):
        from prism_mcore.rollout.transport_dist import has_group

        return has_group(key)

    @ray.method(concurrency_group="control")
    def health(self) -> EngineHealth:
        return self.engine.health()

    @ray.method(concurrency_group="control")
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="control")
    def close(self) -> None:
        """Before the pool kills the actor: remove its temp dir (a kill runs no cleanup of its own)."""
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)


ENGINE_SCRATCH_PREFIX = "prism_engine_"


def engine_scratch() -> str:
    """A temp dir of this engine process, made its default temp dir: vLLM puts its torch.distributed rendezvous
    file (`vllm_dist_<uuid>`) in the temp dir and never removes it, so under this one the file goes with the
    engine (`EngineActor.close`, or the next run's `reap_orphaned_engine_scratch` after a crash or a kill).
    torch.compile's cache keeps its usual place: it is meant to outlive the engine."""
    import getpass
    import os
    import tempfile

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"))
    scratch = tempfile.mkdtemp(prefix=f"{ENGINE_SCRATCH_PREFIX}{os.getpid()}_")
    os.environ["TMPDIR"] = tempfile.tempdir = scratch  # subprocesses of the engine inherit it
    return scratch


def reap_orphaned_engine_scratch(root: str | None = None) -> int:
    """Remove the temp dirs of engine processes on this node that are gone (killed, crashed, restarted by
    Ray). Returns how many were removed."""
    import glob
    import os
    import shutil
    import tempfile

    from prism_mcore.platform.processes import alive

    removed = 0
    for path in glob.glob(os.path.join(root or tempfile.gettempdir(), f"{ENGINE_SCRATCH_PREFIX}*")):
        pid = os.path.basename(path)[len(ENGINE_SCRATCH_PREFIX):].split("_", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed
