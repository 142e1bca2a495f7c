"""Stage 2, PRISM alignment: the policy plays against the MoE discriminator (spec section 3).

Per step, for `data.global_batch_size` prompts:
  1. rank 0 samples `rollout.n` rollouts per prompt from the engines (every rank receives them);
  2. each rollout is split into its perception segment (caption) and reasoning segment (think + answer);
  3. the discriminator, before its update, scores every rollout's two segments and the teacher's two;
  4. advantage A = a * norm(perception) + (1 - a) * norm(reasoning) - format_penalty * (1 - F), group-wise;
  5. one discriminator update (Bradley-Terry: teacher segments over the rollouts' segments);
  6. one policy update (clipped policy gradient, no KL), and the new weights go into the engines.
Both models are Megatron models on the same ranks; they are checkpointed together.
"""
from __future__ import annotations

import torch

from prism_mcore.config import PrismConfig


def _discriminator_cfg(cfg: PrismConfig) -> PrismConfig:
    """The discriminator's view of the config. Its MoE load-balancing loss is off in this stage
    (spec 3.4: pure Bradley-Terry) unless `discriminator.aux_loss_coef` asks for it."""
    d = cfg.discriminator
    model = d.model.model_copy(update={"router_aux_loss_coef": d.aux_loss_coef})
    return cfg.model_copy(update={"model": model, "parallel": d.parallel, "optim": d.optim})


def init_layout(cfg: PrismConfig, d_cfg: PrismConfig) -> None:
    """One set of process groups for both models: tensor/pipeline/context sizes are equal (checked by the
    config); the expert-parallel groups are those of the MoE model (the discriminator when both are)."""
    from prism_mcore.parallel.layout import init_model_parallel

    init_model_parallel(d_cfg if d_cfg.model.is_moe else cfg)


def group_inputs(example, group, tokenizer, max_segment_tokens: int):
    """Segments of one prompt's rollouts and of its teacher, as discriminator inputs (data/disc_inputs.py),
    and each rollout's format validity."""
    from prism_mcore.algorithms.segments import split_response
    from prism_mcore.data.disc_inputs import discriminator_input, text_ids
    from prism_mcore.trainer.disc_update import GroupInputs

    def row(ids):
        return discriminator_input(example.prompt_ids, ids, tokenizer, max_segment_tokens)

    captions, reasonings, valid = [], [], []
    for r in group:
        split = split_response(r.token_ids, tokenizer)
        captions.append(row(r.token_ids[split.caption[0]:split.caption[1]]))
        reasonings.append(row(r.token_ids[split.reasoning[0]:split.reasoning[1]]))
        valid.append(split.valid)
    inputs = GroupInputs(captions, reasonings, row(text_ids(example.teacher_caption, tokenizer)),
                         row(text_ids(example.teacher_cot, tokenizer)))
    return inputs, valid


