"""Stage 2a, discriminator warm-up: pairwise Bradley-Terry on (teacher, student) segments, plus the
MoE load-balancing loss (Megatron adds it inside the MoE layers with `model.router_aux_loss_coef`).

Each comparison is scored as the chat [system, user: prompt, assistant: segment] with a closed
assistant turn, read at each row's own last token (data/disc_inputs.py, shared with the align stage).
"""
from __future__ import annotations

import random

import torch

from prism_mcore.config import PrismConfig


def encode_pair(pair, tokenizer, max_length: int, images=None) -> tuple[list[int], list[int]]:
    """The (chosen, rejected) discriminator rows of a pair. Text: cut from the left to `max_length` (the
    score is read at the last token). With images (a StageImages) the prompt's image pads are expanded and
    kept whole; the segment is what gets cut."""
    from prism_mcore.data.disc_inputs import discriminator_input, generation_prompt_ids, text_ids

    if images is None:
        prompt = generation_prompt_ids(list(pair.prompt_messages), tokenizer)

        def ids(segment: str) -> list[int]:
            return discriminator_input(prompt, text_ids(segment, tokenizer), tokenizer)[-max_length:]

        return ids(pair.chosen), ids(pair.rejected)
    from prism_mcore.data.multimodal import encode_prompt

    prompt, _, _ = encode_prompt(list(pair.prompt_messages), tokenizer, images.processor, images.tokens)
    room = max(1, max_length - len(prompt) - 2)
    return tuple(discriminator_input(prompt, text_ids(seg, tokenizer), tokenizer, room)
                 for seg in (pair.chosen, pair.rejected))


def pairs_batch(encoded: list[tuple[list[int], list[int]]], pad_id: int, images=None, pair_images=()):
    """Rows chosen_0, rejected_0, chosen_1, ...: each pair is one unit (scored in one forward pass), and
    extra["role"] says which row is which (+1 chosen, -1 rejected). With images (a StageImages), both rows of
    pair i carry `pair_images[i]`."""
    from prism_mcore.data.batch import Batch, right_padded
    from prism_mcore.trainer.images import attach_images

    tokens, mask = right_padded([row for pair in encoded for row in pair], pad_id)
    unit = torch.arange(len(encoded)).repeat_interleave(2)
    role = torch.tensor([1, -1] * len(encoded))
    batch = Batch(tokens=tokens, attention_mask=mask, unit=unit, extra={"role": role})
    return attach_images(batch, images, [ims for ims in pair_images for _ in range(2)])


def discriminator_forward(net, batch):
    """The discriminator on a Batch: token scores [b, s] on the last pipeline stage (with the rows' images and
    3-D positions when the batch has them)."""
    return net(batch.tokens, batch.attention_mask, pixel_values=batch.pixel_values,
               image_grid_thw=batch.image_grid_thw, position_ids=batch.position_ids)


class PairObjective:
    """Bradley-Terry on (chosen, rejected) score pairs, the mean over the global batch's pairs."""

    mode = "token-mean"  # not per token: the loss is per pair, normalised by `units`

    @staticmethod
    def units(batch) -> float:
        return float((batch.extra["role"] == 1).sum())

    def step(self, net, batch, norm):
        from prism_mcore.algorithms.discriminator_loss import bradley_terry_loss
        from prism_mcore.models.discriminator import sequence_scores

        token_scores = discriminator_forward(net, batch)

        def loss_fn(scores):
            seq = sequence_scores(scores, batch.attention_mask)
            role = batch.extra["role"]
            chosen, rejected = seq[role == 1], seq[role == -1]
            bt = bradley_terry_loss(chosen, rejected).sum()
            share = 1.0 / max(norm.num_units, 1.0)
            return norm.loss_per_unit(bt), {"loss": bt.detach() * share,
                                            "accuracy": (chosen > rejected).float().sum() * share,
                                            "score_gap": (chosen - rejected).detach().sum() * share}

        return token_scores, loss_fn


def run_disc_warmup(cfg: PrismConfig) -> dict:
    from prism_mcore.data.tokenizer import qwen3_tokenizer
    from prism_mcore.data.warmup_pairs import load_warmup_pairs
    from prism_mcore.models.discriminator import build_discriminator
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.trainer.images import StageImages
    from prism_mcore.trainer.run import StageRun, export_hf, load_hf_weights
    from prism_mcore.trainer.step import StepRunner, lr_at, trainable

    tok = qwen3_tokenizer()
    images = StageImages.of(cfg, tok)
    pairs, skipped = [], 0
    for path in cfg.data.train_files:
        got, bad = load_warmup_pairs(path, images=images.processor if images is not None else None)
        pairs += got
        skipped += sum(bad.values())
    max_len = cfg.data.max_prompt_length + cfg.data.max_response_length
    encoded = [encode_pair(p, tok, max_len, images) for p in pairs]

    init_model_parallel(cfg)
    disc = build_discriminator(cfg.model, cfg.parallel, seed=cfg.trainer.seed)
    if cfg.model.hf_path:
        load_hf_weights(disc, cfg, kind="discriminator")
    model = trainable(disc, cfg.optim)
    run = StageRun(cfg, {"": model})
    runner = StepRunner(cfg.data.micro_batch_tokens, tok.pad_token_id)
    batch = cfg.data.global_batch_size
    last = {}
    for step in run.steps():
        epoch, offset = divmod(step, max(1, len(encoded) // batch))
        order = list(range(len(encoded)))
        random.Random(cfg.data.seed * 1_000_003 + epoch).shuffle(order)
        picked = order[offset * batch:(offset + 1) * batch]
        if disc.post_process:
            disc.head_dropout.reseed(step)
        step_batch = pairs_batch([encoded[i] for i in picked], tok.pad_token_id, images,
                                 [pairs[i].images for i in picked])
        result = runner.train(model, step_batch, PairObjective(), lr_at(step, cfg.trainer.steps, cfg.optim))
        last = {**result.metrics, "grad_norm": result.grad_norm, "lr": model.optimizer.param_groups[0]["lr"],
                "micro_batches": result.num_micro, "skipped_rows": skipped, "update_skipped": result.skipped}
        run.end_step(step, last, {"kind": "discriminator"}, f"loss {last['loss']:.3f}", bad=result.nonfinite)
    run.close()
    if cfg.trainer.export_hf:
        export_hf(disc, cfg, f"{cfg.trainer.output_dir}/hf", kind="discriminator")
    run.finished(["hf"] if cfg.trainer.export_hf else [])
    return last
