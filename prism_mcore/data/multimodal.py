"""Chats with images -> token ids with expanded image pads -> a `Batch` with pixel inputs and 3-D positions.

The chat template (data/tokenizer.py) renders each image part as `<|vision_start|><|image_pad|><|vision_end|>`;
the single pad then becomes t*h*w / merge^2 pads for an image of patch grid (t, h, w), which is what
transformers' `Qwen3VLProcessor` does to the text before tokenizing. Pads are special tokens, so the text
around them tokenizes the same however many there are: expanding token ids gives the processor's ids
(tests/data/test_multimodal.py checks this against `Qwen3VLProcessor` itself).

Data files say where images go with `<image>` placeholders in string contents (LLaMA-Factory, the PRISM RL
parquet) or with `{"type": "image"}` content parts; `with_image_parts` turns either into content parts that
carry their `ImageSource`, after checking that placeholders and images are equally many.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from prism_mcore.data.images import IMAGE_COUNT_MISMATCH, ImageError, ImageProcessor, ImageSource

PLACEHOLDER = "<image>"  # LLaMA-Factory's default image tag, also in PRISM's RL prompts


@dataclass(frozen=True)
class VisionTokens:
    """Ids of the vision special tokens, read from the tokenizer (never literals)."""

    image_pad: int
    vision_start: int
    vision_end: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "VisionTokens":
        ids = {}
        for name, text in (("image_pad", "<|image_pad|>"), ("vision_start", "<|vision_start|>"),
                           ("vision_end", "<|vision_end|>")):
            token_id = tokenizer.convert_tokens_to_ids(text)
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if token_id is None or token_id == tokenizer.unk_token_id or list(encoded) != [token_id]:
                raise ValueError(f"tokenizer has no single special token {text!r}: not a Qwen-VL vocabulary")
            ids[name] = int(token_id)
        return cls(**ids)


# ---- placeholders -> content parts ----------------------------------------------------------------

def count_image_parts(messages: Sequence[dict]) -> int:
    """Image parts and `<image>` placeholders in string contents."""
    n = 0
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            n += content.count(PLACEHOLDER)
        else:
            n += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return n


def with_image_parts(messages: Sequence[dict], images: Sequence[ImageSource]) -> list[dict]:
    """The messages with each `<image>` placeholder (in string contents) and each `{"type": "image"}` part
    carrying its image, in order: `{"type": "image", "image": ImageSource}`. Raises ImageError
    (image_count_mismatch) when placeholders and images differ in number. Without images and placeholders the
    messages come back unchanged (text-only rows stay exactly as they were)."""
    found = count_image_parts(messages)
    if found != len(images):
        raise ImageError(IMAGE_COUNT_MISMATCH, f"{found} placeholders, {len(images)} images")
    if not images:
        return list(messages)
    it = iter(images)
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            if PLACEHOLDER not in content:
                out.append(m)
                continue
            parts: list[dict[str, Any]] = []
            for i, piece in enumerate(content.split(PLACEHOLDER)):
                if i:
                    parts.append({"type": "image", "image": next(it)})
                if piece:
                    parts.append({"type": "text", "text": piece})
        else:
            parts = [dict(part, image=next(it)) if part.get("type") == "image" else part for part in content]
        out.append({**m, "content": parts})
    return out


def message_images(messages: Sequence[dict]) -> list[ImageSource]:
    """The images of `with_image_parts` messages, in the order the template renders them."""
    return [part["image"] for m in messages if not isinstance(m["content"], str)
            for part in m["content"] if part.get("type") == "image" and "image" in part]


# ---- token ids ----------------------------------------------------------------------------------

def expand_image_pads(ids: Sequence[int], grids: Sequence[Sequence[int]], processor: ImageProcessor,
                      tokens: VisionTokens, mask: Sequence[int] | None = None) -> tuple[list[int], list[int] | None]:
    """Each `<|image_pad|>` of `ids` (one per image, as the template renders it) becomes num_tokens(grid)
    pads; an expanded pad is never a training target (mask 0). Raises ImageError (image_count_mismatch) when
    the ids hold a different number of pads than grids (e.g. a literal '<|image_pad|>' in the text)."""
    pads = sum(1 for t in ids if t == tokens.image_pad)
    if pads != len(grids):
        raise ImageError(IMAGE_COUNT_MISMATCH, f"{pads} image pads in the text, {len(grids)} images")
    out, out_mask, k = [], ([] if mask is not None else None), 0
    for i, t in enumerate(ids):
        if t == tokens.image_pad:
            n = processor.num_tokens(grids[k])
            k += 1
            out += [t] * n
            if out_mask is not None:
                out_mask += [0] * n
        else:
            out.append(t)
            if out_mask is not None:
                out_mask.append(mask[i])
    return out, out_mask


def collapse_image_pads(ids: Sequence[int], tokens: VisionTokens) -> list[int]:
    """The inverse of `expand_image_pads`: one `<|image_pad|>` per run of them, i.e. a prompt as the chat
    template renders it. What a vLLM engine takes with `multi_modal_data` (its processor expands the pad
    itself), given `prompt_ids` that were expanded for the trainer."""
    out = []
    for i, t in enumerate(ids):
        if t == tokens.image_pad and i > 0 and ids[i - 1] == tokens.image_pad:
            continue
        out.append(int(t))
    return out


def image_blocks(ids: Sequence[int], tokens: VisionTokens) -> list[tuple[int, int]]:
    """[start, end) of each image's `<|vision_start|> pads <|vision_end|>` block, in order."""
    blocks, i = [], 0
    while i < len(ids):
        if ids[i] != tokens.image_pad:
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == tokens.image_pad:
            j += 1
        start = i - 1 if i > 0 and ids[i - 1] == tokens.vision_start else i
        end = j + 1 if j < len(ids) and ids[j] == tokens.vision_end else j
        blocks.append((start, end))
        i = j
    return blocks


