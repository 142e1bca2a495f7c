import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_mcore.algorithms.aggregation import AGG_MODES, LossNormalizer, aggregate, masked_mean
from prism_mcore.algorithms.kl import entropy_from_logits, kl_estimate
from prism_mcore.algorithms.policy_loss import PolicyLossConfig, policy_loss

D = torch.float64


def _tokens(ratios, advs):
    logp = torch.zeros(1, len(ratios), dtype=D, requires_grad=True)
    old = -torch.log(torch.tensor([ratios], dtype=D))
    return logp, old, torch.tensor([advs], dtype=D), torch.ones(1, len(ratios), dtype=torch.bool)


def test_ppo_dual_clip_hand_computed():
    logp, old, adv, mask = _tokens([1.5, 0.5, 0.5, 5.0, 1.1, 1.0], [1, 1, -1, -1, -1, 2])
    loss, m = policy_loss(logp, old, adv, mask, PolicyLossConfig())
    # per token: -1.2 (clip high), -0.5, 0.8 (clip low), 3 (dual clip of 5), 1.1, -2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 3.0 + 1.1 - 2.0) / 6)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 6)
    assert m["clip_frac_dual"].item() == pytest.approx(1 / 6)
    assert m["clip_frac"].item() == pytest.approx(3 / 6)
    assert (m["ratio_min"].item(), m["ratio_max"].item()) == (pytest.approx(0.5), pytest.approx(5.0))
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 0.5 + 5 + 1.1 + 1) / 6)
    assert m["approx_kl"].item() == pytest.approx(-sum(math.log(r) for r in [1.5, .5, .5, 5, 1.1, 1]) / 6)
    # no dual clip: the fourth token keeps 5
    loss, _ = policy_loss(logp, old, adv, mask, PolicyLossConfig(clip_ratio_c=None))
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 5.0 + 1.1 - 2.0) / 6)


def test_dapo_clip_higher_hand_computed():
    logp, old, adv, mask = _tokens([1.5, 0.5], [1, -1])
    loss, _ = policy_loss(logp, old, adv, mask, PolicyLossConfig.preset("dapo"))
    assert loss.item() == pytest.approx((-1.28 + 0.8) / 2)


def test_log_ratio_clamp():
    logp, old, adv, mask = _tokens([math.exp(30.0)], [-1])
    _, m = policy_loss(logp, old, adv, mask, PolicyLossConfig(clip_ratio_c=None))
    assert m["ratio_max"].item() == pytest.approx(math.exp(20.0))


def test_gspo_hand_computed():
    logp = torch.zeros(2, 3, dtype=D, requires_grad=True)
    old = -torch.tensor([[0.1, 0.3, 9.0], [-1e-4, 1e-4, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([[1.0] * 3, [-2.0] * 3], dtype=D)
    loss, m = policy_loss(logp, old, adv, mask, PolicyLossConfig.preset("gspo"))
    # seq 0: s = e^0.2 clipped to 1.0004 -> -1.0004; seq 1: s = 1 -> 2
    assert loss.item() == pytest.approx((-1.0004 + 2.0) / 2)
    assert m["ratio_max"].item() == pytest.approx(math.exp(0.2))
    assert m["clip_frac_high"].item() == pytest.approx(2 / 5)


def test_aggregation_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx(3.5)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(2.75)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 6)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_length=10).item() == pytest.approx(7 / 20)
    assert LossNormalizer("token-mean", num_tokens=6).share(loss, mask).item() == pytest.approx(7 / 6)
    assert LossNormalizer("seq-mean-token-mean", num_seqs=4).share(loss, mask).item() == pytest.approx(5.5 / 4)
    with pytest.raises(ValueError):
        aggregate(loss, mask, "sum")


def test_micro_batches_with_global_denominators_add_up():
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = torch.rand(6, 5) > 0.3
    for mode in AGG_MODES:
        whole = aggregate(loss, mask, mode)
        norm = LossNormalizer.local(mask, mode)
        parts = norm.share(loss[:2], mask[:2]) + norm.share(loss[2:], mask[2:])
        assert parts.item() == pytest.approx(whole.item(), abs=1e-6), mode


def test_kl_estimators_hand_computed():
    logp, ref = torch.zeros(1), torch.tensor([math.log(0.5)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_estimate(torch.zeros(1), torch.tensor([50.0]), "k3").item() == pytest.approx(10.0)
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")
    assert entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)


def test_kl_entropy_and_tis_terms():
    logp, old, adv, mask = _tokens([1.0, 1.0], [1.0, -1.0])
    ref = torch.full_like(old, math.log(0.5))
    entropy = torch.tensor([[0.3, 0.5]], dtype=D)
    cfg = PolicyLossConfig(kl_coef=0.1, kl_type="k1", entropy_coef=0.01, tis_cap=1.5)
    rollout = old - math.log(2.0)  # pi_old / pi_rollout = 2 -> capped at 1.5
    loss, m = policy_loss(logp, old, adv, mask, cfg, rollout_log_prob=rollout, ref_log_prob=ref, entropy=entropy)
    pg = (-1.0 * 1.5 + 1.0 * 1.5) / 2
    assert loss.item() == pytest.approx(pg + 0.1 * math.log(2) - 0.01 * 0.4)
    assert m["tis_weight_mean"].item() == pytest.approx(1.5) and m["tis_clip_frac"].item() == 1.0
    assert m["mismatch_kl"].item() == pytest.approx(2 - math.log(2) - 1)
    assert m["mismatch_kl_k1"].item() == pytest.approx(-math.log(2))
    assert m["kl_loss"].item() == pytest.approx(math.log(2)) and m["entropy"].item() == pytest.approx(0.4)
    # TIS is off by default: mismatch is only reported
    _, m = policy_loss(logp, old, adv, mask, rollout_log_prob=rollout)
    assert "tis_weight_mean" not in m and m["mismatch_kl"].item() > 0
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, PolicyLossConfig(tis_cap=2.0))


def test_on_policy_default_has_ratio_one():
    logp = torch.tensor([[-0.5, -1.0]], dtype=D, requires_grad=True)
    adv = torch.tensor([[2.0, 2.0]], dtype=D)
    loss, m = policy_loss(logp, None, adv, torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx(-2.0) and m["ratio_max"].item() == 1.0
    assert logp.grad.tolist() == [[-1.0, -1.0]]


def test_presets():
    assert PolicyLossConfig.preset("gspo").agg_mode == "seq-mean-token-mean"
    assert PolicyLossConfig.preset("dapo", clip_high=0.3).clip_high == 0.3
    with pytest.raises(ValueError):
        PolicyLossConfig.preset("ppo2")


CONFIGS = [PolicyLossConfig.preset(a, agg_mode=mode) for a in ("grpo", "dapo", "gspo") for mode in AGG_MODES]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 10_000))
def test_ratio_one_clipped_equals_unclipped(batch, width, seed):
    gen = torch.Generator().manual_seed(seed)
    logp_data = -torch.rand(batch, width, generator=gen, dtype=D) * 3
    adv = torch.randn(batch, 1, generator=gen, dtype=D).expand(batch, width) * 2
    mask = torch.rand(batch, width, generator=gen) > 0.3
    for cfg in CONFIGS:
        logp = logp_data.clone().requires_grad_(True)
        loss, m = policy_loss(logp, logp_data.clone(), adv, mask, cfg)
        loss.backward()
        ref_logp = logp_data.clone().requires_grad_(True)
        unclipped = aggregate(-adv * torch.exp(ref_logp - ref_logp.detach()), mask, cfg.agg_mode)
        unclipped.backward()
        assert loss.item() == pytest.approx(unclipped.item(), abs=1e-12)
        assert torch.allclose(logp.grad, ref_logp.grad, atol=1e-12)
        assert m["clip_frac"].item() == 0.0


