"""The same tiny Qwen3 model, trained one step at different Megatron layouts on CPU/gloo, must give
the same loss and the same (assembled) gradients as the single-rank run."""
import pytest
import torch

from mcore_jobs import global_loss, losses_and_grads
from prism_mcore.parallel.shards import assemble

LAYOUTS = {  # name: (layout, moe, world size)
    "tp2": ({"tp": 2}, False, 2),
    "tp2_sp": ({"tp": 2, "sequence_parallel": True}, False, 2),
    "pp2": ({"pp": 2}, False, 2),
    "moe_ep2": ({"ep": 2}, True, 2),
    "moe_tp2_sp": ({"tp": 2, "sequence_parallel": True}, True, 2),
    "moe_tp2_ep2_sp": ({"tp": 2, "ep": 2, "sequence_parallel": True}, True, 4),
}


@pytest.fixture(scope="module")
def references(request):
    """Single-rank runs (dense, MoE): full weights, loss and gradients."""
    from prism_mcore.platform.multiproc import run_on_ranks

    out = {}
    for moe in (False, True):
        res = run_on_ranks(losses_and_grads, 1, {}, moe, timeout=240)
        out[moe] = {"weights": assemble([r["params"] for r in res]), "loss": global_loss(res),
                    "grads": assemble([r["grads"] for r in res])}
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(name, references, ranks):
    layout, moe, world = LAYOUTS[name]
    ref = references[moe]
    res = ranks(losses_and_grads, world, layout, moe, ref["weights"])
    loss = global_loss(res)
    assert loss == pytest.approx(ref["loss"], rel=1e-5)
    grads = assemble([r["grads"] for r in res])
    assert grads.keys() == ref["grads"].keys()
    for key, g in grads.items():
        torch.testing.assert_close(g, ref["grads"][key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    # sanity: the gradients are not trivially zero
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
