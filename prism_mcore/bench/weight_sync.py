"""`prism bench weight-sync [--json FILE]`: Megatron -> engine weight-sync bandwidth vs plain memcpy.

What one timed sync covers (the same `sync_weights` call training uses, on a random Qwen3 of >= 200 MB):
plan + Megatron shards -> HF tensors (`hf_tensors`) -> buckets in /dev/shm staging slots -> every engine
stages them (validated, via Ray) -> commit on every engine. Receiving engines:
  * `receiver`: the receiving side of the transport plus a copy of every tensor into an HF-layout model
    (preallocated tensors, double-buffered: buckets are copied into the shadow set as they arrive and the
    commit swaps it in) held by the receiving process, in equal byte shares over one thread per core;
  * `vllm`: a real vLLM engine (load_format=dummy, so no checkpoint is written); its commit is vLLM's
    layerwise reload, which on CPU also re-packs every linear layer for oneDNN.
Two sender modes are timed: `copy` (every tensor packed into the /dev/shm staging slots) and `zero_copy`
(after `share_weights_memory`: tensors that are views of this rank's parameters travel as references and
the engine reads them from trainer memory; the headline with --transport shm, the default). Per mode, the first sync
(allocating and mapping staging) is a warm-up and the median of the next `--reps` is reported. memcpy:
the faster of `dst.copy_(src)` and an equal-shares libc memmove over every core (plus, reported beside it, the
same with streaming stores when prism_mcore._C is built: the receiver's copy, faster than memcpy), of a
pre-faulted 1 GiB
(`--memcpy-mb`) float32 tensor in the trainer process, measured right before every timed sync (median),
since the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from prism_mcore.rollout.engine import EngineError, RolloutEngine, StagedUpdate, UpdateSummary
from prism_mcore.rollout.transport import prune_remote

HELP = "Megatron -> engine weight sync GB/s and its ratio to memcpy GB/s"


class HFTensorReceiver(RolloutEngine):
    """An engine without inference whose weights are HF-layout tensors owned by this process.

    Double-buffered: each bucket is copied into the shadow set as soon as it arrives (while the sender
    packs the next one), and commit swaps shadow and live, so a failed sync never touches live weights."""

    def __init__(self, engine_id: int, model_path: str, copy_threads: int = 0, **_: Any):
        from prism_mcore.rollout.vllm_engine import checkpoint_schema

        self.engine_id = engine_id
        schema = checkpoint_schema(model_path)

        def alloc():  # touched now (fill), so timed copies never pay first-touch page faults
            return {n: torch.empty(shape, dtype=getattr(torch, dtype)).fill_(0) for n, (shape, dtype) in schema.items()}

        self.params, self.shadow = alloc(), alloc()
        from prism_mcore.platform.host_copy import HostCopier

        self.copier = HostCopier(copy_threads)  # default: one thread per core of this machine
        self._staging = StagedUpdate(engine_id, schema)
        self._version = 0
        self.copy_s = self.receive_cpu_s = 0.0
        self._planned: dict[tuple[str, int], Any] = {}  # (plan key, id of the buffer) -> CopyPlan

    def receive_bucket(self, version, bucket):
        cpu0 = time.process_time()
        staged = self._staging.receive(version, self._version, bucket)
        t0 = time.perf_counter()
        # A sender's cached plan (RefBucket.key) always names the same views: its copy plan, one per
        # destination buffer, is made once. Older plans go (they keep trainer storages mapped).
        key = (getattr(bucket, "key", ""), id(self.shadow))
        plan = self._planned.get(key) if key[0] else None
        if plan is None:
            sources = bucket.sources() if hasattr(bucket, "sources") else bucket.open()
            # References come as their source views (the QKV split is strided), copied straight into the
            # HF-shaped destination viewed in the source's shape.
            plan = self.copier.plan([(self.shadow[name].view(t.shape), t) for name, t in sources])
            if key[0]:
                self._planned = {k: v for k, v in self._planned.items() if k[0] == key[0]}
                self._planned[key] = plan
        # Equal byte shares per core, one loop of streaming-store copies each (platform/host_copy.py): the actor
        # runs with one OpenMP thread (Ray sets OMP_NUM_THREADS=num_cpus), torch's per-tensor copies would leave
        # cores idle between tensors, and ordinary stores read every destination line before writing it.
        self.copier.run(plan)
        bucket.release()
        self.copy_s += time.perf_counter() - t0
        self.receive_cpu_s += time.process_time() - cpu0
        return staged

    def commit_update(self, version, expected_tensors, digest=False):
        buckets = self._staging.take(version, expected_tensors, self._version)
        nbytes = sum(e.nbytes for b in buckets for e in b.entries())
        self.params, self.shadow = self.shadow, self.params
        prune_remote(buckets)
        self._version = version
        extra = {"receive_copy_s": self.copy_s, "receive_cpu_s": self.receive_cpu_s}
        self.copy_s = self.receive_cpu_s = 0.0
        return UpdateSummary(version, expected_tensors, nbytes, 0.0, extra)

    def abort_update(self, version=None):
        self._staging.clear(version)

    def generate(self, prompts, params, expect_version=None):
        raise EngineError("HFTensorReceiver does not generate")

    def score(self, sequences):
        raise EngineError("HFTensorReceiver does not score")

    def sleep(self):
        pass

    def wake_up(self):
        pass

    def health(self):
        from prism_mcore.rollout.engine import EngineHealth

        return EngineHealth(self.engine_id, True, self._version, False, os.getpid(), self._staging.version)

    @property
    def weight_version(self):
        return self._version


class Memcpy:
    """Copy bandwidths of a pre-faulted 1 GiB float32 tensor in this process, back to back: memcpy (the
    reference: the faster of torch's `dst.copy_(src)` with its threads and an equal-shares libc memmove over
    every core) and, when prism_mcore._C is built, the equal-shares copy with streaming stores the receiver
    uses (platform/host_copy.py), which beats memcpy on large copies: the sync is reported against it too."""

    def __init__(self, nbytes: int = 2**30):
        from prism_mcore.platform.host_copy import HostCopier, streaming_extension

        self.src = torch.randn(nbytes // 4)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # fault in every page first
        self.nbytes = nbytes
        copiers = [HostCopier(streaming=False)] + ([HostCopier(streaming=True)] if streaming_extension() else [])
        self.plans = [(c, c.plan([(self.dst, self.src)])) for c in copiers]
        self.last: dict[str, float] = {}

    def gbps(self) -> float:
        t0 = time.perf_counter()
        self.dst.copy_(self.src)
        self.last = {"torch": self.nbytes / (time.perf_counter() - t0) / 1e9}
        for copier, plan in self.plans:
            t0 = time.perf_counter()
            copier.run(plan)
            self.last[copier.method] = self.nbytes / (time.perf_counter() - t0) / 1e9
        return max(v for k, v in self.last.items() if k != "stream")


def _timed_syncs(model, cfg, endpoints, first_version: int, reps: int, bucket_mb: float, transport: str,
                 memcpy: Memcpy) -> dict:
    """One warm-up sync, then `reps` timed ones, each right after a memcpy measurement (the machine may be
    shared, so both numbers are medians over the same stretch of time)."""
    import torch.distributed as dist

    from prism_mcore.rollout.weight_sync import sync_weights

    runs, copies, cpus, methods = [], [], [], []  # cpus: the trainer process's CPU seconds in each sync
    for i in range(reps + 1):
        with torch.no_grad():  # new weights every version, as after an optimizer step
            for p in model.parameters():
                p.add_(1e-3)
        gbps = memcpy.gbps() if memcpy else 0.0
        methods.append(dict(memcpy.last) if memcpy else {})
        dist.barrier()
        cpu0 = time.process_time()
        runs.append(sync_weights(model, cfg.model, endpoints, first_version + i, bucket_mb=bucket_mb,
                                 transport=transport))
        cpus.append(time.process_time() - cpu0)
        copies.append(gbps)
    timed, copies = runs[1:], copies[1:]
    med = lambda xs: statistics.median(list(xs))  # noqa: E731
    out = {"bytes": timed[0].bytes, "ref_bytes": timed[0].ref_bytes, "tensors": timed[0].tensors,
           "buckets": timed[0].buckets,
           "seconds": med(r.seconds for r in timed), "seconds_all": [r.seconds for r in timed],
           "stream_s": med(r.stream_s for r in timed), "convert_s": med(r.convert_s for r in timed),
           "pack_s": med(r.pack_s for r in timed),
           "send_s": med(r.send_s for r in timed), "commit_s": med(r.commit_s for r in timed),
           "receive_copy_s": med(next(iter(r.engines.values())).extra.get("receive_copy_s", 0.0) for r in timed),
           "receive_cpu_s": med(next(iter(r.engines.values())).extra.get("receive_cpu_s", 0.0) for r in timed),
           "trainer_cpu_s": med(cpus[1:]),
           "warmup_s": runs[0].seconds, "memcpy_gbps": med(copies), "memcpy_all": copies,
           "memcpy_torch_gbps": med(m.get("torch", 0.0) for m in methods[1:]),
           "memcpy_memmove_gbps": med(m.get("memmove", 0.0) for m in methods[1:]),
           "memcpy_stream_gbps": med(m.get("stream", 0.0) for m in methods[1:]),
           "load_avg_1m": os.getloadavg()[0]}  # the machine may be shared: how busy it was
    out["gbps"] = out["bytes"] / out["seconds"] / 1e9
    out["ratio_to_memcpy"] = out["gbps"] / out["memcpy_gbps"]
    out["ratio_to_stream_copy"] = out["gbps"] / out["memcpy_stream_gbps"] if out["memcpy_stream_gbps"] else None
    return out


def bench_rank(model_dir: str, tp: int, endpoints, reps: int, bucket_mb: float, transport: str,
               memcpy_mb: int = 1024) -> dict | None:
    """On every trainer rank: build the model at TP=tp; time syncs that copy every tensor through the
    staging buckets, then (after `share_weights_memory`) syncs that pass references where they can."""
    import torch.distributed as dist

    from prism_mcore.config import load_config
    from prism_mcore.models.qwen3.model import build_qwen3
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.rollout.weight_sync import share_weights_memory

    cfg = load_config(None, [f"model.hf_path={model_dir}", f"parallel.tp={tp}"])
    init_model_parallel(cfg)
    model = build_qwen3(cfg.model, cfg.parallel)
    memcpy = Memcpy(memcpy_mb * 2**20) if dist.get_rank() == 0 else None
    copy = _timed_syncs(model, cfg, endpoints, 1, reps, bucket_mb, transport, memcpy)
    share_weights_memory(model)
    zero = _timed_syncs(model, cfg, endpoints, reps + 2, reps, bucket_mb, transport, memcpy)
    return {"copy": copy, "zero_copy": zero} if dist.get_rank() == 0 else None


def write_config(out: str, vocab: int, hidden: int, layers: int, inter: int, heads: int, kv: int) -> int:
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                      max_position_embeddings=256, tie_word_embeddings=False, torch_dtype="float32",
                      architectures=["Qwen3ForCausalLM"])
    os.makedirs(out, exist_ok=True)
    cfg.to_json_file(os.path.join(out, "config.json"))
    per_layer = hidden * (hidden + 2 * kv * (hidden // heads)) + hidden * hidden + 3 * inter * hidden
    return 4 * (2 * vocab * hidden + layers * per_layer)


def run_engine(kind: str, model_dir: str, args, ray_mod) -> dict:
    from prism_mcore.config import load_config
    from prism_mcore.platform.multiproc import run_on_ranks
    from prism_mcore.rollout.engine_pool import EnginePool

    rollout = load_config(None, ["rollout.num_engines=1", "rollout.timeout_s=900"]).rollout
    if kind == "vllm":
        pool = EnginePool(model_dir, rollout, dict(dtype="float32", max_model_len=256, max_num_seqs=2,
                                                   kv_cache_bytes=64 << 20, load_format="dummy",
                                                   skip_tokenizer_init=True), namespace="bench_vllm")
    else:
        pool = EnginePool(model_dir, rollout, {"copy_threads": args.receiver_threads}, namespace="bench_recv",
                          engine_cls="prism_mcore.bench.weight_sync:HFTensorReceiver")
    try:
        pool.start()
        return run_on_ranks(bench_rank, args.tp, model_dir, args.tp, pool.endpoints, args.reps, args.bucket_mb,
                            args.transport, args.memcpy_mb, timeout=1800)[0]
    finally:
        pool.shutdown()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="prism bench weight-sync", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the result object as JSON")
    p.add_argument("--engine", choices=["receiver", "vllm", "both"], default="both",
                   help="receiving side (default both: receiver is the headline, vllm is reported beside it)")
    p.add_argument("--tp", type=int, default=1, help="trainer tensor-parallel ranks (1 or 2)")
    p.add_argument("--transport", choices=["shm", "ray", "torch_distributed"], default="shm",
                   help="zero-copy references exist only with shm; the other transports are reported in copy mode")
    p.add_argument("--bucket-mb", type=float, default=512, help="bucket size (rollout.weight_bucket_mb's default)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--receiver-threads", type=int, default=0, help="copy threads of the receiver (0: one per core)")
    p.add_argument("--memcpy-mb", type=int, default=1024, help="size of the memcpy reference copy")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    root = tempfile.mkdtemp(prefix="prism_wsb_", dir="/tmp")
    model_dir = os.path.join(root, "model")
    approx = write_config(model_dir, args.vocab, args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads)
    print(f"prism bench weight-sync: Qwen3 of ~{approx / 1e6:.0f} MB float32, tp={args.tp}, "
          f"{args.transport}, {args.bucket_mb:g} MB buckets", file=sys.stderr, flush=True)
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=max(256 * 2**20, 2 * approx),
             _temp_dir=os.path.join(root, "ray"), log_to_driver=False, configure_logging=False)
    try:
        kinds = ["receiver", "vllm"] if args.engine == "both" else [args.engine]
        results = {k: run_engine(k, model_dir, args, ray) for k in kinds}
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    mode = "zero_copy" if args.transport == "shm" else "copy"  # references cannot cross nodes
    head = results[kinds[0]][mode]
    out = {**{k: head[k] for k in ("bytes", "seconds", "gbps", "memcpy_gbps", "ratio_to_memcpy", "memcpy_stream_gbps",
                                   "ratio_to_stream_copy")},
           "engine": kinds[0], "mode": mode, "tp": args.tp, "transport": args.transport,
           "bucket_mb": args.bucket_mb, "detail": results}
    for kind, modes in results.items():
        for m, r in modes.items():
            print(f"  {kind:8s} {m:9s} {r['bytes'] / 1e6:7.1f} MB in {r['seconds']:.3f} s = {r['gbps']:5.2f} GB/s "
                  f"(pack {r['pack_s']:.3f} s, send {r['send_s']:.3f} s, commit {r['commit_s']:.3f} s); "
                  f"memcpy {r['memcpy_gbps']:.2f} GB/s (torch {r['memcpy_torch_gbps']:.1f}, memmove "
                  f"{r['memcpy_memmove_gbps']:.1f}); ratio {r['ratio_to_memcpy']:.2f}; streaming copy "
                  f"{r['memcpy_stream_gbps']:.1f} GB/s, ratio {r['ratio_to_stream_copy'] or 0:.2f}; "
                  f"load {r['load_avg_1m']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