def truncate_with_images(ids: list[int], mask: list[int] | None, num_images: int, max_length: int,
                         tokens: VisionTokens) -> tuple[list[int], list[int] | None, int]:
    """Cut to `max_length` without cutting an image: a cut inside an image's block moves to before it. Returns
    (ids, mask, images kept): the first `images kept` images are whole in the cut ids, the rest are gone.
    Expanded pads of adjacent images form one run only if the template put nothing between them, which it
    never does (each image is its own vision_start/vision_end block)."""
    if len(ids) <= max_length:
        return ids, mask, num_images
    cut, kept = max_length, 0
    for start, end in image_blocks(ids, tokens):
        if end <= cut:
            kept += 1
        else:
            cut = min(cut, start)
            break
    return ids[:cut], (mask[:cut] if mask is not None else None), kept


def encode_prompt(messages: Sequence[dict], tokenizer, processor: ImageProcessor | None = None,
                  tokens: VisionTokens | None = None, add_generation_prompt: bool = True
                  ) -> tuple[list[int], list[ImageSource], list[tuple[int, int, int]]]:
    """(ids, images, grids) of a prompt (RL, the discriminator's prompt): the chat template with the generation
    header, image pads expanded. Messages come from `with_image_parts`; text-only messages need no processor
    and give exactly `apply_chat_template(..., tokenize=True)`'s ids."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return expand_prompt(ids, message_images(messages), processor, tokens)


def expand_prompt(ids: list[int], images: list[ImageSource], processor: ImageProcessor | None,
                  tokens: VisionTokens | None) -> tuple[list[int], list[ImageSource], list[tuple[int, int, int]]]:
    """`encode_prompt` after tokenizing (for callers that tokenize many prompts in one call)."""
    if not images:
        if tokens is not None and tokens.image_pad in ids:
            raise ImageError(IMAGE_COUNT_MISMATCH, "image pads in the text, no images")
        return ids, [], []
    if processor is None or tokens is None:
        raise ValueError("a prompt with images needs an ImageProcessor and VisionTokens")
    grids = [processor.grid(im.width, im.height) for im in images]
    ids, _ = expand_image_pads(ids, grids, processor, tokens)
    return ids, images, grids


# ---- batches ------------------------------------------------------------------------------------

def attach_images(batch, images_per_row: Sequence[Sequence[Any]], processor: ImageProcessor, tokens: VisionTokens,
                  grids_per_row: Sequence[Sequence[Sequence[int]]] | None = None):
    """`batch` (a data.batch.Batch whose rows hold expanded image pads, e.g. from next_token_batch) with its
    images: pixel_values, image_grid_thw, images_per_row, and position_ids [3, B, S] by the model's own rule
    (models/qwen3_vl/rope.py: rope_index; padding skipped, as in transformers). `images_per_row[i]` are row
    i's images in the order its pads appear (ImageSource or PIL images). `grids_per_row`, when given (the
    grids the ids were expanded with), must equal the processor's: a mismatch means the ids and pixels
    disagree, and raises."""
    import torch

    # The one rule the model uses: importing it (torch-only, no Megatron) beats taking a callable, which would
    # let a caller pair these rows with positions the model never computes.
    from prism_mcore.models.qwen3_vl.rope import rope_index

    if len(images_per_row) != batch.num_rows:
        raise ValueError(f"images for {len(images_per_row)} rows, the batch has {batch.num_rows}")
    flat = [im for row in images_per_row for im in row]
    processed = processor(flat)
    if grids_per_row is not None:
        expected = [tuple(int(x) for x in g) for row in grids_per_row for g in row]
        got = [tuple(g) for g in processed.image_grid_thw.tolist()]
        if expected != got:
            raise ValueError(f"image grids {got} differ from those the token ids were expanded with {expected}")
    positions, _ = rope_index(batch.tokens, processed.image_grid_thw, batch.attention_mask, processor.merge_size,
                              tokens.image_pad, tokens.vision_start)
    counts = torch.tensor([len(row) for row in images_per_row], dtype=torch.long)
    return replace(batch, position_ids=positions, pixel_values=processed.pixel_values,
                   image_grid_thw=processed.image_grid_thw, images_per_row=counts)


def sft_batch(samples: Sequence[Any], pad_id: int, processor: ImageProcessor, tokens: VisionTokens):
    """Next-token rows of SFT samples (sft_dataset.SFTSample, text-only or with images) with their images:
    the multimodal counterpart of trainer/sft.py's sft_batch."""
    from prism_mcore.data.batch import next_token_batch

    batch = next_token_batch([s.input_ids for s in samples], [s.loss_mask[1:] for s in samples], pad_id)
    return attach_images(batch, [s.images for s in samples], processor, tokens,
                         grids_per_row=[s.image_grid_thw for s in samples])
