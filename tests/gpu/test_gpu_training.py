"""One SFT step and one policy update of the tiny policy through Megatron and the step runner: on the GPU
when there is one, and with the device forced to CPU always. Each checks a number that could be wrong
(the loss against a float64 recomputation from materialised logits; the on-policy pg_loss against the
advantages), and on a GPU machine the CUDA step must agree with the CPU step."""
import math

import pytest

from gpu_marks import CUDA, DEVICES

CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def _run(ranks, fn, device):
    return ranks(fn, 1, env=CPU_ONLY if device == "cpu" else None, timeout=300)[0]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("device", DEVICES)
def test_sft_step(ranks, device):
    from gpu_jobs import sft_step

    got = _run(ranks, sft_step, device)
    assert got["device"].startswith(device)
    assert got["micro"] > 1  # the runner split the batch: the normaliser is exercised
    assert got["loss"] == pytest.approx(got["reference"], rel=1e-5)
    assert math.isfinite(got["grad_norm"]) and got["grad_norm"] > 0
    assert got["after"] < got["reference"]  # the step lowered the loss
    if device == "cuda":
        cpu = _run(ranks, sft_step, "cpu")
        assert got["loss"] == pytest.approx(cpu["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(cpu["grad_norm"], rel=1e-4)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("device", DEVICES)
def test_policy_update(ranks, device):
    from gpu_jobs import policy_update

    got = _run(ranks, policy_update, device)
    assert got["device"].startswith(device)
    assert got["pg_loss"] == pytest.approx(got["expected_pg_loss"], rel=1e-5, abs=1e-7)
    assert math.isfinite(got["grad_norm"]) and got["grad_norm"] > 0
    if device == "cuda":
        cpu = _run(ranks, policy_update, "cpu")
        assert got["grad_norm"] == pytest.approx(cpu["grad_norm"], rel=1e-4)
        assert got["mismatch_kl"] == pytest.approx(cpu["mismatch_kl"], rel=1e-4)


def test_cuda_is_what_the_suite_thinks():
    import torch

    assert CUDA == torch.cuda.is_available()
