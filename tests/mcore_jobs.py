"""Rank functions shared by the Megatron tests (module level, so spawned ranks can import them)."""
from __future__ import annotations

import torch

TINY = ["model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=96", "model.num_hidden_layers=2",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.head_dim=16",
        "model.max_position_embeddings=64"]
TINY_MOE = ["model.num_experts=4", "model.num_experts_per_tok=2", "model.moe_intermediate_size=48",
            "model.router_aux_loss_coef=0.01"]


def tiny_config(layout: dict, moe: bool = False, extra: list[str] = ()):
    from prism_mcore.config import load_config

    overrides = TINY + (TINY_MOE if moe else []) + [f"parallel.{k}={v}" for k, v in layout.items()] + list(extra)
    return load_config(None, overrides)


def microbatches(n: int = 2, batch: int = 2, seq: int = 16, vocab: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, batch, seq + 1), generator=g)
    return [{"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()} for t in tokens]


def lm_forward_step(batch, model):
    b, s = batch["tokens"].shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    per_token = model(batch["tokens"], positions, None, labels=batch["labels"])

    def loss_fn(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return per_token, loss_fn


def build(layout: dict, moe: bool, full_weights: dict | None, seed: int = 1234):
    from prism_mcore.models.qwen3.model import build_qwen3
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.parallel.shards import load_full

    cfg = tiny_config(layout, moe)
    init_model_parallel(cfg, seed=seed)
    model = build_qwen3(cfg.model, cfg.parallel)
    if full_weights is not None:
        load_full(model, lambda key, region: full_weights[key][region])
    return cfg, model


def losses_and_grads(layout: dict, moe: bool = False, full_weights: dict | None = None):
    """Forward+backward of the global batch (2 micro-batches) at `layout`; returns this rank's
    micro-batch losses (all-gathered), parameter shards and gradient shards."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from prism_mcore.parallel.shards import local_shards, params_swapped_with_grads
    from prism_mcore.trainer.step import wrap_ddp

    cfg, model = build(layout, moe, full_weights)
    ddp = wrap_ddp(model, use_distributed_optimizer=False)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = microbatches()[dp_rank::dp]
    ddp.zero_grad_buffer()
    it = iter(mine)
    out = get_forward_backward_func()(
        forward_step_func=lambda data, m: lm_forward_step(next(data), m), data_iterator=it, model=[ddp],
        num_microbatches=len(mine), seq_length=16, micro_batch_size=2, forward_only=False)
    # Megatron's loss_fn output is the micro-batch mean; the last stage's TP rank 0 speaks for its DP rank.
    speaks = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    losses = [float(d["loss"]) for d in out] if speaks else []
    params = local_shards(model)
    with params_swapped_with_grads(model):
        grads = local_shards(model)
    return {"losses": losses, "params": params, "grads": grads}


def global_loss(results: list[dict]) -> float:
    losses = [x for r in results for x in r["losses"]]
    return sum(losses) / len(losses)


def loss_after_load(layout: dict, ckpt: str | None, save_to: str | None = None, full_weights: dict | None = None):
    """Optionally load a checkpoint, optionally save one; return the global-batch forward loss."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from prism_mcore.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint

    cfg, model = build(layout, False, full_weights, seed=99)
    if ckpt:
        load_checkpoint(ckpt, [model])
    if save_to:  # move the weights away from any fresh initialization first
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)  # same on every rank: replicas stay equal
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        save_checkpoint(save_to, 3, [model], meta={"data_position": 17})
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = microbatches()[dp_rank::dp]
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=lambda data, m: lm_forward_step(next(data), m), data_iterator=iter(mine),
            model=[model], num_microbatches=len(mine), seq_length=16, micro_batch_size=2, forward_only=True)
    speaks = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    return {"losses": [float(d["loss"]) for d in out] if speaks else []}


def megatron_feature(feature: str) -> str:
    """Exercise one Megatron feature on CPU (used to show each CPU-compat patch is needed)."""
    if feature == "seed":
        from prism_mcore.parallel.layout import init_model_parallel

        init_model_parallel(tiny_config({}))
    elif feature == "tp2_sp":
        build({"tp": 2, "sequence_parallel": True}, False, None)
    elif feature == "pp2_step":
        losses_and_grads({"pp": 2})
    elif feature == "moe_tp2_ep2_step":
        losses_and_grads({"tp": 2, "ep": 2, "sequence_parallel": True}, moe=True)
    elif feature in ("moe_ep2_step", "moe_step"):
        losses_and_grads({"ep": 2} if feature == "moe_ep2_step" else {}, moe=True)
    elif feature == "optimizer":
        from prism_mcore.trainer.step import build_optimizer, wrap_ddp

        cfg, model = build({}, False, None)
        build_optimizer([wrap_ddp(model)], cfg.optim)
    elif feature == "optimizer_resume":
        import tempfile

        with tempfile.TemporaryDirectory() as root:
            before = train_save_resume({}, root, "save")
            after = train_save_resume({}, root, "resume")
        if abs(before[1] - after[1]) > 1e-6 * abs(before[1]):
            raise AssertionError(f"resumed losses {after} differ from uninterrupted {before}")
    elif feature == "rope_forward":
        cfg, model = build({}, False, None)
        with torch.no_grad():
            lm_forward_step(microbatches(1)[0], model)
    else:
        raise ValueError(feature)
    return "ok"


def run_features(features: list[str]) -> list[str]:
    return [megatron_feature(f) for f in features]



def train_save_resume(layout: dict, root: str, phase: str, steps: int = 2):
    """'save': one AdamW step, checkpoint (model + optimizer + RNG), then `steps` more.
    'resume': a fresh model loads the checkpoint, then `steps`. Returns the global loss per step."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from prism_mcore.checkpoint.dist_ckpt import latest_checkpoint, load_checkpoint, save_checkpoint
    from prism_mcore.trainer.step import build_optimizer, megatron_step, wrap_ddp

    cfg, model = build(layout, False, None, seed=5)
    ddp = wrap_ddp(model)
    opt = build_optimizer([ddp], cfg.optim.model_copy(update={"lr": 1e-2, "weight_decay": 0.1}))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches = microbatches(n=2)[dp_rank::dp]

    def step() -> float:
        losses, _, _ = megatron_step([ddp], opt, lm_forward_step, batches, len(batches), 16, 2)
        loss = torch.tensor(sum(float(d["loss"]) for d in losses) if losses else 0.0)
        speaks = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        dist.all_reduce(loss if speaks else loss.zero_())
        return loss.item() / 2

    if phase == "save":
        step()
        save_checkpoint(root, 1, [ddp], opt, meta={"data_position": 1})
    else:
        meta = load_checkpoint(latest_checkpoint(root), [ddp], opt)
        assert meta["data_position"] == 1
    return [step() for _ in range(steps)]
