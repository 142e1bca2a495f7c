import math

import pytest
import torch

from prism_mcore.algorithms.discriminator_loss import (alignment_discriminator_loss, bradley_terry_loss, clip_scores,
                                                       last_token_scores, load_balancing_loss, warmup_pair_loss)

D = torch.float64


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bradley_terry_and_warmup_hand_computed():
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(softplus(-1))
    assert bradley_terry_loss(torch.tensor([200.0]), torch.tensor([0.0])).item() == pytest.approx(0.0)
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([200.0])).item() == pytest.approx(200.0)
    loss, m = warmup_pair_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), aux_loss=torch.tensor(0.5))
    assert loss.item() == pytest.approx((softplus(-1) + softplus(1)) / 2 + 0.005)
    assert m["pair_acc"].item() == 0.5 and m["aux_loss"].item() == 0.5


def _scores():
    return (torch.tensor([0.0, 1.0], dtype=D), torch.tensor([1.0, 0.0], dtype=D),
            torch.tensor([1.0, 1.0], dtype=D), torch.tensor([1.0, 2.0], dtype=D))


def test_alignment_loss_hand_computed():
    sp, sr, tp, tr = _scores()
    valid = torch.tensor([True, False])
    reg = (0.5 + 0.5 + 1.0 + 2.5) / 4
    loss, m = alignment_discriminator_loss(sp, sr, tp, tr, valid)
    assert loss.item() == pytest.approx(softplus(-1) + math.log(2) + 0.001 * reg)
    assert m["perception_acc"].item() == 1.0 and m["reasoning_acc"].item() == 0.0
    assert m["valid_frac"].item() == 0.5
    # a global denominator (valid count of the whole mini-batch) for micro-batching
    loss, _ = alignment_discriminator_loss(sp, sr, tp, tr, valid, num_valid=4)
    assert loss.item() == pytest.approx((softplus(-1) + math.log(2)) / 4 + 0.001 * reg)


def test_alignment_loss_fallback_when_nothing_is_valid():
    sp, sr, tp, tr = _scores()
    none = torch.tensor([False, False])
    reg = (0.5 + 0.5 + 1.0 + 2.5) / 4
    loss, _ = alignment_discriminator_loss(sp, sr, tp, tr, none)
    assert loss.item() == pytest.approx(0.01 * (softplus(-1.0) + softplus(-1.5)) + 0.001 * reg)
    # other ranks have valid samples: this rank contributes only the regulariser
    loss, _ = alignment_discriminator_loss(sp, sr, tp, tr, none, global_num_valid=torch.tensor(3))
    assert loss.item() == pytest.approx(0.001 * reg)


def test_hard_clip_zeroes_gradient_but_tanh_does_not():
    s = torch.tensor([12.0, 3.0], dtype=D, requires_grad=True)
    clip_scores(s, 10.0, "hard").sum().backward()
    assert s.grad.tolist() == [0.0, 1.0]
    s.grad = None
    clip_scores(s, 10.0, "tanh").sum().backward()
    assert s.grad[0] > 0 and s.grad[1] == pytest.approx(1 - math.tanh(0.3) ** 2)
    assert clip_scores(torch.tensor([-50.0]), 10.0, "tanh").item() == pytest.approx(-10.0, abs=1e-3)
    assert clip_scores(torch.tensor([50.0]), 10.0, "none").item() == 50.0
    with pytest.raises(ValueError):
        clip_scores(s, 10.0, "soft")
    # inside the discriminator loss: a student score past the clip gets no gradient
    student = torch.tensor([15.0], dtype=D, requires_grad=True)
    loss, _ = alignment_discriminator_loss(student, torch.zeros(1, dtype=D), torch.zeros(1, dtype=D),
                                           torch.zeros(1, dtype=D), torch.tensor([True]))
    loss.backward()
    assert student.grad.item() == 0.0


def test_last_token_scores_any_padding():
    scores = torch.arange(1.0, 13.0).view(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0]])  # row 0 unpadded, left-, right-padded
    assert last_token_scores(scores, mask).tolist() == [4.0, 8.0, 10.0]


def test_load_balancing_hand_computed():
    l3 = math.log(3.0)
    balanced = torch.tensor([[[l3, 0.0], [0.0, l3]]])
    skewed = torch.tensor([[[l3, 0.0], [l3, 0.0]]])
    assert load_balancing_loss(balanced, top_k=1).item() == pytest.approx(1.0)
    assert load_balancing_loss(skewed, top_k=1).item() == pytest.approx(2 * 0.75)
    padded = torch.tensor([[[l3, 0.0], [l3, 0.0], [0.0, l3]]])
    mask = torch.tensor([[1, 1, 0]])
    assert load_balancing_loss(padded, top_k=1, attention_mask=mask).item() == pytest.approx(1.5)
    uniform_top2 = torch.zeros(1, 4, 4) + torch.eye(4) * 1e-3
    assert load_balancing_loss(uniform_top2, top_k=2).item() == pytest.approx(2.0, abs=1e-2)
    both = torch.cat([balanced, skewed])  # pooled: f=[.75,.25], P=[.625,.375]; per layer: mean(1, 1.5)
    assert load_balancing_loss(both, top_k=1).item() == pytest.approx(2 * (0.75 * 0.625 + 0.25 * 0.375))
    assert load_balancing_loss(list(both), top_k=1, per_layer=True).item() == pytest.approx(1.25)


def test_load_balancing_matches_hf_qwen3_moe():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2 * 5, 4, generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for m in (None, mask):
        ours = load_balancing_loss(logits, top_k=2, attention_mask=m)
        theirs = load_balancing_loss_func(tuple(logits), num_experts=4, top_k=2, attention_mask=m)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.parametrize("clip_mode", ["hard", "tanh", "none"])
def test_gradcheck_alignment_loss(clip_mode):
    gen = torch.Generator().manual_seed(1)
    scores = [(torch.randn(4, generator=gen, dtype=D) * 6).requires_grad_(True) for _ in range(4)]
    valid = torch.tensor([True, False, True, True])

    def f(*s):
        return alignment_discriminator_loss(*s, valid, clip_mode=clip_mode, score_clip=5.0)[0]

    assert torch.autograd.gradcheck(f, tuple(scores))
    assert torch.autograd.gradcheck(lambda *s: alignment_discriminator_loss(*s, valid & False)[0], tuple(scores))


def test_gradcheck_warmup_bt_last_token_and_load_balancing():
    gen = torch.Generator().manual_seed(2)
    t, s = (torch.randn(3, generator=gen, dtype=D, requires_grad=True) for _ in range(2))
    aux = torch.rand((), generator=gen, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: warmup_pair_loss(a, b, c)[0], (t, s, aux))
    assert torch.autograd.gradcheck(bradley_terry_loss, (t, s))
    tokens = torch.randn(2, 4, generator=gen, dtype=D, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.autograd.gradcheck(lambda x: last_token_scores(x, mask), (tokens,))
    logits = torch.randn(2, 6, 4, generator=gen, dtype=D, requires_grad=True)
    lb_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    for per_layer in (False, True):
        assert torch.autograd.gradcheck(
            lambda x: load_balancing_loss(x, top_k=2, attention_mask=lb_mask, per_layer=per_layer), (logits,))
