"""prism_mcore.config.memory: exact parameter counts (against transformers' own Qwen3 classes), the
per-GPU estimate's scaling with the layout, and `prism validate` on every cluster config."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from prism_mcore.config import load_config
from prism_mcore.config.memory import GiB, estimate_memory, param_counts
from prism_mcore.config.schema import ModelConfig

REPO = Path(__file__).resolve().parents[1]
CLUSTER = sorted((REPO / "configs" / "cluster").glob("*.yaml"))

QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
QWEN3_17B_4X = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=6144)
TINY_MOE = dict(vocab_size=1000, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, num_experts=5,
                num_experts_per_tok=2, moe_intermediate_size=40)
TINY_DENSE = dict(vocab_size=1000, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=20, tie_word_embeddings=True)


def _hf_numel(m: ModelConfig) -> int:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    kw = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
              num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
              num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim,
              tie_word_embeddings=m.tie_word_embeddings)
    if m.is_moe:
        cls, config = Qwen3MoeForCausalLM, Qwen3MoeConfig(
            **kw, num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
            moe_intermediate_size=m.moe_intermediate_size, decoder_sparse_step=1, mlp_only_layers=[])
    else:
        cls, config = Qwen3ForCausalLM, Qwen3Config(**kw)
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied matrix once


@pytest.mark.parametrize("shape", [QWEN3_4B, QWEN3_8B, QWEN3_17B_4X, TINY_MOE, TINY_DENSE],
                         ids=["qwen3-4b", "qwen3-8b", "qwen3-1.7b-4x-moe", "tiny-moe-untied", "tiny-dense-tied"])
def test_param_counts_match_transformers(shape):
    m = ModelConfig(**shape)
    assert param_counts(m).total == _hf_numel(m)


def test_published_sizes():
    assert param_counts(ModelConfig(**QWEN3_4B)).total == 4_022_468_096
    assert param_counts(ModelConfig(**QWEN3_8B)).total == 8_190_735_360


def _cfg(name: str, *overrides: str):
    return load_config(REPO / "configs" / "cluster" / name, list(overrides))


def test_tp_halves_the_sharded_weights():
    est = {tp: estimate_memory(_cfg("qwen3_8b_grpo.yaml", f"parallel.tp={tp}")).models[0] for tp in (2, 4)}
    # everything but the replicated norms (a few hundred kB) is split over tp
    assert est[4].weights == pytest.approx(est[2].weights / 2, rel=1e-3)
    assert est[4].grads == pytest.approx(est[2].grads / 2, rel=1e-3)


def test_distributed_optimizer_divides_state_by_dp():
    on = estimate_memory(_cfg("qwen3_8b_grpo.yaml")).models[0]  # tp 2 on 8 ranks: dp 4
    off = estimate_memory(_cfg("qwen3_8b_grpo.yaml", "optim.use_distributed_optimizer=false")).models[0]
    assert on.optimizer == pytest.approx(off.optimizer / 4, rel=1e-6)
    assert off.optimizer == pytest.approx(12 * off.local_params, rel=1e-6)  # fp32 master + Adam m, v
    assert (on.weights, on.grads) == (off.weights, off.grads)


def test_expert_parallel_splits_experts():
    def experts(ep):
        d = estimate_memory(_cfg("qwen3_4b_disc_warmup.yaml", f"parallel.ep={ep}")).models[0]
        return d.weights
    m = ModelConfig(**QWEN3_17B_4X)
    per_rank_expert_bytes = m.num_hidden_layers * param_counts(m).experts * 2 / 2  # bf16, etp = tp = 2
    assert experts(1) - experts(4) == pytest.approx(per_rank_expert_bytes * (1 - 1 / 4), rel=1e-6)


def test_recompute_and_tokens_scale_activations():
    full = estimate_memory(_cfg("qwen3_4b_grpo.yaml", "model.megatron.recompute_granularity=full")).models[0]
    none = estimate_memory(_cfg("qwen3_4b_grpo.yaml")).models[0]
    double = estimate_memory(_cfg("qwen3_4b_grpo.yaml", "data.micro_batch_tokens=20480")).models[0]
    assert full.activations < none.activations / 5
    # the per-layer part doubles; the head's fixed workspace and d(weight) buffer do not
    assert 1.8 * none.activations < double.activations < 2 * none.activations


def test_align_counts_both_models_and_the_rollout():
    est = estimate_memory(_cfg("qwen3_4b_align.yaml"))
    assert [m.name for m in est.models] == ["policy", "discriminator"]
    assert est.training_peak == sum(m.total for m in est.models)
    assert est.rollout_weights == param_counts(ModelConfig(**QWEN3_4B)).total * 2 // 2  # bf16 over engine_tp 2


def _validate(path, *extra):
    # --config-only: the cluster configs are templates whose data files and checkpoints come at launch
    return subprocess.Popen([sys.executable, "-m", "prism_mcore.cli", "validate", "--config-only", str(path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_cluster_config_validates_and_fits():
    assert {p.name for p in CLUSTER} >= {"qwen3_4b_disc_warmup.yaml", "qwen3_4b_align.yaml", "qwen3_8b_sft.yaml",
                                         "qwen3_8b_grpo.yaml", "qwen3_8b_align.yaml"}
    procs = {p: _validate(p) for p in CLUSTER}  # in parallel: each is an interpreter start-up
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{path.name}: {err}"
        assert out.splitlines()[0].startswith(f"{path}: ok (")
        assert "training peak" in out
        assert estimate_memory(load_config(path)).fits(80.0), path.name


def test_oversized_layout_exits_1_with_one_line():
    overrides = ["parallel.tp=1", "parallel.sequence_parallel=false"]
    proc = _validate(REPO / "configs" / "cluster" / "qwen3_8b_sft.yaml", *overrides)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert " ok (" in out.splitlines()[0]  # the config itself is valid; only the memory check fails
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "exceeds --gpu-memory-gib=80" in lines[0], err
    peak = estimate_memory(load_config(REPO / "configs" / "cluster" / "qwen3_8b_sft.yaml",
                                       overrides)).peak
    assert peak > 80 * GiB


@pytest.mark.parametrize("config", ["qwen3_vl_4b.yaml", "qwen3_vl_8b.yaml", "qwen3_vl_2b_4x_disc_warmup.yaml"])
def test_vl_param_counts_match_transformers(config):
    """Qwen3-VL(-MoE): the language model's counts plus the vision tower's (models/qwen3_vl/memory.py) equal
    transformers' model built on the meta device from the config.json the spec writes for the cluster config."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig
    from transformers import Qwen3VLMoeForConditionalGeneration

    from prism_mcore.models.qwen3_vl.memory import merger_params, trainable_vision_params, vision_params
    from prism_mcore.models.spec import resolve

    m = load_config(REPO / "configs" / "cluster" / config).model
    spec, arch = resolve(m)
    hf = spec.hf_config(arch)
    config_cls, model_cls = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if arch.is_moe
                             else (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    with torch.device("meta"):
        model = model_cls(config_cls(**{k: v for k, v in hf.items() if k != "transformers_version"}))
    counts = param_counts(m)
    assert counts.total == sum(p.numel() for p in model.parameters())
    tower = model.model.visual
    assert counts.extra == vision_params(m.vision.tower) == sum(p.numel() for p in tower.parameters())
    mergers = sum(p.numel() for n, p in tower.named_parameters() if n.startswith(("merger.", "deepstack_merger")))
    assert merger_params(m.vision.tower) == mergers == trainable_vision_params(m.vision.tower, "merger")


def test_vision_tower_and_image_tokens_are_counted():
    cfg = load_config(REPO / "configs" / "cluster" / "qwen3_vl_4b.yaml")
    full = estimate_memory(cfg).models[0]
    frozen = estimate_memory(load_config(REPO / "configs" / "cluster" / "qwen3_vl_4b.yaml",
                                         ["model.vision.train=frozen"])).models[0]
    text = estimate_memory(load_config(REPO / "configs" / "cluster" / "qwen3_vl_4b.yaml",
                                       ["model.vision=null"])).models[0]
    tower = param_counts(cfg.model).extra
    assert 0.4e9 < tower < 0.45e9  # Qwen3-VL-4B's tower: ~0.42B parameters
    assert full.weights - text.weights == frozen.weights - text.weights == tower * 2  # bf16, replicated over TP
    assert full.grads - text.grads == tower * 4 and frozen.grads == text.grads  # frozen: no gradient buffer
    assert full.activations > frozen.activations == text.activations
    bigger = estimate_memory(load_config(REPO / "configs" / "cluster" / "qwen3_vl_4b.yaml",
                                         ["model.vision.max_pixels=627200"])).models[0]  # 2x the pixels
    assert bigger.activations - text.activations == pytest.approx(2 * (full.activations - text.activations), rel=1e-6)