def run_align(cfg: PrismConfig) -> dict:
    from prism_mcore.algorithms.advantages import consecutive_groups, prism_advantages
    from prism_mcore.algorithms.discriminator_loss import clip_scores
    from prism_mcore.data.rl_dataset import RLDataset
    from prism_mcore.data.tokenizer import qwen3_tokenizer
    from prism_mcore.models.discriminator import build_discriminator
    from prism_mcore.trainer.disc_update import score_groups, update_discriminator
    from prism_mcore.trainer.engines import Rollouts, evaluate_all, held_out, should_eval
    from prism_mcore.trainer.images import StageImages
    from prism_mcore.trainer.policy_update import rollout_batch, update_policy
    from prism_mcore.trainer.run import StageRun, build_policy, export_hf, load_hf_weights
    from prism_mcore.trainer.step import StepRunner, trainable

    tok = qwen3_tokenizer()
    images = StageImages.of(cfg, tok)
    data = RLDataset(cfg.data.train_files, tok, cfg.data.max_prompt_length,
                     images=images.processor if images is not None else None, require_teacher=True)
    val = held_out(cfg, tok, images)
    d_cfg = _discriminator_cfg(cfg)
    init_layout(cfg, d_cfg)
    policy = trainable(build_policy(cfg), cfg.optim)
    disc_net = build_discriminator(d_cfg.model, d_cfg.parallel, head_dropout=cfg.discriminator.head_dropout,
                                   seed=cfg.trainer.seed)
    if d_cfg.model.hf_path:
        load_hf_weights(disc_net, d_cfg, kind="discriminator")
    disc = trainable(disc_net, d_cfg.optim)
    run = StageRun(cfg, {"policy.": policy, "discriminator.": disc})
    if run.resumed and run.resumed.get("data"):
        data.load_state_dict(run.resumed["data"])
    runner = StepRunner(cfg.data.micro_batch_tokens, tok.pad_token_id)
    engines = Rollouts(cfg, tok, cfg.model.hf_path, runner, probe_examples=data.examples[:2], images=images)
    a, n = cfg.algorithm, cfg.rollout.n
    batches = data.endless(cfg.data.global_batch_size, cfg.data.seed)
    last = {}
    try:
        if run.start:
            engines.sync(policy, run.start)
        if val and run.start == 0 and cfg.trainer.eval_at_start:
            run.log(0, evaluate_all(engines, val, step=-1))
        for step in run.steps():
            examples = next(batches)
            rollouts = engines.sample(examples, step)
            built = [group_inputs(e, g, tok, cfg.data.max_response_length) for e, g in zip(examples, rollouts)]
            inputs = [b[0] for b in built]
            valid = torch.tensor([b[1] for b in built], dtype=torch.bool)  # [groups, n]
            group_images = [e.images for e in examples]
            engines.release()  # colocated engines sleep until the sync
            scores = score_groups(disc, inputs, tok.pad_token_id, cfg.data.micro_batch_tokens, images, group_images)
            clipped = clip_scores(scores, a.score_clip, a.score_clip_mode)
            s_p, s_r = clipped[:, :n], clipped[:, n:2 * n]
            t_p, t_r = clipped[:, 2 * n], clipped[:, 2 * n + 1]
            advantages, adv_stats = prism_advantages(
                s_p.reshape(-1), s_r.reshape(-1), valid.reshape(-1), consecutive_groups(valid.numel(), n),
                alpha=a.caption_weight, format_penalty=a.format_penalty, gate_by_format=a.gate_by_format)
            d_stats = update_discriminator(disc, cfg, inputs, valid, tok.pad_token_id, step, images, group_images)
            batch = rollout_batch([e.prompt_ids for e in examples], rollouts, tok.pad_token_id, images,
                                  [e.images for e in examples])
            update = update_policy(policy, cfg, batch, advantages, step, runner)
            sync = engines.sync(policy, step + 1)
            probe = {} if sync.probe_error is None else {"probe_error": sync.probe_error}
            flat = [r for group in rollouts for r in group]
            v = valid.float()
            gap_p = float(((t_p[:, None] - s_p) * v).sum() / v.sum().clamp(min=1))
            gap_r = float(((t_r[:, None] - s_r) * v).sum() / v.sum().clamp(min=1))
            last = {"score_gap": (gap_p + gap_r) / 2, "score_gap_perception": gap_p, "score_gap_reasoning": gap_r,
                    "teacher_score": float((t_p + t_r).mean() / 2), "accuracy": sum(r.acc for r in flat) / len(flat),
                    "format": sum(r.fmt for r in flat) / len(flat),
                    "response_len": sum(len(r.token_ids) for r in flat) / len(flat),
                    "sync_s": sync.seconds, "skipped_rows": sum(data.skipped.values()), **update, **d_stats, **probe,
                    **engines.metrics(),
                    **{k: float(x) for k, x in adv_stats.items()}}
            if val and should_eval(cfg, step + 1):
                last.update(evaluate_all(engines, val, step=step + 1))
            run.end_step(step, last, {"data": data.state_dict(), "discriminator": d_cfg.model.model_dump()},
                         f"gap {last['score_gap']:+.2f} d_loss {last['d_loss']:.3f} acc {last['accuracy']:.2f}",
                         bad=update["nonfinite_updates"] > 0 or bool(d_stats["d_nonfinite"]))
    finally:
        run.close()
        engines.close()
    if cfg.trainer.export_hf:
        export_hf(policy.net, cfg, f"{cfg.trainer.output_dir}/hf")
        export_hf(disc_net, d_cfg, f"{cfg.trainer.output_dir}/discriminator_hf", kind="discriminator")
    run.finished(["hf", "discriminator_hf"] if cfg.trainer.export_hf else [])
    return last
