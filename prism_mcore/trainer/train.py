"""`prism train CONFIG [key=value ...]`: run one stage on this machine's ranks, or join a launcher's.

Under torchrun or srun (RANK/WORLD_SIZE or SLURM_PROCID set) every process runs its rank directly;
otherwise `parallel.world_size` ranks are spawned locally.
"""
from __future__ import annotations

import os

from prism_mcore.config import PrismConfig


def _stages():
    from prism_mcore.trainer.align import run_align
    from prism_mcore.trainer.disc_warmup import run_disc_warmup
    from prism_mcore.trainer.rl import run_rl
    from prism_mcore.trainer.sft import run_sft

    return {"sft": run_sft, "disc-warmup": run_disc_warmup, "align": run_align, "rl": run_rl}


def stage_main(cfg_tree: dict) -> dict:
    cfg = PrismConfig.model_validate(cfg_tree)
    stages = _stages()
    if cfg.trainer.stage not in stages:
        from prism_mcore.config import ConfigError

        raise ConfigError(f"config error: trainer.stage={cfg.trainer.stage!r} is not runnable by `prism train` yet "
                          f"(available: {', '.join(sorted(stages))})")
    return stages[cfg.trainer.stage](cfg)


def preflight(cfg: PrismConfig) -> None:
    """Input problems fail here, in one line, before any rank starts (`prism validate` runs this too): a stage
    `prism train` cannot run, a stage without its data, a missing or unusable data file, no HF checkpoint
    for a stage that starts engines from one. Bad rows are only counted (a warning per file)."""
    from pathlib import Path

    from prism_mcore.config import ConfigError
    from prism_mcore.data.errors import DataError

    stage = cfg.trainer.stage
    needs = {"sft": "a chat JSONL file", "disc-warmup": "a warm-up pairs JSONL file",
             "align": "an RL parquet file with teacher_caption/teacher_cot", "rl": "an RL parquet file"}
    if stage not in needs:
        raise ConfigError(f"config error: trainer.stage={stage!r} is not runnable by `prism train` (available: "
                          f"{', '.join(sorted(needs))}; the demo runs as `prism demo`)")
    if not cfg.data.train_files:
        raise DataError(f"data.train_files is empty: the {stage} stage needs {needs[stage]} "
                        f"(data.train_files=[PATH, ...])")
    for path in cfg.data.train_files + cfg.data.val_files:
        if not Path(path).is_file():
            raise DataError(f"{path}: no such file (data.train_files / data.val_files)")
    from prism_mcore.data.tokenizer import qwen3_tokenizer
    from prism_mcore.trainer.images import StageImages

    tokenizer = qwen3_tokenizer()
    images = StageImages.of(cfg, tokenizer)  # a Qwen3-VL run reads (and checks) the images too
    ip = images.processor if images is not None else None
    if stage == "sft":
        from prism_mcore.data.sft_dataset import load_chat_jsonl, tokenize_chats

        max_length = cfg.data.max_prompt_length + cfg.data.max_response_length
        for path in cfg.data.train_files:  # counts bad lines and conversations too long to train on
            tokenize_chats(load_chat_jsonl(path, images=ip)[0], tokenizer, max_length, source=str(path), images=ip)
    if stage in ("rl", "align"):
        from prism_mcore.data.rl_dataset import RLDataset

        if not cfg.model.hf_path:
            raise DataError(f"model.hf_path: the {stage} stage starts the rollout engines from an HF "
                            f"checkpoint")
        RLDataset(cfg.data.train_files, tokenizer, cfg.data.max_prompt_length, require_teacher=stage == "align",
                  images=ip)
        if cfg.data.val_files:
            RLDataset(cfg.data.val_files, tokenizer, cfg.data.max_prompt_length, images=ip)
    if stage == "disc-warmup":
        from prism_mcore.data.warmup_pairs import load_warmup_pairs

        for path in cfg.data.train_files:
            load_warmup_pairs(path, images=ip)


def train(cfg: PrismConfig) -> dict:
    """Preflight, the output directory's run lock, then the stage on this machine's ranks (or, under
    torchrun/srun, as this process's rank: rank 0 holds the lock and tells the others whether it got it)."""
    from prism_mcore.trainer.metrics import announce
    from prism_mcore.trainer.run_lock import RunLock

    preflight(cfg)
    check_output_dir(cfg)
    if "RANK" in os.environ or "SLURM_PROCID" in os.environ:
        return _train_as_rank(cfg)
    from prism_mcore.platform.multiproc import run_on_ranks

    p = cfg.parallel
    world = p.world_size or p.tp * p.pp * p.cp * (p.dp or 1)
    with RunLock(cfg.trainer.output_dir):
        announce(f"{cfg.trainer.stage}: starting {world} rank{'s' * (world > 1)} (tp={p.tp} pp={p.pp} ep={p.ep} "
                 f"dp={p.resolved_dp(world)}), output in {cfg.trainer.output_dir}")
        return run_on_ranks(stage_main, world, cfg.model_dump(),
                            timeout=float(os.environ.get("PRISM_TRAIN_TIMEOUT_S", 86400)))[0]


def _train_as_rank(cfg: PrismConfig) -> dict:
    import torch.distributed as dist

    from prism_mcore.config import ConfigError
    from prism_mcore.platform.distributed import destroy_distributed, init_distributed
    from prism_mcore.trainer.run_lock import RunLock

    init_distributed()
    lock = RunLock(cfg.trainer.output_dir)
    try:
        refusal = [None]
        if dist.get_rank() == 0:
            try:
                lock.acquire()
            except ConfigError as e:
                refusal = [str(e)]
        dist.broadcast_object_list(refusal, src=0)
        if refusal[0]:
            raise ConfigError(refusal[0])
        return stage_main(cfg.model_dump())
    finally:
        lock.release()
        destroy_distributed()


def check_output_dir(cfg: PrismConfig) -> None:
    """Before any rank starts: a checkpoint in trainer.output_dir that this run cannot resume (another stage,
    another model) is a one-line error. The ranks check again when they load it."""
    import json
    from pathlib import Path

    from prism_mcore.checkpoint.dist_ckpt import latest_checkpoint
    from prism_mcore.trainer.run import check_resumable

    path = latest_checkpoint(Path(cfg.trainer.output_dir) / "checkpoints")
    if path is not None:
        check_resumable(json.loads((path / "prism_meta.json").read_text()), cfg, path, warn=False)
