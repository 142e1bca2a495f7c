"""The Transformer Engine layer spec against the local spec, on the same weights (skipped without CUDA
or without transformer_engine)."""
import pytest

from gpu_marks import needs_cuda

pytestmark = needs_cuda


@pytest.mark.timeout(600)
def test_te_spec_matches_local_spec(ranks):
    pytest.importorskip("transformer_engine")
    from gpu_jobs_te import te_vs_local

    got = ranks(te_vs_local, 1, timeout=300)[0]
    assert got["uses_te"], "the model was built without the TE spec although transformer_engine imports"
    assert got["max_rel_err"] < 1e-3, got
