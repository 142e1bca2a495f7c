"""Megatron Qwen3-VL / Qwen3-VL-MoE equal transformers: logits at every layout (rows with 0, 1 and 2 images
of different sizes, and a text-only batch), the fused log-prob head, the vision tower's gradients; and
HF -> Megatron -> dist checkpoint -> Megatron at another layout -> HF is bitwise."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vl_jobs import (VOCAB, hf_class, hf_forward, tiny_vl_hf, vl_batch, vl_fused_logprobs, vl_logits, vl_round_trip,
                     vl_vision_grads)

LAYOUTS = {  # all run in one 4-rank launch per family (DP fills the ranks a layout does not use)
    "dense": [{}, {"tp": 2, "sequence_parallel": True}, {"pp": 2}, {"tp": 2, "pp": 2}],
    "moe": [{}, {"tp": 2, "sequence_parallel": True}, {"pp": 2}, {"tp": 2, "pp": 2, "sequence_parallel": True},
            {"ep": 2}, {"tp": 2, "ep": 2, "sequence_parallel": True}],
}


def max_rel_err(got, expected, valid):
    return float((got - expected).abs()[valid].max() / expected.abs()[valid].max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    return {family: (str(root / family), tiny_vl_hf(root / family, moe=family == "moe"))
            for family in ("dense", "moe")}


def batches():
    return [vl_batch(images_per_row=(0, 1, 2)), vl_batch(images_per_row=(0, 0), seed=2)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["dense", "moe"])
def test_logits_match_transformers(family, checkpoints, ranks):
    hf_dir, hf = checkpoints[family]
    inputs = batches()
    assert inputs[0]["image_grid_thw"].shape[0] == 3 and inputs[1]["pixel_values"] is None
    with torch.no_grad():
        expected = [hf_forward(hf, b) for b in inputs]
    layouts = LAYOUTS[family]
    per_rank = ranks(vl_logits, 4, hf_dir, layouts, inputs, timeout=500)
    for layout_index, layout in enumerate(layouts):
        outs = [r[layout_index] for r in per_rank if r[layout_index][0] is not None]
        assert len(outs) == 4 // layout.get("pp", 1), layout  # every last-stage rank answered
        for per_batch in outs:
            for got, want, batch in zip(per_batch, expected, inputs):
                valid = batch["attention_mask"].bool()  # right padding: pads are not compared
                assert got.shape == want.shape
                assert max_rel_err(got, want, valid) <= 1e-4, (layout, max_rel_err(got, want, valid))


@pytest.mark.timeout(300)
def test_fused_logprob_head_matches_transformers(checkpoints, ranks):
    """`use_fused_logprob_head` (it patches output_layer.forward) works on the VL model under TP2+SP."""
    hf_dir, hf = checkpoints["dense"]
    batch = vl_batch(images_per_row=(1, 2, 0))
    ids = batch["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_forward(hf, batch).double(), -1)
    expected = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = batch["attention_mask"][:, 1:].bool()
    layout = {"tp": 2, "sequence_parallel": True}
    outs = [o for o in ranks(vl_fused_logprobs, 2, hf_dir, layout, batch) if o is not None]
    assert len(outs) == 2
    for logp in outs:
        torch.testing.assert_close(logp.double()[valid], expected[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(300)
def test_vision_gradients_match_transformers(checkpoints, ranks):
    """Through Megatron DDP, grad finalization and optimizer: TP1 (DP2), TP2 (replicas already whole) and
    TP2+SP (each rank's part, summed over TP). The vision gradients and the optimizer's global grad norm
    equal transformers' (nothing dropped, nothing counted twice), and after the step the tower's
    replicas are still identical on all ranks."""
    hf_dir, hf = checkpoints["dense"]
    batch = vl_batch(images_per_row=(0, 1, 2))
    weights = torch.randn(*batch["input_ids"].shape, VOCAB, generator=torch.Generator().manual_seed(5))
    weights *= batch["attention_mask"][..., None]
    hf.zero_grad()
    (hf_forward(hf, batch) * weights).sum().backward()
    expected = {n: p.grad.clone() for n, p in hf.named_parameters() if n.startswith("model.visual.")}
    expected_norm = float(torch.stack([p.grad.norm() for p in hf.parameters() if p.grad is not None]).norm())
    before = {n: p.detach().clone() for n, p in hf.named_parameters() if n.startswith("model.visual.")}
    hf.zero_grad()
    layouts = [{}, {"tp": 2}, {"tp": 2, "sequence_parallel": True}]
    per_rank = ranks(vl_vision_grads, 2, hf_dir, layouts, batch, weights, timeout=250)
    for i, layout in enumerate(layouts):
        for grads, grad_norm, _ in (r[i] for r in per_rank):
            assert grads.keys() == expected.keys()
            for name, want in expected.items():
                assert want.abs().max() > 0, name  # every vision parameter is exercised
                torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                                           msg=lambda m: f"{layout} {name}: {m}")
            assert abs(grad_norm - expected_norm) <= 1e-4 * expected_norm, (layout, grad_norm, expected_norm)
        stepped = [r[i][2] for r in per_rank]
        for name in before:
            assert not torch.equal(stepped[0][name], before[name]), (layout, name)
            assert torch.equal(stepped[0][name], stepped[1][name]), (layout, name)


def _tensors(d: Path) -> dict:
    out = {}
    for f in d.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["dense", "moe"])
def test_round_trip_is_bitwise(family, tmp_path, ranks):
    """Dense (tied): HF -> TP2+PP2 -> checkpoint -> TP1 -> HF. MoE: HF -> EP2 -> checkpoint -> TP2+PP2+SP -> HF.
    The Megatron model at the second layout starts from other random values: everything comes from the
    checkpoint, the vision tower included. transformers reads the export (MoE experts in Qwen's layout)."""
    moe = family == "moe"
    source = tiny_vl_hf(tmp_path / "hf", moe=moe, tied=not moe)
    first, second = ({"ep": 2}, {"tp": 2, "pp": 2, "sequence_parallel": True}) if moe else ({"tp": 2, "pp": 2}, {})
    ranks(vl_round_trip, 4, str(tmp_path / "hf"), str(tmp_path / "back"), str(tmp_path / "ckpt"), first, second,
          timeout=500)
    before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert before.keys() == after.keys()
    assert any(k.startswith("model.visual.") for k in after)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 1
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf" / "config.json").read_text())
    if moe:
        gate_up = after["model.language_model.layers.0.mlp.experts.gate_up_proj"]
        assert gate_up.shape == (4, 64, 2 * 48)  # [E, H, 2I]: the released layout
    _, model_cls = hf_class(moe)
    reloaded, info = model_cls.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want = source.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in reloaded.state_dict().items())
