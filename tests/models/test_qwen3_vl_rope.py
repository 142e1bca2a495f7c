"""Qwen3-VL's 3-D positions and interleaved MRoPE equal transformers' (single process, no Megatron)."""
import pytest
import torch

from vl_jobs import IMAGE, MERGE, V_START, hf_class, tiny_vl_config, vl_batch
from prism_mcore.models.qwen3_vl.rope import InterleavedMRoPE, rope_index, rope_index_packed


@pytest.fixture(scope="module")
def hf_model():
    config_cls, model_cls = hf_class(moe=False)
    torch.manual_seed(0)
    return model_cls(config_cls(**tiny_vl_config())).eval()


BATCHES = {
    "right_0_1_2": dict(images_per_row=(0, 1, 2), pad="right"),
    "left_0_1_2": dict(images_per_row=(0, 1, 2), pad="left"),
    "left_2_0_1": dict(images_per_row=(2, 0, 1), grids=((1, 2, 6), (1, 6, 4), (1, 4, 4)), pad="left"),
    "right_text_only": dict(images_per_row=(0, 0), pad="right"),
}


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no_mask"])
def test_rope_index_matches_transformers(name, with_mask, hf_model):
    batch = vl_batch(**BATCHES[name])
    ids, grid = batch["input_ids"], batch["image_grid_thw"]
    mask = batch["attention_mask"] if with_mask else None
    expected, expected_delta = hf_model.model.get_rope_index(ids, (ids == IMAGE).int(), image_grid_thw=grid,
                                                             attention_mask=mask)
    got, delta = rope_index(ids, grid, mask, MERGE, IMAGE, V_START)
    assert torch.equal(got, expected)
    assert torch.equal(delta, expected_delta.reshape(delta.shape))


def test_rope_index_rejects_inconsistent_images():
    batch = vl_batch(images_per_row=(1, 1))
    ids, grid = batch["input_ids"], batch["image_grid_thw"]
    with pytest.raises(ValueError, match="image_grid_thw lists 3 images"):
        rope_index(ids, torch.cat([grid, grid[:1]]), None, MERGE, IMAGE, V_START)
    with pytest.raises(ValueError, match="more images"):
        rope_index(ids, grid[:1], None, MERGE, IMAGE, V_START)
    broken = ids.clone()
    broken[broken == V_START] = 0
    with pytest.raises(ValueError, match="vision-start"):
        rope_index(broken, grid, None, MERGE, IMAGE, V_START)


def test_interleaved_mrope_matches_transformers(hf_model):
    """Megatron applies cos/sin of our angles; transformers' text rotary gives cos/sin directly."""
    batch = vl_batch(images_per_row=(2, 1), pad="left")
    positions, _ = rope_index(batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"], MERGE, IMAGE)
    rotary = hf_model.model.language_model.rotary_emb
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)  # [b, s, d]
    text = hf_model.config.text_config
    ours = InterleavedMRoPE(text.head_dim, text.rope_parameters["rope_theta"], (6, 5, 5))(positions)  # [s, b, 1, d]
    angles = ours[:, :, 0].transpose(0, 1)
    assert torch.equal(angles.cos(), cos) and torch.equal(angles.sin(), sin)
    # a genuinely 3-D layout: the H and W frequencies differ from T at image tokens
    assert not torch.equal(positions[0], positions[1])


def test_packed_rows_count_each_sequence_from_zero():
    """Packing two sequences into one row gives each the positions it has in a row of its own."""
    a, b = vl_batch(images_per_row=(1,), seed=3), vl_batch(images_per_row=(2,), grids=((1, 2, 6), (1, 6, 4)), seed=4)
    ids = torch.cat([a["input_ids"], b["input_ids"], torch.zeros(1, 3, dtype=torch.long)], dim=1)
    seg = torch.cat([torch.full_like(a["input_ids"], 1), torch.full_like(b["input_ids"], 2),
                     torch.zeros(1, 3, dtype=torch.long)], dim=1)
    grids = torch.cat([a["image_grid_thw"], b["image_grid_thw"]])
    packed = rope_index_packed(ids, grids, seg, MERGE, IMAGE, V_START)
    alone_a, _ = rope_index(a["input_ids"], a["image_grid_thw"], None, MERGE, IMAGE, V_START)
    alone_b, _ = rope_index(b["input_ids"], b["image_grid_thw"], None, MERGE, IMAGE, V_START)
    la, lb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    assert torch.equal(packed[:, :, :la], alone_a) and torch.equal(packed[:, :, la:la + lb], alone_b)
    assert not packed[:, :, la + lb:].any()
