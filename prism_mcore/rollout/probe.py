"""Is the engine computing what the trainer computes?

* `check_probe`: after a sync, the engine's log-probs of a fixed batch must equal the trainer's within a
  dtype-dependent tolerance, or the sync fails loudly (a wrong name map or layout shows up here first).
* `rollout_mismatch`: every step, how far the rollout log-probs of the sampled tokens are from the
  trainer's recomputation (the train/inference mismatch that importance-sampling corrections rely on).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

log = logging.getLogger("prism.rollout")

# Normwise relative tolerance: max|engine - trainer| / max|trainer| over the probe batch. float32 kernels
# differ only in summation order (~1e-6 observed); bf16 rounds every matmul input to 8 mantissa bits.
PROBE_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


def coarser_dtype(a: str, b: str) -> str:
    """Of two dtypes, the one with the looser probe tolerance (a bf16 engine under a float32 trainer: bf16)."""
    return max((a, b), key=PROBE_TOLERANCE.__getitem__)


class LogprobMismatch(RuntimeError):
    """The engine's log-probs of the probe batch differ from the trainer's beyond tolerance."""


@dataclass
class Probe:
    """A fixed batch and the trainer's log p(token_t | tokens_<t), t = 1..len-1, for each sequence. A sequence
    is token ids, or an engine Prompt with its images (its log-probs are those of the expanded sequence)."""
    sequences: list
    trainer_logprobs: list[list[float]]
    dtype: str = "float32"

    @property
    def tolerance(self) -> float:
        return PROBE_TOLERANCE[self.dtype]


def relative_error(engine: Sequence[Sequence[float]], trainer: Sequence[Sequence[float]]) -> float:
    a = torch.tensor([x for row in engine for x in row], dtype=torch.float64)
    b = torch.tensor([x for row in trainer for x in row], dtype=torch.float64)
    if a.shape != b.shape:
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def check_probe(engine_logprobs: Sequence[Sequence[float]], probe: Probe, engine: str, version: int,
                step: int | None = None) -> float:
    err = relative_error(engine_logprobs, probe.trainer_logprobs)
    where = f"engine {engine}, weight version {version}" + (f", step {step}" if step is not None else "")
    if not err <= probe.tolerance:
        raise LogprobMismatch(f"{where}: log-probs of the probe batch differ from the trainer's by {err:.3e} "
                              f"(relative), above the {probe.dtype} tolerance {probe.tolerance:.0e}")
    log.info("probe ok (%s): relative error %.2e <= %.0e", where, err, probe.tolerance)
    return err


def rollout_mismatch(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                     step: int | None = None) -> dict[str, float]:
    """Per-token train vs rollout log-prob mismatch over the masked (response) tokens, logged each step.

    `kl_k3` is the k3 estimator of KL(rollout || trainer), E[r - 1 - log r] with r = p_train / p_rollout."""
    m = mask.bool()
    diff = (trainer_logprobs.double() - rollout_logprobs.double())[m]
    if diff.numel() == 0:
        stats = {"mean_abs": 0.0, "max_abs": 0.0, "kl_k3": 0.0, "ratio_max": 1.0, "tokens": 0.0}
    else:
        ratio = diff.exp()
        stats = {"mean_abs": float(diff.abs().mean()), "max_abs": float(diff.abs().max()),
                 "kl_k3": float((ratio - 1 - diff).mean()), "ratio_max": float(ratio.max()),
                 "tokens": float(diff.numel())}
    log.info("rollout/train log-prob mismatch%s: mean|d|=%.3e max|d|=%.3e kl_k3=%.3e over %d tokens",
             f" at step {step}" if step is not None else "", stats["mean_abs"], stats["max_abs"], stats["kl_k3"],
             int(stats["tokens"]))
    return stats
