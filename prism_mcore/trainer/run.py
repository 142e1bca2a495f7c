"""What every training stage shares: building the policy, resuming safely, checkpointing, stopping on
SIGTERM or on non-finite steps, metrics, HF export."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from prism_mcore.config import ConfigError, PrismConfig
from prism_mcore.trainer.metrics import Metrics, announce, is_rank0, progress

if TYPE_CHECKING:
    from prism_mcore.trainer.step import Trainable


def build_policy(cfg: PrismConfig):
    """The local stage of the policy, of the family `cfg.model` describes (models/spec.py), initialized from
    `model.hf_path` when given (each rank reads only its own slices), with the fused log-prob head."""
    from prism_mcore.models.qwen3.logprob_head import use_fused_logprob_head
    from prism_mcore.models.spec import resolve

    spec, arch = resolve(cfg.model)
    if is_rank0():
        m = spec.text_config(arch)
        announce(f"building the {spec.name} policy ({m.num_hidden_layers} layers, hidden {m.hidden_size}"
                 f"{f', {m.num_experts} experts' if m.is_moe else ''}{', from ' + cfg.model.hf_path if cfg.model.hf_path else ''})")
    policy = spec.build(arch, cfg.parallel)
    if cfg.model.hf_path:
        load_hf_weights(policy, cfg)
    use_fused_logprob_head(policy)
    return policy


def load_hf_weights(net, cfg: PrismConfig, kind: str = "policy") -> None:
    from prism_mcore.checkpoint.hf_weights import load_hf
    from prism_mcore.models.spec import resolve

    spec, arch = resolve(cfg.model)
    load_hf(net, spec, arch, cfg.model.hf_path, kind)


class StageError(RuntimeError):
    """A run that stops for a reason meant for the user: one line, exit code 1, the checkpoints intact."""

    exit_code = 1


# Architecture fields that must match between a checkpoint and the run resuming it.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "tie_word_embeddings")
# Settings a resumed run may change without a warning (how long and how it reports, not what it trains).
RUN_LENGTH_KEYS = ("trainer.steps", "trainer.save_interval", "trainer.keep_checkpoints", "trainer.log_interval",
                   "trainer.eval_interval", "trainer.eval_max_prompts", "trainer.eval_at_start",
                   "trainer.output_dir", "trainer.max_bad_steps", "trainer.export_hf", "rollout.timeout_s")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "megatron":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint(cfg: PrismConfig) -> dict:
    """What identifies a run's training: every setting except those in RUN_LENGTH_KEYS."""
    return {k: v for k, v in _flat(cfg.model_dump(mode="json")).items() if k not in RUN_LENGTH_KEYS}


class Checkpointer:
    """`ROOT/checkpoints/step_*` every `interval` steps; resume from the newest complete, loadable one that
    belongs to this run. `parts` names the trained models ({"": one model} for single-model stages; align
    saves policy and discriminator together, so a crash never leaves them at different steps)."""

    def __init__(self, output_dir: str | Path, interval: int, keep: int = 0):
        self.root = Path(output_dir) / "checkpoints"
        self.interval, self.keep = interval, keep

    @staticmethod
    def _parts(parts: dict[str, Trainable]) -> dict:
        return {name: ([t.ddp], t.optimizer) for name, t in parts.items()}

    def resume(self, parts: dict[str, Trainable], cfg: PrismConfig) -> dict | None:
        """Collective. The newest checkpoint that passes the file checks (a corrupt `latest`, a truncated
        shard or a broken prism_meta.json falls back to the step before, with a warning), checked against
        this run (another stage or another model shape: ConfigError) and loaded."""
        from prism_mcore.checkpoint.dist_ckpt import latest_checkpoint, load_checkpoint, newest_loadable

        _, skipped = newest_loadable(self.root)
        if is_rank0():
            for bad, why in skipped:
                announce(f"warning: skipping checkpoint {bad}: {why}")
        path = latest_checkpoint(self.root)  # none usable among several: a one-line error, not a fresh start
        if path is None:
            return None
        import json

        meta = json.loads((path / "prism_meta.json").read_text())
        check_resumable(meta, cfg, path)
        meta = load_checkpoint(path, parts=self._parts(parts))
        meta["path"] = str(path)
        return meta

    def save(self, step: int, parts: dict[str, Trainable], meta: dict) -> Path:
        from prism_mcore.checkpoint.dist_ckpt import save_checkpoint

        return save_checkpoint(self.root, step, parts=self._parts(parts), meta=meta, keep=self.keep)

    def due(self, step: int) -> bool:
        return bool(self.interval and step % self.interval == 0)


def check_resumable(meta: dict, cfg: PrismConfig, path: Path, warn: bool = True) -> None:
    """A checkpoint of another stage or model shape is refused in one line; other changed settings are named
    in a warning (a run may change, e.g., its learning rate on resume; it should know it did)."""
    where = f"{path}"
    if meta.get("stage") != cfg.trainer.stage:
        raise ConfigError(f"{where}: holds a {meta.get('stage')!r} checkpoint; this run is stage {cfg.trainer.stage!r} "
                          f"(trainer.output_dir belongs to another stage's run: choose another directory)")
    saved = meta.get("model", {})
    for key in SHAPE_FIELDS:
        if key in saved and saved[key] != getattr(cfg.model, key):
            raise ConfigError(f"{where}: its model has {key}={saved[key]}, this run's model.{key}="
                              f"{getattr(cfg.model, key)} (another model's run: choose another trainer.output_dir)")
    before = meta.get("fingerprint")
    if before is not None and warn and is_rank0():
        now = fingerprint(cfg)
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
            announce(f"warning: resuming with settings changed since the checkpoint ({shown}"
                     f"{', ...' if len(changed) > 5 else ''})")


