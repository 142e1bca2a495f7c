"""Weight sync: Megatron's training layout (TP/PP/EP shards over ranks) -> HF-named tensors -> engines.

Called collectively by every trainer rank after an optimizer step:

    stats = sync_weights(model, cfg.model, endpoints, version=step + 1, bucket_mb=cfg.rollout.weight_bucket_mb)

Steps 1 and 2 up to the HF tensors live in sync_plan.py; packing and delivery (transport.py, transport_dist.py),
commit and probe here.
1. Plan (one metadata all-gather): every Megatron tensor is cut into units of one layer (and the
   non-layered tensors); each unit gets one *sender*, a rank that holds a piece of it, rotating over the
   holders so TP ranks share the work and each PP stage sends its own layers.
2. Stream: units are processed in the same order on every rank. Holders send their pieces of a unit to its
   sender (point-to-point, tensors only); the sender assembles the unit (a unit it holds whole is used
   in place), converts it with `hf_tensors` and adds the HF tensors to its bucket. Full buckets go to
   every engine as staged (uncommitted) data. A rank never holds more than one bucket plus one unit.
3. Commit: once every sender is done, rank 0 asks each engine to commit the version; an engine commits
   only a complete update, so a sync that fails anywhere leaves every engine on its previous version.
4. Optional probe: engines score a fixed batch; a log-prob mismatch with the trainer raises.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from prism_mcore.rollout.probe import Probe, check_probe
from prism_mcore.rollout.sync_plan import (_cached_plan, _iter_sources, iter_hf_tensors,  # noqa: F401 (re-export)
                                           own_refs)
from prism_mcore.rollout.transport import BucketPacker, arena, sender_tag

log = logging.getLogger("prism.rollout")


class WeightSyncError(RuntimeError):
    """A sync failed; every engine that did not commit still serves its previous version."""


@dataclass
class EngineEndpoints:
    """Enough to reach the engine actors from any process of the Ray cluster (picklable)."""
    address: str | None
    namespace: str
    names: list[str]
    node_ids: list[str] = field(default_factory=list)
    pool_id: str = ""  # one per EnginePool instance: actor handles are cached per pool, not per name
    # This process's state for these engines, never pickled: the actor handles (each lookup is a GCS round
    # trip; a handle stays valid across Ray's restarts of its actor) and the torch_distributed weight groups.
    _actors: list | None = field(default=None, init=False, repr=False, compare=False)
    _senders: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_actors": None, "_senders": {}}

    def connect(self) -> list:
        """Handles of the engine actors (looked up once per endpoints object and process)."""
        import ray

        from prism_mcore.rollout.cluster import join

        if not ray.is_initialized():
            join(self.address, self.namespace)
        if not self.pool_id or self._actors is None:
            self._actors = [ray.get_actor(n, namespace=self.namespace) for n in self.names]
        return self._actors

    def routes_for_here(self, transport: str = "auto") -> list[tuple[str, list[int]]]:
        """How this process reaches each engine, as (transport, engine indices) pairs: `transport` for every
        engine, or (auto) shm for the engines on this node (buffers are mapped, not copied) and
        torch_distributed for the others (one broadcast per bucket, gloo on CPU / NCCL on GPU; the object
        store would copy each bucket into Ray's store and again out of it on every engine's node). Keeping
        same-node engines out of the broadcast group also keeps a colocated engine, on its trainer rank's
        GPU, out of an NCCL group with that rank."""
        import ray

        everyone = list(range(len(self.names)))
        if transport != "auto":
            return [(transport, everyone)]
        if not self.node_ids:
            return [("torch_distributed", everyone)]
        here = ray.get_runtime_context().get_node_id()
        local = [i for i in everyone if self.node_ids[i] == here]
        away = [i for i in everyone if self.node_ids[i] != here]
        return [(t, ids) for t, ids in (("shm", local), ("torch_distributed", away)) if ids]


@dataclass
class SyncStats:
    version: int
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    ref_bytes: int = 0  # of `bytes`, sent as references into shared trainer memory (share_weights_memory)
    planned_ranks: int = 0  # ranks that sent only their cached plan's references (sync_plan.own_refs)
    seconds: float = 0.0
    stream_s: float = 0.0  # gather + convert + pack + deliver (rank 0)
    convert_s: float = 0.0  # of which gathering pieces and converting to HF tensors (rank 0)
    pack_s: float = 0.0  # of which copying into buckets (rank 0)
    send_s: float = 0.0  # of which handing buckets to the engines and waiting for them (rank 0)
    commit_s: float = 0.0
    probe_error: float | None = None  # None: no probe ran in this sync
    transport: str = ""
    engines: dict[str, Any] = field(default_factory=dict)  # engine name -> UpdateSummary (rank 0)


# ---- sync -------------------------------------------------------------------------------------------

def share_weights_memory(model: torch.nn.Module) -> int:
    """Opt-in zero-copy sending (same node, shm transport): move this rank's parameters to named shared
    memory in place, once, after the model and optimizer are built (DDP buffers included). From then on
    every HF tensor that is a view of a parameter (whole on this rank: TP=1 layers, a PP stage's layers,
    an EP rank's experts; also strided views such as the QKV split) is sent as a reference and read by the
    engines straight from trainer memory; tensors assembled from TP pieces still go through the staging
    buckets. A rank with nothing to assemble sends its cached references in one message per engine
    (sync_plan.own_refs). Returns bytes moved."""
    from prism_mcore.rollout.transport import share_in_place

    return share_in_place(p for p in model.parameters())


def _wait(refs: list, names: list[str], what: str, timeout_s: float, step: int | None) -> list:
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    deadline = time.monotonic() + timeout_s
    out = []
    for name, ref in zip(names, refs):
        try:
            out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
        except GetTimeoutError:
            raise WeightSyncError(f"engine {name}, step {step}: {what} timed out after {timeout_s:.0f}s") from None
        except RayError as e:
            raise WeightSyncError(f"engine {name}, step {step}: {what} failed: {str(e).splitlines()[-1]}") from e
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Sync work is copies, which one thread already runs at memory speed; multi-threaded copies of a few
    MB mostly wait in OpenMP barriers for a second core that other processes (engines) are using."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def probe_due(version: int, probe_every: int) -> bool:
    """Whether the sync of `version` runs the log-prob probe (`rollout.probe_every`; 0 = never). Decided by
    the version alone, so every rank (and a resumed run) agrees without communicating."""
    return probe_every > 0 and version % probe_every == 0


@dataclass
class _Options:
    bucket_mb: float
    transport: str
    timeout_s: float
    zero_copy: bool
    probe_every: int


def _options(rollout_cfg, probe, **explicit) -> _Options:
    """Explicit keywords win over `rollout_cfg` (a RolloutConfig), which wins over the defaults. Without a
    config an explicitly passed probe runs on every sync, as before `probe_every` existed."""
    defaults = dict(bucket_mb=512, transport="auto", timeout_s=600.0, zero_copy=False,
                    probe_every=1 if probe is not None else 0)
    from_cfg = {} if rollout_cfg is None else dict(
        bucket_mb=rollout_cfg.weight_bucket_mb, transport=rollout_cfg.transport, timeout_s=rollout_cfg.timeout_s,
        zero_copy=rollout_cfg.zero_copy, probe_every=rollout_cfg.probe_every)
    opts = _Options(**{k: explicit[k] if explicit.get(k) is not None else from_cfg.get(k, d)
                       for k, d in defaults.items()})
    if opts.transport not in ("auto", "shm", "ray", "torch_distributed"):
        raise ValueError(f"unknown weight transport {opts.transport!r} (auto, shm, ray or torch_distributed)")
    return opts


def _no_torch_function():
    """The streaming loop runs thousands of view/copy ops of our own; on CPU machines the process-wide
    TorchFunctionMode of `platform/cpu_compat.py` (cuda -> cpu device rewriting) costs ~10 us on each
    (~50 ms per sync of a 640 MB model). None of those ops names a device, so the loop runs without it."""
    from torch.overrides import _get_current_function_mode_stack

    return torch._C.DisableTorchFunction() if _get_current_function_mode_stack() else contextlib.nullcontext()


def sync_weights(model: torch.nn.Module, model_cfg, endpoints: EngineEndpoints, version: int,
                 bucket_mb: float | None = None, transport: str | None = None, timeout_s: float | None = None,
                 step: int | None = None, probe: Probe | Callable[[], Probe] | None = None, digest: bool = False,
                 keep_staging: bool = True, rollout_cfg=None, zero_copy: bool | None = None,
                 probe_every: int | None = None) -> SyncStats:
    """Push the model's current weights to every engine as `version` (collective over all trainer ranks).

    `model` is the bare Megatron model (e.g. `ddp.module`). Settings come from the keywords, else from
    `rollout_cfg` (the run's `cfg.rollout`: weight_bucket_mb, transport, timeout_s, zero_copy, probe_every),
    else the defaults (512 MB, auto, 600 s, no zero-copy). (`rollout.max_staleness` is the pool's business:
    `EnginePool.generate` samples only from engines inside the window and checks every result.)
      * `transport`: auto (per engine: shm on this node, torch_distributed to the others), shm, ray,
        torch_distributed.
      * `zero_copy`: move the parameters to shared memory once (`share_weights_memory`) and send views of
        them as references (shm only).
      * `probe`: a Probe, or a callable that makes one (called collectively, only on syncs that probe);
        runs when `probe_due(version, probe_every)` (no config: on every sync).
    With the shm transport each sender packs into staging slots in /dev/shm that are reused by the next sync
    (`keep_staging=False` frees them after this one). Raises WeightSyncError (or LogprobMismatch from the
    probe) on every rank if anything failed."""
    opts = _options(rollout_cfg, probe, bucket_mb=bucket_mb, transport=transport, timeout_s=timeout_s,
                    zero_copy=zero_copy, probe_every=probe_every)
    if opts.zero_copy and opts.transport in ("ray", "torch_distributed"):
        raise ValueError(f"zero_copy needs the shm transport (same node), not {opts.transport}")
    if opts.zero_copy:
        share_weights_memory(model)  # once: storages already shared are skipped
    if probe is not None and not probe_due(version, opts.probe_every):
        probe = None
    elif callable(probe) and not isinstance(probe, Probe):
        probe = probe()  # collective on the trainer side (a forward pass), on every rank alike
    with _one_thread():
        return _sync(model, model_cfg, endpoints, version, opts, step, probe, digest, keep_staging)


def _dist_sender(endpoints: EngineEndpoints, tag: str, actors: list, names: list[str], timeout_s: float,
                 step: int | None):
    """This rank's weight group with the engines `actors` (named `names`; torch_distributed transport), built
    once per endpoints object and reused while every engine is still a member; rebuilt after an engine
    restart or a failed broadcast."""
    from prism_mcore.rollout.transport_dist import (DistSender, drop_group, finish_sender_group, has_group,
                                               open_sender_group)

    senders, slot = endpoints._senders, (tag, tuple(names))  # one group per route's engines
    cached = senders.get(slot)
    if cached is not None:
        spec, sender = cached
        if has_group(spec.key) and all(_wait([a.has_weight_group.remote(spec.key) for a in actors], names,
                                             "weight group check", timeout_s, step)):
            return sender
        drop_group(spec.key)
        del senders[slot]
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    spec, store = open_sender_group(tag, len(actors), backend, timeout_s)
    joins = [a.join_weight_group.remote(spec, i + 1) for i, a in enumerate(actors)]
    pg = finish_sender_group(spec, store)
    _wait(joins, names, f"joining weight group {spec.key}", timeout_s, step)
    sender = DistSender(spec.key, pg, f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu")
    senders[slot] = (spec, sender)
    return sender


def _sync(model, model_cfg, endpoints, version, opts: _Options, step, probe, digest, keep_staging) -> SyncStats:
    t0 = time.perf_counter()
    me = dist.get_rank()
    stats = SyncStats(version)
    actors, error, routes = [], None, []
    # stable per (run, rank, process): the next sync reuses slots and groups; never another run's
    tag = sender_tag(endpoints.namespace, me)
    timeout_s = opts.timeout_s
    inflight: list[tuple[list, list[str]]] = []

    def deliver_to(engines: list[int]) -> Callable[[Any], None]:
        names = [endpoints.names[i] for i in engines]

        def deliver(bucket) -> None:
            # At most two buckets in flight per route: engines take one while the next is packed, and a
            # rejected bucket or a dead engine stops the sync within a bucket or two.
            while len(inflight) >= 2 * len(routes):
                refs, who = inflight.pop(0)
                _wait(refs, who, f"receiving a bucket of version {version}", timeout_s, step)
            inflight.append(([actors[i].receive_bucket.remote(version, bucket) for i in engines], names))
        return deliver

    try:
        actors = endpoints.connect()
        for transport, engines in endpoints.routes_for_here(opts.transport):
            sender = None
            if transport == "torch_distributed":
                sender = _dist_sender(endpoints, tag, [actors[i] for i in engines],
                                      [endpoints.names[i] for i in engines], timeout_s, step)
            routes.append(BucketPacker(deliver_to(engines), int(opts.bucket_mb * 2**20), transport, tag=tag,
                                       dist_sender=sender))
    except Exception as e:  # noqa: BLE001 - reported collectively below
        error, routes = f"rank {me}: cannot reach the engines: {e}", []
    stats.transport = "+".join(p.transport for p in routes) or opts.transport
    # Keep draining the collective even after a local failure, or the other ranks would wait forever.
    t_loop = time.perf_counter()
    plan = _cached_plan(model, model_cfg)
    # Steady state of zero-copy (shm only, shared parameters, nothing to assemble on this rank): the cached
    # references go to every engine in one message and this rank only waits while the engines copy.
    refs = own_refs(model_cfg, plan) if [p.transport for p in routes] == ["shm"] else None
    with _no_torch_function():
        if refs is not None and error is None:
            try:
                routes[0].add_refs(*refs)
            except Exception as e:  # noqa: BLE001
                error = f"rank {me}: {e}"
        for name, tensor in () if refs is not None else _iter_sources(model_cfg, plan.mine, plan.units):
            if error is None:
                try:
                    for packer in routes:
                        packer.add(name, tensor)
                except Exception as e:  # noqa: BLE001
                    error = f"rank {me}: {e}"
    if error is None:
        try:
            for packer in routes:
                packer.flush()
            while inflight:
                refs_, who = inflight.pop(0)
                _wait(refs_, who, f"receiving the last buckets of version {version}", timeout_s, step)
        except Exception as e:  # noqa: BLE001
            error = f"rank {me}: {e}"
    pack_s, send_s = sum(p.pack_s for p in routes), sum(p.send_s for p in routes)
    stats.stream_s, stats.pack_s, stats.send_s = time.perf_counter() - t0, pack_s, send_s
    stats.convert_s = time.perf_counter() - t_loop - pack_s - send_s
    for packer in routes:
        packer.cleanup()  # also waits for broadcasts still in flight, so the group stays usable
    # tensors and bytes once per rank (every route carries the same ones), buckets over all routes
    first = routes[0] if routes else None
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (error, first.tensors if first else 0, first.bytes if first else 0,
                                     sum(p.buckets for p in routes), sum(p.ref_bytes for p in routes),
                                     int(refs is not None)))
    errors = [r[0] for r in reports if r[0]]
    stats.tensors, stats.bytes, stats.buckets, stats.ref_bytes, stats.planned_ranks = (
        sum(r[i] for r in reports) for i in (1, 2, 3, 4, 5))

    outcome: list = [None]
    if me == 0:
        outcome[0] = _finish(actors, endpoints, version, stats, errors, timeout_s, step, probe, digest)
    dist.broadcast_object_list(outcome, src=0)
    if not keep_staging:
        arena(tag).release()
    failure, summaries, probe_error, commit_s = outcome[0]
    stats.engines, stats.probe_error, stats.commit_s = summaries, probe_error, commit_s
    stats.seconds = time.perf_counter() - t0
    if failure:
        raise failure
    log.info("weight sync v%d: %d tensors, %.1f MB in %d buckets, %.2fs (%s)", version, stats.tensors,
             stats.bytes / 1e6, stats.buckets, stats.seconds, stats.transport)
    return stats


def _finish(actors, endpoints, version, stats, errors, timeout_s, step, probe, digest):
    """Rank 0: commit everywhere (or abort everywhere), then probe. Returns (exception or None, summaries,
    probe error, commit seconds)."""
    if errors:
        try:  # staged buckets are dropped anyway by the next version; waiting makes the outcome observable
            _wait([a.abort_update.remote(version) for a in actors], endpoints.names, "abort", timeout_s, step)
        except WeightSyncError as e:
            errors.append(str(e))
        return WeightSyncError(f"step {step}: sync of version {version} failed, engines keep their previous "
                               f"version: " + "; ".join(errors)), {}, None, 0.0
    t = time.perf_counter()
    try:
        refs = [a.commit_update.remote(version, stats.tensors, digest) for a in actors]
        done = _wait(refs, endpoints.names, f"commit of version {version}", timeout_s, step)
    except WeightSyncError as e:
        return e, {}, None, 0.0
    commit_s = time.perf_counter() - t
    summaries = dict(zip(endpoints.names, done))
    if probe is None:
        return None, summaries, None, commit_s
    try:
        refs = [a.score.remote(probe.sequences) for a in actors]
        scored = _wait(refs, endpoints.names, "probe scoring", timeout_s, step)
        worst = max(check_probe(lp, probe, name, version, step) for name, lp in zip(endpoints.names, scored))
    except Exception as e:  # noqa: BLE001 - LogprobMismatch or an engine failure, raised on every rank
        return e, summaries, None, commit_s
    return None, summaries, worst, commit_s
