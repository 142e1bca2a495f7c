"""Stage 1, SFT: chat data, loss on assistant tokens only (the token mean over the global batch).

Reads top to bottom: build -> resume -> for each step: the step's samples as one Batch -> the step runner
(this rank's micro-batches, forward/backward, optimizer step) -> log, checkpoint -> export HF.
"""
from __future__ import annotations

import random

from prism_mcore.config import PrismConfig


def load_sft_samples(cfg: PrismConfig, tokenizer, images=None):
    """Every file's conversations, tokenized (with their images when `images`, a StageImages, is given);
    returns (samples, rows skipped): bad rows, bad images and conversations with no assistant token within
    the length limit are counted, not trained on."""
    from prism_mcore.data.errors import DataError
    from prism_mcore.data.sft_dataset import load_chat_jsonl, tokenize_chats

    if not cfg.data.train_files:
        raise DataError("data.train_files: the sft stage needs at least one chat JSONL file")
    ip = images.processor if images is not None else None
    samples, skipped = [], 0
    max_length = cfg.data.max_prompt_length + cfg.data.max_response_length
    for path in cfg.data.train_files:
        chats, bad = load_chat_jsonl(path, images=ip)
        kept, too_long = tokenize_chats(chats, tokenizer, max_length, source=str(path), images=ip)
        samples += kept
        skipped += sum(bad.values()) + sum(too_long.values())
    return samples, skipped


def step_batches(num_samples: int, batch: int, seed: int, step: int) -> list[int]:
    """Sample indices of global step `step`: epoch-wise deterministic shuffles, so resuming at a step
    reproduces exactly the batches an uninterrupted run would have seen."""
    per_epoch = max(1, num_samples // batch)
    epoch, offset = divmod(step, per_epoch)
    order = list(range(num_samples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[offset * batch:(offset + 1) * batch]


class SFTObjective:
    """Next-token NLL on the assistant tokens, the token mean over the whole global batch."""

    mode = "token-mean"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def step(self, net, batch, norm):
        from prism_mcore.models.qwen3.logprob_head import hidden_to_logprobs, lm_hidden, unwrap

        hidden = lm_hidden(net, batch)

        def loss_fn(h):
            logp, _ = hidden_to_logprobs(unwrap(net), h, batch.labels, self.vocab_size, with_entropy=False,
                                         only=batch.loss_mask)
            nll = -logp
            return norm.loss(nll, batch.loss_mask), {"loss": norm.share(nll.detach(), batch.loss_mask)}

        return hidden, loss_fn


def sft_batch(samples: list, pad_id: int, images=None):
    """Next-token rows of chat samples (a target counts where the sample's loss mask marks it), with their
    images when the run has them (`images`: a trainer.images.StageImages)."""
    from prism_mcore.data.batch import next_token_batch
    from prism_mcore.trainer.images import attach_images

    batch = next_token_batch([s.input_ids for s in samples], [s.loss_mask[1:] for s in samples], pad_id)
    return attach_images(batch, images, [s.images for s in samples])


def run_sft(cfg: PrismConfig) -> dict:
    from prism_mcore.data.tokenizer import qwen3_tokenizer
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.trainer.images import StageImages
    from prism_mcore.trainer.run import StageRun, build_policy, export_hf
    from prism_mcore.trainer.step import StepRunner, lr_at, trainable

    tok = qwen3_tokenizer()
    images = StageImages.of(cfg, tok)
    samples, skipped = load_sft_samples(cfg, tok, images)
    init_model_parallel(cfg)
    policy = trainable(build_policy(cfg), cfg.optim)
    run = StageRun(cfg, {"": policy})
    runner = StepRunner(cfg.data.micro_batch_tokens, tok.pad_token_id)
    objective = SFTObjective(cfg.model.vocab_size)
    last = {}
    for step in run.steps():
        rows = [samples[i] for i in step_batches(len(samples), cfg.data.global_batch_size, cfg.data.seed, step)]
        batch = sft_batch(rows, tok.pad_token_id, images)
        result = runner.train(policy, batch, objective, lr_at(step, cfg.trainer.steps, cfg.optim))
        last = {"loss": result.metrics["loss"], "grad_norm": result.grad_norm,
                "lr": policy.optimizer.param_groups[0]["lr"], "tokens": float(batch.loss_mask.sum()),
                "micro_batches": result.num_micro, "skipped_rows": skipped, "update_skipped": result.skipped}
        run.end_step(step, last, summary=f"loss {last['loss']:.3f}", bad=result.nonfinite)
    run.close()
    if cfg.trainer.export_hf:
        export_hf(policy.net, cfg, f"{cfg.trainer.output_dir}/hf")
    run.finished(["hf"] if cfg.trainer.export_hf else [])
    return last
