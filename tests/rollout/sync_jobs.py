"""Rank functions for the rollout tests (module level, so spawned ranks import them by name)."""
from __future__ import annotations

import torch

# Hidden-state dtype of the trainer; vLLM runs the same dtype so float32 tolerances apply.
DTYPE = "float32"


def build_from_hf(hf_dir: str, layout: dict, extra: list[str] = ()):
    """The Megatron model at `layout` (of the checkpoint's family, through its spec), loaded from the HF
    checkpoint the engines also start from."""
    from prism_mcore.checkpoint.hf_weights import load_hf
    from prism_mcore.config import load_config
    from prism_mcore.models.spec import resolve
    from prism_mcore.parallel.layout import init_model_parallel

    overrides = [f"model.hf_path={hf_dir}"] + [f"parallel.{k}={v}" for k, v in layout.items()] + list(extra)
    cfg = load_config(None, overrides)
    init_model_parallel(cfg)
    spec, arch = resolve(cfg.model)
    model = spec.build(arch, cfg.parallel)
    load_hf(model, spec, arch, hf_dir)
    return cfg, model


def hf_tensors_at_layouts(cases: list[tuple[str, dict]]) -> list[dict[str, torch.Tensor]]:
    """What iter_hf_tensors yields on this rank (cloned) for each (hf_dir, layout), one process for all."""
    from prism_mcore.parallel.shards import iter_local_shards
    from prism_mcore.rollout.weight_sync import iter_hf_tensors

    out = []
    for hf_dir, layout in cases:
        cfg, model = build_from_hf(hf_dir, layout)
        # The public shard iterator hands out views of the live parameters, never copies.
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        assert all(s.data.untyped_storage().data_ptr() in params for s in iter_local_shards(model))
        out.append({name: t.clone() for name, t in iter_hf_tensors(model, cfg.model)})
    return out


def one_step(model, cfg, lr: float = 3e-2, seed: int = 0):
    """One AdamW step on random real-vocabulary tokens, so the synced weights differ from the checkpoint."""
    from mcore_jobs import lm_forward_step
    from prism_mcore.trainer.step import build_optimizer, megatron_step, wrap_ddp

    ddp = wrap_ddp(model)
    opt = build_optimizer([ddp], cfg.optim.model_copy(update={"lr": lr, "weight_decay": 0.0}))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=g)
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
    _, _, skipped = megatron_step([ddp], opt, lm_forward_step, [batch], 1, 16, 2)
    assert not skipped
    return ddp


def full_logits(model, cfg, ids: list[int]) -> torch.Tensor:
    """[len, vocab] logits of one sequence at TP/EP layouts with PP=1, identical on every rank."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens = torch.tensor([ids])
    positions = torch.arange(len(ids)).unsqueeze(0)
    with torch.no_grad():
        out = model(tokens, positions, None)  # [b, s, vocab/tp]
        return gather_from_tensor_model_parallel_region(out)[0, :, : cfg.model.vocab_size].float()


def greedy(model, cfg, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding without a KV cache: one full forward per new token."""
    seq = list(prompt)
    for _ in range(new_tokens):
        seq.append(int(full_logits(model, cfg, seq)[-1].argmax()))
    return seq[len(prompt):]


def sequence_logprobs(model, cfg, seqs: list[list[int]]) -> list[list[float]]:
    out = []
    for s in seqs:
        lp = torch.log_softmax(full_logits(model, cfg, s), dim=-1)
        out.append(lp[:-1].gather(-1, torch.tensor(s[1:])[:, None])[:, 0].tolist())
    return out