def test_gspo_token_gradient_is_sequence_gradient_spread_over_tokens():
    gen = torch.Generator().manual_seed(1)
    logp_data = -torch.rand(3, 5, generator=gen, dtype=D)
    old = logp_data + 0.2 * torch.randn(3, 5, generator=gen, dtype=D)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    adv_seq = torch.tensor([1.5, -0.5, 2.0], dtype=D)
    cfg = PolicyLossConfig.preset("gspo", clip_low=10.0, clip_high=10.0)  # no clipping
    logp = logp_data.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv_seq[:, None].expand(3, 5), mask, cfg)
    loss.backward()
    seq_logp = logp_data.clone().requires_grad_(True)
    m = mask.to(D)
    s = torch.exp(((seq_logp - old) * m).sum(-1) / m.sum(-1))
    (-(adv_seq * s)).mean().backward()
    assert torch.allclose(logp.grad, seq_logp.grad, atol=1e-12)
    assert torch.allclose(loss, (-(adv_seq * s)).mean())
    # each token's gradient is -A_i * s_i / |y_i| / B
    expected = (-(adv_seq * s.detach()) / m.sum(-1) / 3)[:, None] * m
    assert torch.allclose(logp.grad, expected, atol=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS + [
    PolicyLossConfig.preset("gspo", clip_low=0.05, clip_high=0.05),
    PolicyLossConfig.preset("gspo", clip_low=10.0, clip_high=10.0),
    PolicyLossConfig(kl_coef=0.1, kl_type="k1", entropy_coef=0.01, tis_cap=1.2),
    PolicyLossConfig(kl_coef=0.1, kl_type="k2"),
    PolicyLossConfig(kl_coef=0.1, kl_type="k3", agg_mode="seq-mean-token-mean"),
], ids=lambda c: f"{c.mode}-{c.agg_mode}-{c.clip_high}-{c.kl_type if c.kl_coef else ''}")
def test_gradcheck_policy_losses(cfg):
    gen = torch.Generator().manual_seed(3)
    logp = (-torch.rand(3, 4, generator=gen, dtype=D)).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(3, 4, generator=gen, dtype=D)
    rollout = old + 0.1 * torch.randn(3, 4, generator=gen, dtype=D)
    ref = old + 0.2 * torch.randn(3, 4, generator=gen, dtype=D)
    adv = torch.randn(3, 1, generator=gen, dtype=D).expand(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    entropy = torch.rand(3, 4, generator=gen, dtype=D, requires_grad=True)

    def f(lp, ent):
        return policy_loss(lp, old, adv, mask, cfg, rollout_log_prob=rollout, ref_log_prob=ref, entropy=ent)[0]

    assert torch.autograd.gradcheck(f, (logp, entropy))


def test_gradcheck_kl_entropy_and_masked_mean():
    gen = torch.Generator().manual_seed(4)
    logp = (-torch.rand(2, 3, generator=gen, dtype=D)).requires_grad_(True)
    ref = -torch.rand(2, 3, generator=gen, dtype=D)
    for kind in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda x: kl_estimate(x, ref, kind), (logp,))
    logits = torch.randn(2, 5, generator=gen, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(entropy_from_logits, (logits,))
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert torch.autograd.gradcheck(lambda x: masked_mean(x, mask), (logp,))
