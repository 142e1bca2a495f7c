"""Rank functions for the align-stage tests (module level, so spawned ranks can import them)."""
from __future__ import annotations

import torch

TINY_MOE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
            "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48}


def groups(num_groups: int = 4, n: int = 3, seed: int = 0):
    """Random prompt groups: rows of 5..20 tokens; teacher rows start with token 7, others with 9."""
    from prism_mcore.trainer.disc_update import GroupInputs

    g = torch.Generator().manual_seed(seed)

    def row(first):
        length = int(torch.randint(5, 21, (1,), generator=g))
        return [first] + torch.randint(10, 256, (length - 1,), generator=g).tolist()

    inputs = [GroupInputs([row(9) for _ in range(n)], [row(9) for _ in range(n)], row(7), row(7))
              for _ in range(num_groups)]
    valid = torch.rand(num_groups, n, generator=g) > 0.3
    valid[0, 0] = True
    return inputs, valid


def update_matches_formula_and_learns(world_size: int, ep: int, micro_tokens: int) -> dict:
    from prism_mcore.algorithms.discriminator_loss import alignment_discriminator_loss, clip_scores
    from prism_mcore.config import PrismConfig
    from prism_mcore.models.discriminator import build_discriminator
    from prism_mcore.trainer.align import _discriminator_cfg, init_layout
    from prism_mcore.trainer.disc_update import score_groups, update_discriminator
    from prism_mcore.trainer.step import trainable

    cfg = PrismConfig.model_validate({
        "model": {k: v for k, v in TINY_MOE.items() if not k.startswith(("num_experts", "moe_"))},
        "parallel": {"world_size": world_size},
        "data": {"micro_batch_tokens": micro_tokens},
        "trainer": {"stage": "align", "steps": 6},
        "algorithm": {"score_clip": 2.0, "score_reg_coef": 0.05},
        "discriminator": {"model": TINY_MOE, "parallel": {"ep": ep, "world_size": world_size}, "head_dropout": 0.0,
                          "optim": {"lr": 1e-2, "weight_decay": 0.0, "clip_grad": 0.0}}})
    d_cfg = _discriminator_cfg(cfg)
    init_layout(cfg, d_cfg)
    disc = trainable(build_discriminator(d_cfg.model, d_cfg.parallel, head_dropout=0.0, seed=3), d_cfg.optim)
    inputs, valid = groups()
    n = valid.shape[1]
    history = []
    for step in range(cfg.trainer.steps):
        scores = score_groups(disc, inputs, pad_id=0, token_budget=micro_tokens)
        s = scores.double()
        expand = lambda col: s[:, col:col + 1].expand(-1, n).reshape(-1)  # noqa: E731
        reference, _ = alignment_discriminator_loss(
            s[:, :n].reshape(-1), s[:, n:2 * n].reshape(-1), expand(2 * n), expand(2 * n + 1), valid.reshape(-1),
            score_clip=2.0, score_reg_coef=0.0)
        # the reg averages the four streams' mean squares (the teacher's repeated n times, as in the original)
        teacher_sq = clip_scores(s[:, 2 * n:], 2.0).square().mean()
        student_sq = clip_scores(s[:, :2 * n], 2.0).square().mean()
        reference = reference + 0.05 * (student_sq + teacher_sq) / 2
        stats = update_discriminator(disc, cfg, inputs, valid, pad_id=0, step=step)
        history.append({"d_loss": stats["d_loss"], "reference": float(reference),
                        "gap": float((s[:, 2 * n:2 * n + 1] - s[:, :n])[valid].mean())})
    return {"history": history}
