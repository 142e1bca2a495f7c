"""The Ray cluster a run's engines live in: joined (a launcher's, `rollout.ray_address` / $RAY_ADDRESS) or
started for the run on this machine, and what the engines of a pool ask vLLM for.

Joined clusters are the multi-node case (launch/mlp_launch.sh, launch/slurm_ray.sbatch): every trainer rank
attaches to its own node's raylet (`join`), so the node of each rank is `ray.get_runtime_context().get_node_id()`
and placement (engine_pool.make_placement) can pin each rank's bundle there and keep disaggregated engines off
the trainer's nodes. Several raylets on one host (emulated nodes) are told apart by their Ray temp dir, which
the launcher exports to the ranks it starts as $PRISM_RAY_NODE_DIR.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("prism.rollout")


@dataclass
class RayConnection:
    owned: bool  # started for this run (shut down with it) or joined (only disconnected)
    address: str
    trainer_node: str  # Ray node id of the driver
    device: str  # "gpu" or "cpu": what the engines' bundles ask for
    temp_dir: str | None = None  # of a Ray started for the run: removed after it stops


def ray_target(ray_address: str | None) -> str | None:
    """The cluster to join: `rollout.ray_address`, else $RAY_ADDRESS, else None (start one)."""
    return ray_address or os.environ.get("RAY_ADDRESS") or None


def connect(ray_address: str | None, namespace: str, num_cpus: int, temp_dir: str | None) -> RayConnection:
    """Join the cluster `ray_target` names, or start a local one with `num_cpus` logical CPUs (and every GPU
    of the machine) under `temp_dir`. Engines are placed on GPUs when the cluster has any."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    target = ray_target(ray_address)
    if target:
        join(target, namespace)
    else:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        # "local": a Ray of our own even when /tmp/ray/ray_current_cluster names another (ray.init's default
        # would join that one, someone else's cluster on a shared machine).
        ray.init(address="local", num_cpus=num_cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
                 namespace=namespace, object_store_memory=256 * 2**20, _temp_dir=temp_dir)
    device = "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    return RayConnection(not target, ray.get_runtime_context().gcs_address, ray.get_runtime_context().get_node_id(),
                         device, None if target else temp_dir)


NODE_DIR_ENV = "PRISM_RAY_NODE_DIR"


def join(address: str, namespace: str) -> str:
    """Attach this process to the raylet of its own node in the cluster at `address` (the one whose temp dir
    is $PRISM_RAY_NODE_DIR when set) and return that node's Ray node id."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        node_dir = os.environ.get(NODE_DIR_ENV) or None
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=False, configure_logging=False,
                     _temp_dir=node_dir)
        except RuntimeError as e:
            raise RuntimeError(f"cannot join the Ray cluster at {address} from this node"
                               f"{f' ({NODE_DIR_ENV}={node_dir})' if node_dir else ''}: is a Ray node running here "
                               f"(launch/mlp_launch.sh starts one on every node)? {e}") from None
    return ray.get_runtime_context().get_node_id()


def disconnect(conn: RayConnection | None) -> None:
    """Leave Ray; a Ray started for the run stops with it, and its temp dir goes."""
    import shutil

    import ray

    ray.shutdown()
    if conn is not None and conn.owned and conn.temp_dir:
        shutil.rmtree(conn.temp_dir, ignore_errors=True)


def engine_settings(rollout, max_prompt_length: int, model_dtype: str, device: str) -> tuple[dict, str | None]:
    """vLLM keyword arguments from `rollout` (lengths were checked at config load, schema.rollout_problems),
    and a note when a setting cannot apply on this device.

    On CPU prefills stay whole (chunked prefill off, a token budget >= the context): vLLM rewinds a seeded
    request's generator after a chunked prefill step, which CPU generators cannot do, so seeded sampling
    would fail or lose reproducibility."""
    context = rollout.max_model_len or max_prompt_length + rollout.max_tokens
    batched = rollout.max_num_batched_tokens or context
    chunked, note = rollout.enable_chunked_prefill, None
    if device == "cpu" and (chunked or batched < context):
        note = (f"rollout.enable_chunked_prefill={chunked}, rollout.max_num_batched_tokens={batched}: CPU engines "
                f"run whole prefills (chunked prefill off, {context} tokens per step)")
        chunked, batched = False, max(batched, context)
    kwargs = {"dtype": rollout.engine_dtype(model_dtype), "max_model_len": context, "max_num_seqs": rollout.max_num_seqs,
              "max_num_batched_tokens": batched, "enable_chunked_prefill": chunked,
              "enforce_eager": rollout.enforce_eager}
    if device == "gpu":
        share = rollout.gpu_memory_utilization
        kwargs["gpu_memory_utilization"] = share or (0.5 if rollout.mode == "colocated" else 0.85)
    return kwargs, note
