"""Qwen3-VL's HF description and adapter, single process: config reading, the shapes a checkpoint must
have, the two fused-expert layouts (declared, never guessed), and the layouts the model refuses."""
import json

import pytest
import torch

from vl_jobs import hf_class, tiny_vl_config, tiny_vl_hf
from prism_mcore.checkpoint.hf_io import LazyCheckpoint, ShapeMismatch
from prism_mcore.models.qwen3_vl.config import arch_from_hf
from prism_mcore.models.qwen3_vl.hf_adapter import EXPERT_FC1, EXPERT_FC2, hf_shapes, megatron_reader
from prism_mcore.models.qwen3_vl.weights import check_checkpoint


def hf_dict(moe=False, tied=False, layers=4, **text):
    config_cls, _ = hf_class(moe)
    kwargs = tiny_vl_config(moe, tied, layers)
    kwargs["text_config"].update(text)
    return config_cls(**kwargs).to_dict()


def test_arch_reads_the_text_model_and_the_vision_tower():
    arch = arch_from_hf(hf_dict(moe=True, tied=True))
    m = arch.text
    sizes = (m.hidden_size, m.num_hidden_layers, m.head_dim, m.num_experts, m.moe_intermediate_size)
    assert sizes == (64, 4, 32, 4, 48)
    assert m.tie_word_embeddings and m.norm_topk_prob and m.rope_theta == 5e6
    assert arch.mrope_section == (6, 5, 5) and arch.num_deepstack == 2 and arch.spatial_merge_size == 2
    assert arch.text_for_megatron().megatron["mrope_section"] == [6, 5, 5]
    with pytest.raises(ValueError, match="norm_topk_prob"):
        arch_from_hf(hf_dict(moe=True, norm_topk_prob=False))
    bad = hf_dict()
    bad["text_config"]["rope_parameters"]["mrope_section"] = [8, 5, 5]
    with pytest.raises(ValueError, match="head_dim/2"):
        arch_from_hf(bad)
    with pytest.raises(ValueError, match="not Qwen3-VL"):
        arch_from_hf({"model_type": "qwen3"})


@pytest.mark.parametrize("moe, tied", [(False, True), (True, False)], ids=["dense_tied", "moe"])
def test_hf_shapes_are_those_transformers_writes(moe, tied, tmp_path):
    tiny_vl_hf(tmp_path, moe=moe, tied=tied, layers=2)
    arch = arch_from_hf(tmp_path)
    source = LazyCheckpoint(tmp_path)
    check_checkpoint(source, arch)  # exactly these tensors, these shapes (released expert layout)
    assert ("lm_head.weight" in hf_shapes(arch)) is not tied


def test_expert_layout_is_declared_not_guessed(tmp_path):
    """transformers' save_pretrained writes [E, 2I, H] / [E, H, I]; read as the released layout it fails
    with a message naming the right declaration, and read so declared it gives the same experts."""
    model = tiny_vl_hf(tmp_path / "released", moe=True, layers=2)
    model.save_pretrained(tmp_path / "transformers")
    arch = arch_from_hf(tmp_path / "released")
    with pytest.raises(ShapeMismatch, match="expert_layout='transformers'"):
        check_checkpoint(LazyCheckpoint(tmp_path / "transformers"), arch)
    check_checkpoint(LazyCheckpoint(tmp_path / "transformers"), arch, "transformers")
    m = arch.text
    regions = {EXPERT_FC1: (m.num_hidden_layers, m.num_experts, 2 * m.moe_intermediate_size, m.hidden_size),
               EXPERT_FC2: (m.num_hidden_layers, m.num_experts, m.hidden_size, m.moe_intermediate_size)}
    released = megatron_reader(arch, LazyCheckpoint(tmp_path / "released").get)
    saved = megatron_reader(arch, LazyCheckpoint(tmp_path / "transformers").get, "transformers")
    for key, shape in regions.items():
        region = tuple(slice(0, n) for n in shape)
        assert torch.equal(released(key, region), saved(key, region)), key
    # Megatron's fc1 of expert e is [gate; up] = transformers' in-memory gate_up_proj[e]
    experts = model.model.language_model.layers[1].mlp.experts
    assert torch.equal(released(EXPERT_FC1, tuple(slice(0, n) for n in regions[EXPERT_FC1]))[1],
                       experts.gate_up_proj.detach())
    # With hidden == 2 * moe_intermediate, gate_up_proj has the same shape in both layouts (transformers,
    # which decides tensor by tensor from the shape, then reads a released checkpoint's untransposed).
    square = arch_from_hf(hf_dict(moe=True, moe_intermediate_size=32))
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert hf_shapes(square, "released")[name] == hf_shapes(square, "transformers")[name] == (4, 64, 64)


def test_deepstack_layers_must_be_on_the_first_stage():
    from prism_mcore.config import ParallelConfig
    from prism_mcore.models.qwen3.model import transformer_config
    from prism_mcore.models.qwen3_vl.model import check_layout

    arch = arch_from_hf(hf_dict(layers=2))  # two deepstack features, one layer per stage at pp=2
    with pytest.raises(ValueError, match="first pipeline stage"):
        check_layout(arch, transformer_config(arch.text_for_megatron(), ParallelConfig(pp=2)))
    check_layout(arch, transformer_config(arch.text_for_megatron(), ParallelConfig(pp=1)))
    four = arch_from_hf(hf_dict(layers=4))
    check_layout(four, transformer_config(four.text_for_megatron(), ParallelConfig(pp=2)))
    full_recompute = four.text_for_megatron().model_copy(
        update={"megatron": {**four.text_for_megatron().megatron, "recompute_granularity": "full",
                             "recompute_method": "uniform", "recompute_num_layers": 1}})
    with pytest.raises(NotImplementedError, match="recomputation"):
        check_layout(four, transformer_config(full_recompute, ParallelConfig()))
    assert json.dumps(arch.vision)  # the vision config stays plain JSON (it travels in checkpoint metadata)
