"""The embedded CPU demo (`make demo`): the whole PRISM recipe on a tiny Qwen3-VL policy, from nothing
(`--text`: the same on a tiny text Qwen3 and the text task).

  data     the synthetic visual task (PIL scenes whose answer needs the image: counts, colours, digits,
           positions), teacher demonstrations whose caption describes the image, warm-up pairs, RL and
           held-out sets, and the held-out set's image-blind twin (blank images)
  init     the starting policy: random language model, vision tower pretrained on the task's scenes
           (trainer/demo_tower.py; stands in for Qwen3-VL's pretrained tower, frozen from here on)
  sft      tiny policy (real Qwen3 vocabulary) <- teacher demonstrations             TP2
  warm-up  SFT policy --upcycle--> 4-expert MoE discriminator, pairwise Bradley-Terry  TP2 + SP
  align    PRISM: policy vs discriminator, rollouts from a vLLM engine              TP2 + TP2/SP
  grpo     verifiable reward, from the aligned policy          (PRISM arm)
  baseline verifiable reward, from the SFT policy, align + grpo steps (same budget)
Each stage is one `prism train` run of `configs/demo_vl/<stage>.yaml` (`configs/demo/` for --text); a stage
whose output is complete is skipped on a re-run. The report (table + PNG) is built from the stages'
metrics.jsonl files; for the visual task it adds perception (caption) accuracy and the image-blind level.
"""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from prism_mcore.trainer.demo_tower import TowerPretraining

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class DemoPlan:
    out: Path
    text: bool = False  # the text task on a text Qwen3 (the demo before images)
    # One demonstration per SFT sample (1,000 steps x 8): repeats teach a tiny model little (6,400
    # samples drawn from 2,000 problems reach about half the accuracy of 6,000 problems; docs/pipeline.md)
    num_sft: int = 8000
    num_pairs: int = 1024  # one warm-up pass (64 steps x 16): unique pairs, as for SFT
    num_rl: int = 512
    num_val: int = 128  # 64 held-out prompts left the constant-answer floor at an unlucky 12.5%
    difficulties: tuple[int, ...] = (0, 1)  # equal shares; 0 = one arithmetic step, 1 = two or three
    # "STAGE.key=value" overrides (STAGE: sft, disc_warmup, align, grpo, baseline, or all)
    overrides: list[str] = field(default_factory=list)
    tower: TowerPretraining = field(default_factory=TowerPretraining)  # the visual policy's starting tower

    @property
    def config_dir(self) -> Path:
        return CONFIGS / ("demo" if self.text else "demo_vl")

    def stage_overrides(self, stage: str) -> list[str]:
        picked = []
        for o in self.overrides:
            head, _, rest = o.partition(".")
            inherited = head == "grpo" and stage == "baseline" and not rest.startswith("trainer.steps=")
            if head in (stage, "all") or inherited:  # the baseline's steps are align + grpo steps
                picked.append(rest)
        return picked