class StopRequest:
    """SIGTERM (what SLURM sends before preemption, what the launcher forwards) asks the run to stop after the
    current step, with a checkpoint. The handler only records it; `agreed` makes every rank stop at the same
    step (a one-element all-reduce per step)."""

    def __init__(self):
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._record)

    def _record(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


class StageRun:
    """The bookkeeping every stage loop shares: resume from the latest checkpoint, then per step log metrics
    (JSONL + TensorBoard), checkpoint every `save_interval` steps and at the end, stop after
    `trainer.max_bad_steps` non-finite steps in a row or on SIGTERM, advance the progress bar. `start` is the
    first step to run; `resumed` the checkpoint's metadata (or None)."""

    def __init__(self, cfg: PrismConfig, parts: dict[str, Trainable]):
        self.cfg, self.parts = cfg, parts
        self.stage, self.steps_total = cfg.trainer.stage, cfg.trainer.steps
        self.ckpt = Checkpointer(cfg.trainer.output_dir, cfg.trainer.save_interval, cfg.trainer.keep_checkpoints)
        self.stop = StopRequest()
        self.resumed = self.ckpt.resume(parts, cfg)
        self.start = self.resumed["step"] if self.resumed else 0
        if self.resumed and is_rank0():
            announce(f"{self.stage}: resuming from step {self.start} of {self.steps_total} ({self.resumed['path']})")
        self.last_saved = self.start if self.resumed else None
        self.bad_in_row = self.bad_total = 0
        self.metrics = Metrics(cfg.trainer.output_dir, self.stage, resume_step=self.start)
        self.bar = progress(self.steps_total, self.stage, self.start)

    def steps(self) -> range:
        return range(self.start, self.steps_total)

    def _meta(self, meta: dict | None) -> dict:
        return {"stage": self.stage, "model": self.cfg.model.model_dump(), "fingerprint": fingerprint(self.cfg),
                **(meta or {})}

    def end_step(self, step: int, values: dict, meta: dict | None = None, summary: str = "", bad: bool = False) -> None:
        """After step `step` (0-based): log as step+1, checkpoint, show `summary` on the bar. `bad`: the step's
        loss or gradient norm was not finite (its update was skipped; it is not checkpointed)."""
        done = step + 1
        self.bad_total += bool(bad)
        self.bad_in_row = self.bad_in_row + 1 if bad else 0
        if done % self.cfg.trainer.log_interval == 0 or done == self.steps_total or bad:
            self.metrics.log(done, {**values, "nonfinite_steps": self.bad_total})
        if not bad and (self.ckpt.due(done) or done == self.steps_total):
            self.ckpt.save(done, self.parts, self._meta(meta))
            self.last_saved = done
        if self.bad_in_row >= self.cfg.trainer.max_bad_steps:
            raise StageError(f"{self.stage}: {self.bad_in_row} steps in a row (to step {done}) had a non-finite loss "
                             f"or gradient norm; stopped (trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}), "
                             f"last good checkpoint: {self._last_checkpoint()}")
        if self.stop.agreed():
            if self.last_saved != done and not bad:
                self.ckpt.save(done, self.parts, self._meta(meta))
                self.last_saved = done
            raise StageError(f"{self.stage}: stopped by SIGTERM after step {done} of {self.steps_total}; checkpoint: "
                             f"{self._last_checkpoint()}; run the same command to resume")
        if self.bar:
            self.bar.update(self.bar.task_ids[0], advance=1, description=f"{self.stage} {summary}".strip())

    def _last_checkpoint(self) -> str:
        from prism_mcore.checkpoint.dist_ckpt import step_dir

        return str(step_dir(self.ckpt.root, self.last_saved)) if self.last_saved else "none"

    def log(self, step: int, values: dict) -> None:
        self.metrics.log(step, values)

    def close(self) -> None:
        self.stop.restore()
        if self.bar:
            self.bar.stop()
        self.metrics.close()

    def finished(self, exported: list[str] = ()) -> None:
        """Rank 0 says where the outputs went."""
        if is_rank0():
            out = Path(self.cfg.trainer.output_dir)
            extra = "".join(f", {Path(e).relative_to(out) if Path(e).is_relative_to(out) else e}/" for e in exported)
            announce(f"{self.stage}: done, {self.steps_total} steps; outputs in {out} (metrics.jsonl, tb/, "
                     f"checkpoints/{extra})")


def export_hf(net, cfg: PrismConfig, out_dir: str | Path, kind: str = "policy") -> None:
    """Collective: write the trained model as an HF checkpoint (tokenizer and generation config included). The
    run's own export directory is replaced (atomically, once the new one is complete)."""
    from prism_mcore.checkpoint.convert import write_hf
    from prism_mcore.checkpoint.hf_io import side_files

    write_hf(net, cfg.model, kind, out_dir, side_files(cfg.model.hf_path) if cfg.model.hf_path else [],
             overwrite=True)
