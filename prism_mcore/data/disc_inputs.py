"""What the discriminator reads: prompt ⊕ segment ⊕ `<|im_end|>\\n`, the chat with the segment as a closed
assistant turn. Warm-up pairs (text) and alignment rollouts (generated token ids) both go through
`discriminator_input`, so every score, teacher or student, caption or reasoning, in either stage, is read
at the same kind of token (the original read them at four different ones; spec section 3.1)."""
from __future__ import annotations

from typing import Sequence

IM_END = "<|im_end|>"
NEWLINE_ID = 198  # "\n" in the Qwen2/Qwen3 vocabulary


def generation_prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def text_ids(text: str, tokenizer) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def discriminator_input(prompt_ids: Sequence[int], segment_ids: Sequence[int], tokenizer,
                        max_segment_tokens: int | None = None) -> list[int]:
    """Trailing EOS / pad / `<|im_end|>` of the segment are dropped (a generated segment ends in EOS, a
    teacher's does not), the segment is cut to `max_segment_tokens`, and the turn is closed."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    drop = {im_end, tokenizer.pad_token_id, tokenizer.eos_token_id}
    seg = [int(i) for i in segment_ids]
    while seg and seg[-1] in drop:
        seg.pop()
    if max_segment_tokens is not None:
        seg = seg[:max_segment_tokens]
    return [int(i) for i in prompt_ids] + seg + [im_end, NEWLINE_ID]
