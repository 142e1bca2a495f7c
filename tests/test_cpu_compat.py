"""Each CPU-compatibility patch is needed: leaving it out makes the Megatron feature it serves fail."""
import pytest

from mcore_jobs import megatron_feature, run_features
from prism_mcore.platform.multiproc import RankFailure

# patch -> (world size, feature that needs it, text of the raw Megatron/torch error)
NEEDED_BY = {
    "cuda_device_api": (1, "rope_forward", "CUDA"),
    "cuda_rng": (1, "seed", "CUDA"),
    "cuda_streams": (1, "moe_step", "Stream"),
    "cuda_device_literals": (2, "pp2_step", "CUDA"),
    "optimizer_tensor_type_names": (1, "optimizer", "Wrapped parameters must be one of"),
    "optimizer_torch_adam_step": (1, "optimizer_resume", "KeyError: 'step'"),
    "moe_te_gemm_symbol": (1, "moe_step", "te_general_gemm"),
    "moe_alltoall_split_sizes": (2, "moe_ep2_step", "all_to_all_single"),
    "torch_norm_sequence_parallel": (2, "tp2_sp", "sequence parallel not supported"),
    "gloo_uneven_collectives": (4, "moe_tp2_ep2_step", "invalid tensor size"),
}


def test_every_patch_has_a_test():
    from prism_mcore.platform.cpu_compat import PATCHES

    assert set(PATCHES) == set(NEEDED_BY)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("patch", list(NEEDED_BY))
def test_feature_fails_without_patch(patch, ranks):
    world, feature, error = NEEDED_BY[patch]
    with pytest.raises(RankFailure) as failure:
        ranks(megatron_feature, world, feature, env={"PRISM_CPU_COMPAT_SKIP": patch}, timeout=120, grace=5)
    assert error in str(failure.value)


@pytest.mark.timeout(300)
def test_single_rank_features_work_with_all_patches(ranks):
    # the two-rank features run in test_parallel_equivalence.py
    features = sorted({f for world, f, _ in NEEDED_BY.values() if world == 1})
    assert ranks(run_features, 1, features) == [["ok"] * len(features)]
