"""The original scripts' policy-loss settings per algorithm, in the config's field names (algorithm.*). Plain
data, no torch: the config schema fills every field a config leaves unset from here (so `prism validate`
shows what runs), and algorithms/policy_loss.py builds its PolicyLossConfig presets from it."""

_PPO = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0, "loss_agg_mode": "token-mean",
        "dynamic_sampling": False}

ALGORITHM_PRESETS: dict[str, dict] = {
    "grpo": _PPO,
    "prism": _PPO,
    "dapo": {**_PPO, "clip_ratio_high": 0.28, "clip_ratio_c": 10.0, "dynamic_sampling": True},
    "gspo": {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4, "clip_ratio_c": None,
             "loss_agg_mode": "seq-mean-token-mean", "dynamic_sampling": False},
}
