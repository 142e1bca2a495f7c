"""Megatron shards at TP2 / PP2 / EP2 stream exactly the HF checkpoint they were loaded from (no vLLM)."""
import pytest
import torch
from safetensors.torch import load_file

from rollout_models import write_tiny_hf
from sync_jobs import hf_tensors_at_layout

CASES = [("dense_tp2", False, {"tp": 2}), ("dense_pp2", False, {"pp": 2}), ("moe_ep2", True, {"ep": 2}),
         ("untied_tp2_pp2", False, {"tp": 2, "pp": 2})]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_stream_equals_checkpoint(case, tmp_path, ranks):
    name, moe, layout = case
    world = 4 if name.startswith("untied") else 2
    write_tiny_hf(tmp_path, moe=moe, tied=not name.startswith("untied"))
    expected = load_file(tmp_path / "model.safetensors")
    per_rank = ranks(hf_tensors_at_layout, world, str(tmp_path), layout, timeout=240)
    seen = {}
    for rank_out in per_rank:
        for k, v in rank_out.items():
            assert k not in seen, f"{k} sent by two ranks"
            seen[k] = v
    assert seen.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(seen[k], v), k
    senders = [len(r) for r in per_rank]
    assert all(n > 0 for n in senders), f"every rank should send part of the model, got {senders}"
