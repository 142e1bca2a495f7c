"""prism_mcore: a Megatron-core stack for PRISM multimodal RL post-training (SFT -> alignment -> RLVR)."""

__version__ = "0.1.0"