def write_data(plan: DemoPlan) -> dict[str, Path]:
    """Disjoint seeds: the held-out problems are never trained on (identical questions can still recur,
    the task has a finite number of them). The visual task's held-out set has an image-blind twin."""
    if plan.text:
        from prism_mcore.data import synthetic as task
        from prism_mcore.data.synthetic import write_rl_parquet, write_sft_jsonl, write_warmup_jsonl
    else:
        from prism_mcore.data import visual_task as task
        from prism_mcore.data.visual_writers import write_rl_parquet, write_sft_jsonl, write_warmup_jsonl

    def problems(n: int, seed: int):
        """Equal shares of each difficulty, interleaved."""
        share = -(-n // len(plan.difficulties))
        per_level = [task.make_problems(share, seed, level) for level in plan.difficulties]
        return [p for group in zip(*per_level) for p in group][:n]

    d = plan.out / "data"
    files = {"sft": d / "sft.jsonl", "pairs": d / "warmup_pairwise.jsonl", "rl": d / "rl.parquet",
             "val": d / "val.parquet"}
    if not plan.text:
        files["val_blind"] = d / "val_blind.parquet"
    if all(f.exists() for f in files.values()):
        return files
    write_sft_jsonl(problems(plan.num_sft, seed=10), files["sft"])
    write_warmup_jsonl(problems(plan.num_pairs, seed=11), files["pairs"], seed=12)
    write_rl_parquet(problems(plan.num_rl, seed=13), files["rl"])
    if plan.text:
        write_rl_parquet(problems(plan.num_val, seed=99), files["val"], with_teacher=False)
    else:
        from prism_mcore.data.visual_writers import write_heldout

        write_heldout(problems(plan.num_val, seed=99), files["val"])  # and val_blind.parquet beside it
    return files


def _stage(plan: DemoPlan, name: str, config: str, overrides: list[str], console) -> Path:
    """One `prism train` run in OUT/<name>; skipped when its HF export already exists."""
    from prism_mcore.config import load_config
    from prism_mcore.trainer.train import train

    out = plan.out / name
    if (out / "hf" / "config.json").exists():
        console.print(f"[dim]{name}: done already ({out / 'hf'})[/dim]")
        return out
    args = [f"trainer.output_dir={out}", *overrides, *plan.stage_overrides(name)]
    cfg = load_config(plan.config_dir / config, args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(shlex.join(["prism", "train", str(plan.config_dir / config), *args]) + "\n")
    console.rule(f"{name}: {cfg.trainer.stage}, {cfg.trainer.steps} steps")
    t0 = time.monotonic()
    train(cfg)
    (out / "stage_seconds.json").write_text(json.dumps({"seconds": time.monotonic() - t0}))
    return out


def _initial_policy(plan: DemoPlan, console) -> Path:
    """OUT/init: the visual policy SFT starts from (random language model, pretrained tower); kept on a re-run."""
    from prism_mcore.config import load_config
    from prism_mcore.trainer.demo_tower import write_initial_policy

    init = plan.out / "init"
    if (init / "config.json").exists():
        console.print(f"[dim]init: done already ({init})[/dim]")
        return init
    cfg = load_config(plan.config_dir / "sft.yaml", plan.stage_overrides("sft"))
    console.rule(f"init: vision tower pretraining on the task's scenes, {plan.tower.steps} steps")
    t0 = time.monotonic()
    result = write_initial_policy(cfg.model, init, plan.tower, plan.difficulties, console)
    (plan.out / "vision" / "stage_seconds.json").write_text(json.dumps({"seconds": time.monotonic() - t0}))
    console.print("vision tower, held-out scenes: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return init


def run_pipeline(plan: DemoPlan) -> dict:
    from rich.console import Console

    from prism_mcore.models.upcycle import upcycle
    from prism_mcore.trainer.report import build_report

    console = Console()
    t0 = time.monotonic()
    files = write_data(plan)
    val_files = [files["val"]] + ([files["val_blind"]] if "val_blind" in files else [])
    val = [f"data.val_files=[{','.join(map(str, val_files))}]"]
    sft_args = [f"data.train_files=[{files['sft']}]"]
    if not plan.text:
        sft_args.append(f"model.hf_path={_initial_policy(plan, console)}")
    sft = _stage(plan, "sft", "sft.yaml", sft_args, console)
    disc_init = plan.out / "disc_init"
    if not (disc_init / "config.json").exists():
        upcycle(sft / "hf", disc_init, num_experts=4, top_k=2, noise_std=0.01, seed=0, overwrite=True)
    warm = _stage(plan, "disc_warmup", "disc_warmup.yaml",
                  [f"model.hf_path={disc_init}", f"data.train_files=[{files['pairs']}]"], console)
    align = _stage(plan, "align", "align.yaml",
                   [f"model.hf_path={sft / 'hf'}", f"discriminator.model.hf_path={warm / 'hf'}",
                    f"data.train_files=[{files['rl']}]", *val], console)
    _stage(plan, "grpo", "grpo.yaml", [f"model.hf_path={align / 'hf'}", f"data.train_files=[{files['rl']}]",
                                       "trainer.eval_at_start=false", *val], console)
    from prism_mcore.config import load_config

    align_steps = load_config(plan.config_dir / "align.yaml", plan.stage_overrides("align")).trainer.steps
    grpo_steps = load_config(plan.config_dir / "grpo.yaml", plan.stage_overrides("grpo")).trainer.steps
    _stage(plan, "baseline", "grpo.yaml", [f"model.hf_path={sft / 'hf'}", f"data.train_files=[{files['rl']}]",
                                           "trainer.eval_at_start=false", f"trainer.steps={align_steps + grpo_steps}",
                                           *val], console)
    report = build_report(plan.out)
    report["seconds"] = time.monotonic() - t0
    tower_metrics = plan.out / "vision" / "metrics.jsonl"
    if tower_metrics.exists():  # the starting tower's held-out read-out (trainer/demo_tower.py)
        last = json.loads(tower_metrics.read_text().splitlines()[-1])
        report["vision_tower"] = {k: v for k, v in last.items() if k.startswith("val_")}
    report["stage_seconds"] = {p.parent.name: json.loads(p.read_text())["seconds"]
                               for p in sorted(plan.out.glob("*/stage_seconds.json"))}
    (plan.out / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=1))
    console.print(report["table"])
    stages = ", ".join(f"{k} {v / 60:.1f}" for k, v in report["stage_seconds"].items())
    console.print(f"plot: {report['plot']}   metrics: {plan.out}/*/metrics.jsonl   "
                  f"TensorBoard: tensorboard --logdir {plan.out}\nminutes: {stages}; this run {report['seconds'] / 60:.1f}")
    return report


def run_demo(out: str | Path, overrides: list[str], quick: bool = False, text: bool = False) -> int:
    plan = DemoPlan(Path(out), text=text, overrides=list(overrides))
    if quick:  # a smoke run of every stage (tests): a few steps each, small data
        plan = DemoPlan(Path(out), text=text, num_sft=64, num_pairs=16, num_rl=16, num_val=4,
                        tower=TowerPretraining(steps=2, images_per_step=4, num_train=8, num_val=2), overrides=[
            "sft.trainer.steps=2", "disc_warmup.trainer.steps=2", "align.trainer.steps=1", "grpo.trainer.steps=1",
            "all.rollout.max_tokens=16", "all.rollout.n=2", "all.data.global_batch_size=2", *overrides])
    report = run_pipeline(plan)
    return 0 if report["complete"] else 1
