"""`model.moe_expert_backend=grouped` (our grouped-GEMM experts in Megatron's MoE layer) against Megatron's
SequentialMLP on the same weights, and against transformers' Qwen3MoeForCausalLM through HF conversion."""
import pytest
import torch

from grouped_jobs import grouped_vs_sequential
from hf_jobs import megatron_logits, tiny_hf, tokens

LAYOUTS = [  # (name, layout, world, local experts per rank, local fc1 rows: [gate; up] of ffn 48 / expert TP)
    ("ep1", {}, 1, 4, 96),
    ("ep2", {"ep": 2}, 2, 2, 96),
    ("tp2_sp_etp2", {"tp": 2, "sequence_parallel": True}, 2, 4, 48),  # each expert split over 2 expert-TP ranks
]


def _close(got, want, what):
    scale = float(want.abs().max().clamp_min(1e-30))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,layout,world,local,fc1_rows", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_grouped_matches_sequential(name, layout, world, local, fc1_rows, ranks, tmp_path):
    """Same logits and the same gradient for every parameter (experts, router, attention, embeddings), float32;
    at EP2 the weights come from a dist checkpoint the sequential model saved; at EP1 the discriminator too."""
    ckpt = None
    if name == "ep2":
        (tmp_path / "ckpt").mkdir()
        ckpt = str(tmp_path / "ckpt")
    for out in ranks(grouped_vs_sequential, world, layout, ckpt, with_discriminator=name == "ep1", timeout=240):
        assert out["local_experts"] == local and out["fc1_shape"] == (fc1_rows, 64)
        _close(out["grp_logits"], out["seq_logits"], "logits")
        assert out["seq_grads"].keys() == out["grp_grads"].keys()
        assert len(out["expert_grads"]) == 2 * 2 * local  # fc1 and fc2 of every local expert, 2 layers
        for n, want in out["seq_grads"].items():
            _close(out["grp_grads"][n], want, f"grad {n}")
        if out["discriminator"] is not None:  # the discriminator builds on build_qwen3: same scores and grads
            seq, grp = out["discriminator"]["seq"], out["discriminator"]["grp"]
            _close(grp["scores"], seq["scores"], "discriminator scores")
            assert seq["grads"].keys() == grp["grads"].keys() and any("local_experts" in n for n in seq["grads"])
            for n, want in seq["grads"].items():
                _close(grp["grads"][n], want, f"discriminator grad {n}")


@pytest.mark.timeout(300)
def test_grouped_matches_transformers(tmp_path, ranks):
    """HF Qwen3-MoE weights -> Megatron (EP2, grouped experts) logits equal transformers' own."""
    hf = tiny_hf(tmp_path / "hf", moe=True, tied=False, vocab=300)
    ids = tokens(300)
    hf.eval()
    with torch.no_grad():
        expected = hf(ids).logits
    outs = ranks(megatron_logits, 2, str(tmp_path / "hf"), {"ep": 2}, ids, ["model.moe_expert_backend=grouped"],
                 timeout=240)
    for got in outs:
        assert got.shape == expected.shape
        assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-4
