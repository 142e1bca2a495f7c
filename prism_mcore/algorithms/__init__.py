"""PRISM / GRPO / DAPO / GSPO math as pure functions: response formats and segments, verifiable
rewards, advantages, policy losses, DAPO data shaping and discriminator losses.

Names are exported lazily, so that the reward sandbox can import `answer_match` without torch.
See docs/algorithms.md for every formula and each deviation from the original code.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "response_format": ["ResponseFormat", "ParsedResponse", "TaggedFormat", "ThinkBoxedFormat", "FORMATS",
                        "DEFAULT_FORMAT", "CAPTION_THINK_ANSWER", "THINK_BOXED", "get_format", "last_boxed"],
    "segments": ["SegmentSplit", "split_response", "split_batch", "segment_masks", "with_terminator"],
    "answer_match": ["answer_accuracy", "answer_matches"],
    "sandbox": ["TimeoutSandbox"],
    "reward": ["RewardResult", "AnswerChecker", "compute_reward", "compute_rewards", "default_checker"],
    "advantages": ["consecutive_groups", "group_normalize", "grpo_advantages", "fill_invalid_with_group_floor",
                   "prism_advantages", "broadcast_to_tokens"],
    "aggregation": ["aggregate", "masked_mean", "masked_sum", "AGG_MODES", "LossNormalizer"],
    "presets": ["ALGORITHM_PRESETS"],
    "kl": ["kl_estimate", "entropy_from_logits", "KL_TYPES"],
    "policy_loss": ["PolicyLossConfig", "policy_loss", "ppo_token_losses", "gspo_token_losses"],
    "dapo": ["overlong_penalty", "groups_with_signal", "select_groups", "DynamicSampler"],
    "discriminator_loss": ["clip_scores", "last_token_scores", "bradley_terry_loss", "warmup_pair_loss",
                           "alignment_discriminator_loss", "load_balancing_loss", "SCORE_CLIP_MODES"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