def train_sync_decode(hf_dir: str, layout: dict, endpoints, prompts: list[list[int]], probe_seqs: list[list[int]],
                      version: int, new_tokens: int = 8, bucket_mb: float = 0.5):
    """One optimizer step, sync to the engines with the log-prob probe, then the trainer's own greedy
    decode and log-probs (for the test process to compare with the engines)."""
    import torch.distributed as dist

    from prism_mcore.rollout.probe import Probe
    from prism_mcore.rollout.weight_sync import sync_weights

    cfg, model = build_from_hf(hf_dir, layout)
    ddp = one_step(model, cfg)
    model.eval()
    probe = Probe(probe_seqs, sequence_logprobs(model, cfg, probe_seqs), DTYPE)
    stats = sync_weights(ddp.module, cfg.model, endpoints, version, bucket_mb=bucket_mb, timeout_s=300, step=1,
                         probe=probe)
    outputs = [greedy(model, cfg, p, new_tokens) for p in prompts]
    if dist.get_rank() != 0:
        return None
    return {"greedy": outputs, "trainer_logprobs": probe.trainer_logprobs, "stats": stats}


def sync_checkpoint(hf_dir: str, layout: dict, endpoints, version: int, bucket_mb: float = 0.05):
    """Sync the checkpoint's weights (no training) from `layout`; returns rank 0's SyncStats with digests."""
    import torch.distributed as dist

    from prism_mcore.rollout.weight_sync import sync_weights

    cfg, model = build_from_hf(hf_dir, layout)
    stats = sync_weights(model, cfg.model, endpoints, version, bucket_mb=bucket_mb, timeout_s=300, digest=True)
    return stats if dist.get_rank() == 0 else None


def sync_failing_midway(hf_dir: str, layout: dict, endpoints, version: int, fail_after: int = 6):
    """Rank 1 fails after delivering some buckets (tiny buckets: several were staged on the engines);
    returns the error every rank saw."""
    import torch.distributed as dist

    from prism_mcore.rollout import transport
    from prism_mcore.rollout.weight_sync import WeightSyncError, sync_weights

    cfg, model = build_from_hf(hf_dir, layout)
    if dist.get_rank() == 1:
        original = transport.BucketPacker.add

        def add(self, name, tensor):
            if self.tensors >= fail_after:
                raise OSError("simulated sender failure (e.g. /dev/shm full)")
            return original(self, name, tensor)

        transport.BucketPacker.add = add
    try:
        sync_weights(model, cfg.model, endpoints, version, bucket_mb=0.01, timeout_s=120)
    except WeightSyncError as e:
        return str(e)
    return "no error"


def sync_zero_copy(hf_dir: str, layout: dict, endpoints, versions: list[int]):
    """Parameters moved to shared memory first: whole tensors travel as references. Two versions, to show
    the second sync (reused staging, cached mappings) is just as exact."""
    import torch.distributed as dist

    from prism_mcore.rollout.weight_sync import share_weights_memory, sync_weights

    cfg, model = build_from_hf(hf_dir, layout)
    moved = share_weights_memory(model)
    assert moved > 0
    out = [sync_weights(model, cfg.model, endpoints, v, bucket_mb=0.05, timeout_s=300, digest=True) for v in versions]
    return out if dist.get_rank() == 0 else None


