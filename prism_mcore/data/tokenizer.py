"""The real Qwen3 tokenizer, built offline from the `qwen.tiktoken` BPE file that the `dashscope`
wheel ships (151,643 byte-level BPE ranks), plus Qwen3's special tokens and a chat template with
image placeholders. Token ids equal the released Qwen3 tokenizer's. Built once per venv.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

# Qwen2's pre-tokenizer split pattern (also used by Qwen2.5 and Qwen3).
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Special tokens take ids 151643, 151644, ... in this order.
FIRST_SPECIAL_ID = 151643
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
ENDOFTEXT_ID = FIRST_SPECIAL_ID + SPECIAL_TOKENS.index("<|endoftext|>")  # pads
IM_END_ID = FIRST_SPECIAL_ID + SPECIAL_TOKENS.index("<|im_end|>")  # ends a chat turn: the eos of generation
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
# Content is a string or a list of {"type": "text"|"image"} parts; images become the Qwen-VL
# placeholder run that the processor later expands to one <|image_pad|> per merged patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VERSION = "1"  # bump when the construction changes, to rebuild cached copies


def cache_dir() -> Path:
    return Path(os.environ.get("PRISM_TOKENIZER_DIR", Path(sys.prefix) / "share" / "prism_mcore" /
                                f"qwen3_tokenizer_v{VERSION}"))


def _bpe_file() -> str:
    for dist in ("dashscope", "qwen-agent"):
        try:
            for f in importlib.metadata.files(dist) or []:
                if f.name == "qwen.tiktoken":
                    return str(f.locate())
        except importlib.metadata.PackageNotFoundError:
            continue
    raise FileNotFoundError("qwen.tiktoken not found: `pip install --no-deps dashscope` ships it "
                            "(make install does this)")


def build(out_dir: Path) -> None:
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=_bpe_file(), pattern=QWEN_SPLIT).tokenizer()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  model_max_length=131072)
    tok.chat_template = CHAT_TEMPLATE
    # Write next to the destination and rename, so a crash never leaves a half-written cache.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building_", dir=out_dir.parent))
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)


@lru_cache(maxsize=1)
def qwen3_tokenizer():
    """The cached Qwen3 fast tokenizer (builds it on first use in this venv, ~3 s)."""
    from transformers import PreTrainedTokenizerFast

    path = cache_dir()
    if not (path / "tokenizer.json").exists():
        build(path)
    return PreTrainedTokenizerFast.from_pretrained(str(path))
