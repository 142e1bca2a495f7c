"""Megatron shards at TP2 / PP2 / EP2 stream exactly the HF checkpoint they were loaded from (no vLLM),
and every rank takes a share of the sending; Qwen3-VL(-MoE) too (vision tower, fused released experts)."""
import pytest
import torch
from safetensors.torch import load_file

from rollout_models import write_tiny_hf
from sync_jobs import hf_tensors_at_layouts
from vl_jobs import tiny_vl_hf

CASES = [("dense_tied_tp2", False, True, {"tp": 2}), ("dense_untied_pp2", False, False, {"pp": 2}),
         ("moe_ep2", True, True, {"ep": 2}), ("moe_untied_tp2_sp", True, False, {"tp": 2, "sequence_parallel": True}),
         ("vl_dense_tied_pp2", False, True, {"pp": 2}), ("vl_moe_ep2", True, False, {"ep": 2})]


@pytest.mark.timeout(300)
def test_stream_equals_checkpoint(tmp_path, ranks):
    for name, moe, tied, _ in CASES:
        (tiny_vl_hf if name.startswith("vl") else write_tiny_hf)(tmp_path / name, moe=moe, tied=tied)
    per_rank = ranks(hf_tensors_at_layouts, 2, [(str(tmp_path / c[0]), c[3]) for c in CASES], timeout=240)
    for i, (name, *_rest) in enumerate(CASES):
        expected = load_file(tmp_path / name / "model.safetensors")
        seen = {}
        for rank_out in per_rank:
            for k, v in rank_out[i].items():
                assert k not in seen, f"{name}: {k} sent by two ranks"
                seen[k] = v
        assert seen.keys() == expected.keys(), name
        for k, v in expected.items():
            assert torch.equal(seen[k], v), f"{name}: {k}"
        assert all(len(r[i]) > 0 for r in per_rank), f"{name}: every rank should send part of the model"
