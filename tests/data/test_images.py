"""Image processing equals transformers' Qwen3-VL processing; token expansion equals Qwen3VLProcessor's; batches."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from prism_mcore.data.images import ImageProcessor
from prism_mcore.data.multimodal import (VisionTokens, collapse_image_pads, encode_prompt, sft_batch,
                                         truncate_with_images, with_image_parts)
from prism_mcore.data.sft_dataset import tokenize_chat
from prism_mcore.data.tokenizer import qwen3_tokenizer

# Qwen3-VL's released preprocessor_config.json (Qwen/Qwen3-VL-*-Instruct): what transformers loads for the family.
RELEASED = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}
SPEC_SIZE = {"shortest_edge": 32 * 32, "longest_edge": 560 * 560}
# (width, height) -> grid (t, h, w) worked out by hand: round each side to a multiple of 32 within the pixel
# bounds, after capping the long side at 560.
HAND_GRIDS = {(64, 64): (1, 4, 4), (96, 96): (1, 6, 6), (100, 70): (1, 4, 6), (20, 20): (1, 2, 2),
              (560, 560): (1, 34, 34),  # 17.5 rounds to 18 (even), and 576^2 > 560^2: floor(560/32)=17 -> 544
              (1000, 120): (1, 4, 36),  # capped to 560 x 67 -> 576 x 64
              (1200, 900): (1, 26, 36),  # capped to 560 x 420 -> 576 x 416
              (37, 300): (1, 18, 2)}


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    from transformers import AutoImageProcessor

    d = tmp_path_factory.mktemp("qwen3vl")
    (d / "preprocessor_config.json").write_text(json.dumps(RELEASED))
    return AutoImageProcessor.from_pretrained(str(d), backend="pil")  # the CPU venv has no torchvision


def noise(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize("size", sorted(HAND_GRIDS))
def test_pixels_and_grid_equal_transformers(released, size):
    ip = ImageProcessor()
    image = noise(*size, seed=size[0])
    ours = ip([image])
    prepared = ip.prepare(image)
    ref = released(images=[prepared], size=SPEC_SIZE, return_tensors="np")
    assert ours.image_grid_thw.tolist() == ref["image_grid_thw"].tolist() == [list(HAND_GRIDS[size])]
    assert torch.equal(ours.pixel_values, torch.from_numpy(ref["pixel_values"]))  # bitwise
    assert ip.grid(*size) == HAND_GRIDS[size]  # predicted from the size alone
    assert ours.pixel_values.shape == (int(np.prod(HAND_GRIDS[size])), 3 * 2 * 16 * 16)
    if max(size) <= 560:
        assert prepared is image  # no resize of our own below the cap
    else:
        assert max(prepared.size) == 560


def test_modes_and_a_batch_of_images_equal_transformers(released):
    ip = ImageProcessor()
    images = [noise(64, 64, "RGBA", 1), noise(96, 64, "L", 2), noise(700, 300, "RGBA", 3), noise(50, 90)]
    ours = ip(images)
    ref = released(images=[ip.prepare(i) for i in images], size=SPEC_SIZE, return_tensors="np")
    assert torch.equal(ours.pixel_values, torch.from_numpy(ref["pixel_values"]))
    assert ours.image_grid_thw.tolist() == ref["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6], [1, 16, 36],
                                                                             [1, 6, 4]]
    # The released min_pixels (65,536) would blow a 64 x 64 image up to 16 x 16 patches: why ours is one merge.
    assert released(images=[images[0]], return_tensors="np")["image_grid_thw"].tolist() == [[1, 16, 16]]
    empty = ip([])
    assert empty.pixel_values.shape == (0, 1536) and empty.image_grid_thw.shape == (0, 3)


def test_from_vision_and_sizes():
    ip = ImageProcessor.from_vision({"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
                                    max_pixels=448 * 448)
    assert (ip.patch_size, ip.factor, ip.min_pixels, ip.max_pixels) == (14, 28, 784, 448 * 448)
    assert ip.grid(56, 56) == (1, 4, 4) and ip.num_tokens((1, 4, 4)) == 4
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessor(max_pixels=500)


def qwen3vl_processor(tok, ip):
    """transformers' Qwen3VLProcessor without its video processor (which needs torchvision)."""
    from transformers import Qwen3VLProcessor

    class ImagesOnly(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    return ImagesOnly(image_processor=ip.hf, tokenizer=tok, video_processor=None)


def chat(images):
    user = "".join("Look <image> here, " for _ in images) + "how many shapes?"
    return [{"role": "system", "content": "Answer."}, {"role": "user", "content": user}]


@pytest.mark.parametrize("sizes", [[], [(64, 64)], [(100, 70), (1000, 120)], [(96, 96), (64, 64), (20, 300)]])
def test_expansion_equals_qwen3vl_processor(tok, sizes):
    ip, vt = ImageProcessor(), VisionTokens.from_tokenizer(tok)
    images = [noise(*s, seed=i) for i, s in enumerate(sizes)]
    sources = [ip.load(im) for im in images]
    messages = with_image_parts(chat(images), sources)
    ids, got_images, grids = encode_prompt(messages, tok, ip, vt)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    proc = qwen3vl_processor(tok, ip)
    ref = proc(text=[text], images=[ip.prepare(im) for im in images] or None, return_tensors="pt")
    assert ids == ref["input_ids"][0].tolist()
    assert [list(g) for g in grids] == (ref["image_grid_thw"].tolist() if sizes else [])
    assert sum(t == vt.image_pad for t in ids) == sum(t * h * w // 4 for t, h, w in grids)
    # what an engine is given: the template's one pad per image
    assert collapse_image_pads(ids, vt) == tok(text, add_special_tokens=False)["input_ids"]
    if sizes:
        assert torch.equal(ip(got_images).pixel_values, ref["pixel_values"])
    else:
        assert ids == tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]


def test_vision_token_ids_come_from_the_tokenizer(tok):
    vt = VisionTokens.from_tokenizer(tok)
    assert [tok.convert_ids_to_tokens(i) for i in (vt.image_pad, vt.vision_start, vt.vision_end)] == [
        "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]


def test_sft_sample_and_batch_with_images(tok):
    ip, vt = ImageProcessor(), VisionTokens.from_tokenizer(tok)
    sources = [ip.load(noise(64, 64, seed=5)), ip.load(noise(96, 64, seed=6))]
    two = with_image_parts([{"role": "user", "content": "<image>and<image>?"},
                            {"role": "assistant", "content": "7 shapes"}], sources)
    one = with_image_parts([{"role": "user", "content": "<image>count"}, {"role": "assistant", "content": "2"}],
                           sources[:1])
    text = [{"role": "user", "content": "no image"}, {"role": "assistant", "content": "fine"}]
    samples = [tokenize_chat(m, tok, 200, ip, vt) for m in (two, one, text)]
    ref = qwen3vl_processor(tok, ip)(text=[tok.apply_chat_template(two, tokenize=False)],
                                     images=[ip.prepare(s) for s in sources], return_tensors="pt")
    assert samples[0].input_ids == ref["input_ids"][0].tolist()
    assert samples[0].image_grid_thw == [(1, 4, 4), (1, 4, 6)] and samples[2].images == []
    for s, answer in zip(samples, ("7 shapes", "2", "fine")):
        assert tok.decode([t for t, m in zip(s.input_ids, s.loss_mask) if m]) == answer + "<|im_end|>"
    assert samples[2].input_ids == tokenize_chat(text, tok, 200).input_ids  # text rows as without images

    batch = sft_batch(samples, tok.pad_token_id, ip, vt)
    assert batch.images_per_row.tolist() == [2, 1, 0] and batch.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 6],
                                                                                           [1, 4, 4]]
    assert batch.pixel_values.shape == (16 + 24 + 16, 1536) and batch.position_ids.shape == (3, 3, batch.length)
    assert torch.equal(batch.pixel_values[:40], ref["pixel_values"])
    row = batch.rows([1])  # images follow their row
    assert torch.equal(row.pixel_values, batch.pixel_values[40:]) and row.image_grid_thw.tolist() == [[1, 4, 4]]
    n = len(samples[2].input_ids) - 1  # a text row counts 0.. on all three axes
    assert batch.position_ids[:, 2, :n].tolist() == [list(range(n))] * 3
    # row 1: 4 image tokens of a 2 x 2 LLM grid right after <|vision_start|> at position 3
    start = samples[1].input_ids.index(vt.image_pad)
    assert batch.position_ids[:, 1, start:start + 5].tolist() == [[start] * 4 + [start + 2],
                                                                   [start, start, start + 1, start + 1, start + 2],
                                                                   [start, start + 1, start, start + 1, start + 2]]


def test_truncation_never_cuts_an_image(tok):
    vt = VisionTokens.from_tokenizer(tok)
    s, e, p = vt.vision_start, vt.vision_end, vt.image_pad
    ids = [1, 2, s, p, p, p, p, e, 3, s, p, p, p, p, e, 4, 5]
    assert truncate_with_images(ids, None, 2, 17, vt) == (ids, None, 2)
    assert truncate_with_images(ids, None, 2, 12, vt)[::2] == ([1, 2, s, p, p, p, p, e, 3], 1)  # cut in image 2
    assert truncate_with_images(ids, None, 2, 15, vt)[::2] == (ids[:15], 2)  # image 2 ends at the cut
    assert truncate_with_images(ids, list(range(17)), 2, 4, vt) == ([1, 2], [0, 1], 0)