def sync_over_torch_distributed(hf_dir: str, layout: dict, endpoints, first_version: int, seqs: list[list[int]]):
    """The same checkpoint synced over shm, then over torch_distributed (each trainer rank broadcasts its
    buckets in a gloo group it shares with the engines); then a torch_distributed sync in which rank 1
    fails midway (must be aborted everywhere), then a retry over the same groups. Rank 0 returns the
    stats, the engines' scores after each good sync, the errors and the versions seen after the failure."""
    import pickle

    import ray
    import torch.distributed as dist

    from prism_mcore.rollout import transport
    from prism_mcore.rollout.weight_sync import WeightSyncError, sync_weights

    cfg, model = build_from_hf(hf_dir, layout)
    actors = endpoints.connect()
    me = dist.get_rank()

    def scores():
        return ray.get([a.score.remote(seqs) for a in actors], timeout=120) if me == 0 else None

    v = first_version
    out = {"shm": sync_weights(model, cfg.model, endpoints, v, bucket_mb=0.05, timeout_s=120, digest=True,
                               transport="shm")}
    out["shm_scores"] = scores()
    out["dist"] = sync_weights(model, cfg.model, endpoints, v + 1, bucket_mb=0.05, timeout_s=120, digest=True,
                               transport="torch_distributed")
    out["dist_scores"] = scores()
    original = transport.BucketPacker.add
    if me == 1:
        def add(self, name, tensor):
            if self.tensors >= 6:
                raise OSError("simulated sender failure")
            return original(self, name, tensor)

        transport.BucketPacker.add = add
    try:
        sync_weights(model, cfg.model, endpoints, v + 2, bucket_mb=0.01, timeout_s=120, transport="torch_distributed")
        out["error"] = "no error"
    except WeightSyncError as e:
        out["error"] = str(e)
    transport.BucketPacker.add = original
    healths = ray.get([a.health.remote() for a in actors], timeout=60) if me == 0 else []
    out["after_failure"] = [(h.weight_version, h.staged_version) for h in healths]
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, out["error"])
    out["errors"] = errors
    out["retry"] = sync_weights(model, cfg.model, endpoints, v + 2, bucket_mb=0.05, timeout_s=120, digest=True,
                                transport="torch_distributed")
    out["retry_scores"] = scores()
    # auto with engine 1 seemingly on another node: shm to engine 0 and a broadcast group of engine 1 alone
    split = pickle.loads(pickle.dumps(endpoints))
    split.node_ids = [endpoints.node_ids[0], "another-node"]
    out["split"] = sync_weights(model, cfg.model, split, v + 3, bucket_mb=0.05, timeout_s=120, digest=True)
    out["split_scores"] = scores()
    return out if me == 0 else None


def sync_cached_plan(hf_dir: str, layout: dict, endpoints, first: int):
    """Zero-copy syncs (versions first..first+3) to fake engines that return the tensors they applied: v1
    works out the plan, a real
    optimizer step changes every parameter in place and v2 goes through the cached plan, then rank 0 moves
    one parameter to new (unshared) memory, a layout change, so v3 re-plans and streams that rank, and
    after sharing it again v4 is all references once more. Rank 0 returns, per sync: the stats, whether
    the plan object is the one of the sync before, and the HF tensors the engines got that differ from
    the model's own (iter_hf_tensors, every rank's gathered)."""
    import torch.distributed as dist

    from prism_mcore.rollout.sync_plan import _PLAN_ATTR
    from prism_mcore.rollout.weight_sync import iter_hf_tensors, share_weights_memory, sync_weights

    cfg, model = build_from_hf(hf_dir, layout)
    share_weights_memory(model)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    torch.manual_seed(0)  # the same draws on every rank: replicated shards stay equal

    def expected() -> dict:
        """From a plan made now, not the cached one the sync used (restored after)."""
        cached = getattr(model, _PLAN_ATTR)
        object.__setattr__(model, _PLAN_ATTR, None)
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, {n: t.clone() for n, t in iter_hf_tensors(model, cfg.model)})
        object.__setattr__(model, _PLAN_ATTR, cached)
        return {n: t for part in every for n, t in part.items()}

    out, plan = [], None
    for i in range(4):
        version = first + i
        if i == 2 and dist.get_rank() == 0:  # new memory, before the step: the old one keeps stale values
            params[0].data = params[0].data.clone()
        if i > 0:
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        if i == 3:
            share_weights_memory(model)
        stats = sync_weights(model, cfg.model, endpoints, version, bucket_mb=0.05, timeout_s=120, digest=True)
        want = expected()
        same_plan = getattr(model, _PLAN_ATTR) is plan
        plan = getattr(model, _PLAN_ATTR)
        if dist.get_rank() == 0:
            got = {name: s.extra["tensors"] for name, s in stats.engines.items()}
            bad = sorted({n for g in got.values() for n in set(g) | set(want)
                          if n not in g or n not in want or not torch.equal(g[n], want[n])})
            changed = sum(not torch.equal(a, b) for a, b in zip(want.values(), out[-1]["want"].values())) \
                if out else None
            out.append({"stats": stats, "same_plan": same_plan, "bad": bad, "changed": changed, "want": want,
                        "names": len(want)})
    return [{k: v for k, v in o.items() if k != "want"} for o in out] if dist.get_rank() == 0 else None
