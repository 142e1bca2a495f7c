"""Pool set-up shared by the rollout tests."""

# Tiny engines: 64 MiB of KV cache is 1000s of tokens for this model; 4 sequences at a time. Prompts are
# token ids and no test uses stop strings, so the engines skip loading the 18 MB tokenizer (~15 s each).
ENGINE_KWARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=4, kv_cache_bytes=64 << 20, seed=0,
                     skip_tokenizer_init=True)


def rollout_config(**overrides):
    from prism_mcore.config import load_config

    base = {"num_engines": 2, "timeout_s": 240, "mode": "disaggregated"}
    return load_config(None, [f"rollout.{k}={v}" for k, v in {**base, **overrides}.items()]).rollout


def start_pool(model_dir, namespace, **overrides):
    from prism_mcore.rollout.engine_pool import EnginePool, make_placement

    rollout = rollout_config(**overrides)
    placement = make_placement(rollout, trainer_ranks=2)
    return EnginePool(str(model_dir), rollout, ENGINE_KWARGS, placement=placement, namespace=namespace).start()
