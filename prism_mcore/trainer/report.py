"""The demo's report: a table of held-out accuracy / format rate (and, for the visual task, perception
accuracy and the image-blind level) after each stage for both arms, and a PNG of the training curves, built from the stages' metrics.jsonl files (so it can be rebuilt any time:
`python -m prism_mcore.trainer.report OUT`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

CHANCE = 0.01  # answers are integers in 0..99; small ones are far more common, hence `prior_accuracy`


def prior_accuracy(train_parquet: Path, val_parquet: Path) -> float | None:
    """Held-out accuracy of always answering the most common training answer: the level a model that
    ignores the question reaches (12.5% on the demo's 64 held-out prompts, not the 1% of a uniform guess)."""
    if not (train_parquet.exists() and val_parquet.exists()):
        return None
    from collections import Counter

    import pyarrow.parquet as pq

    def answers(path: Path) -> list[str]:
        return [r["ground_truth"] for r in pq.read_table(path, columns=["reward_model"]).column(0).to_pylist()]

    val = answers(val_parquet)
    top, _ = Counter(answers(train_parquet)).most_common(1)[0]
    return sum(a == top for a in val) / len(val) if val else None


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a resumed stage may have logged a step twice: keep the last."""
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[(row["step"], "eval_accuracy" in row and "loss" not in row and "reward" not in row
              and "d_loss" not in row)] = row
    return [rows[k] for k in sorted(rows)]


def _evals(rows: list[dict]) -> list[tuple[int, float, float, float | None, float | None]]:
    """(step, accuracy, format, perception accuracy, image-blind accuracy) of each held-out evaluation; the
    last two are None for the text task."""
    return [(r["step"], r["eval_accuracy"], r["eval_format"], r.get("eval_perception_accuracy"),
             r.get("eval_val_blind_accuracy")) for r in rows if "eval_accuracy" in r]


def warmup_window(num_steps: int) -> int:
    """Steps averaged at each end of the warm-up: one step sees 16 pairs, too few for a stable loss."""
    return max(1, min(16, num_steps // 4))


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def build_report(out: str | Path) -> dict:
    from rich.table import Table

    out = Path(out)
    m = {name: read_metrics(out / name / "metrics.jsonl") for name in ("sft", "disc_warmup", "align", "grpo",
                                                                       "baseline")}
    align_evals, grpo_evals, base_evals = _evals(m["align"]), _evals(m["grpo"]), _evals(m["baseline"])
    sft_eval = align_evals[0] if align_evals and align_evals[0][0] == 0 else None
    after_align = align_evals[-1] if len(align_evals) > 1 else None
    after_grpo = grpo_evals[-1] if grpo_evals else None
    after_base = base_evals[-1] if base_evals else None

    def pct(e, i):
        return "—" if e is None or e[i] is None else f"{100 * e[i]:.1f}%"

    prior = prior_accuracy(out / "data" / "rl.parquet", out / "data" / "val.parquet")
    blind = sft_eval[4] if sft_eval else None
    levels = [f"uniform guess {100 * CHANCE:.0f}%"]
    levels += [] if prior is None else [f"the most common answer alone {100 * prior:.1f}%"]
    levels += [] if blind is None else [f"the SFT policy on blank images (image-blind) {100 * blind:.1f}%"]
    perception = sft_eval is not None and sft_eval[3] is not None
    table = Table(title="held-out greedy accuracy / format rate" + (" / perception" if perception else ""))
    cols = ["after stage", "PRISM arm acc", "PRISM arm format", "baseline acc", "baseline format"]
    if perception:
        cols += ["PRISM arm perception", "baseline perception"]
    for col in cols:
        table.add_column(col, justify="right" if col != "after stage" else "left", no_wrap=col == "after stage")

    def row(name, prism, base):
        cells = [name, pct(prism, 1), pct(prism, 2), pct(base, 1), pct(base, 2)]
        table.add_row(*(cells + [pct(prism, 3), pct(base, 3)] if perception else cells))

    row("SFT", sft_eval, sft_eval)
    row("PRISM align", after_align, None)
    row("GRPO", after_grpo, after_base)
    warm = [r for r in m["disc_warmup"] if "loss" in r]
    window = warmup_window(len(warm))
    gaps = [r["score_gap"] for r in m["align"] if "score_gap" in r]
    summary = {
        "sft_loss": [m["sft"][0]["loss"], m["sft"][-1]["loss"]] if m["sft"] else None,
        "warmup_window": window,
        "warmup_loss": [_mean(warm[:window], "loss"), _mean(warm[-window:], "loss")] if warm else None,
        "warmup_pair_accuracy": _mean(warm[-window:], "accuracy") if warm else None,
        "align_score_gap": [gaps[0], gaps[-1]] if gaps else None,
        "prior_accuracy": prior,
        "image_blind_accuracy": blind,
        "perception": {"sft": sft_eval and sft_eval[3], "align": after_align and after_align[3],
                       "prism_grpo": after_grpo and after_grpo[3], "baseline_grpo": after_base and after_base[3]},
        "accuracy": {"sft": sft_eval and sft_eval[1], "align": after_align and after_align[1],
                     "prism_grpo": after_grpo and after_grpo[1], "baseline_grpo": after_base and after_base[1]},
        "format": {"sft": sft_eval and sft_eval[2], "align": after_align and after_align[2],
                   "prism_grpo": after_grpo and after_grpo[2], "baseline_grpo": after_base and after_base[2]},
    }
    plot = out / "curves.png"
    _plot(m, plot, prior, blind)
    complete = all(v is not None for v in (sft_eval, after_align, after_grpo, after_base)) and plot.exists()
    caption = ["levels: " + ", ".join(levels)]
    if perception:
        caption.append("perception: the caption names every fact of the image, nothing else")
    if summary["warmup_loss"]:
        steps = f"{window} steps" if window > 1 else "step"
        caption.append(f"discriminator warm-up loss {summary['warmup_loss'][0]:.3f} -> {summary['warmup_loss'][1]:.3f}"
                       f" (mean of the first / last {steps}; teacher preferred in"
                       f" {100 * summary['warmup_pair_accuracy']:.0f}% of the last {steps}' pairs)")
    if gaps:
        caption.append(f"align teacher-minus-student score gap {gaps[0]:+.3f} -> {gaps[-1]:+.3f}")
    table.caption = "; ".join(caption)
    return {"table": table, "summary": summary, "plot": str(plot), "complete": complete}


def _plot(m: dict[str, list[dict]], path: Path, prior: float | None = None, blind: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    sft = [r for r in m["sft"] if "loss" in r]
    ax[0, 0].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    ax[0, 0].set(title="SFT loss (assistant tokens)", xlabel="step", yscale="log")
    warm = [r for r in m["disc_warmup"] if "loss" in r]
    ax[0, 1].plot([r["step"] for r in warm], [r["loss"] for r in warm], label="warm-up BT loss")
    align = [r for r in m["align"] if "score_gap" in r]
    offset = len(warm)
    ax[0, 1].plot([offset + r["step"] for r in align], [r["score_gap"] for r in align], label="align score gap")
    ax[0, 1].set(title="discriminator", xlabel="warm-up steps, then align steps")
    ax[0, 1].legend()
    n_align = len(align)
    train_prism = [(r["step"], r["accuracy"]) for r in align] + \
        [(n_align + r["step"], r["accuracy"]) for r in m["grpo"] if "reward" in r]
    train_base = [(r["step"], r["accuracy"]) for r in m["baseline"] if "reward" in r]
    reward_prism = [(n_align + r["step"], r["reward"]) for r in m["grpo"] if "reward" in r]
    reward_base = [(r["step"], r["reward"]) for r in m["baseline"] if "reward" in r]
    for series, label, style in ((train_prism, "PRISM arm accuracy", "-"), (train_base, "baseline accuracy", "-"),
                                 (reward_prism, "PRISM arm GRPO reward", "--"),
                                 (reward_base, "baseline GRPO reward", "--")):
        if series:
            ax[1, 0].plot(*zip(*series), style, label=label)
    ax[1, 0].axvline(n_align + 0.5, color="grey", lw=0.8)
    ax[1, 0].set(title="rollouts during RL (align steps, then GRPO)", xlabel="policy update", ylim=(-0.05, 1.05))
    ax[1, 0].legend(fontsize=8)
    evals_prism = [(r["step"], r["eval_accuracy"]) for r in m["align"] if "eval_accuracy" in r] + \
        [(n_align + r["step"], r["eval_accuracy"]) for r in m["grpo"] if "eval_accuracy" in r]
    evals_base = [(0, evals_prism[0][1])] if evals_prism else []
    evals_base += [(r["step"], r["eval_accuracy"]) for r in m["baseline"] if "eval_accuracy" in r]
    for series, label in ((evals_prism, "PRISM arm"), (evals_base, "baseline")):
        if series:
            ax[1, 1].plot(*zip(*series), "o-", label=label)
    ax[1, 1].axhline(CHANCE, color="grey", ls=":", label="uniform guess")
    if prior is not None:
        ax[1, 1].axhline(prior, color="grey", ls="--", label="most common answer")
    if blind is not None:
        ax[1, 1].axhline(blind, color="tab:red", ls=":", label="image-blind (SFT, blank images)")
    perception = [(r["step"], r["eval_perception_accuracy"]) for r in m["align"] if "eval_perception_accuracy" in r] + \
        [(n_align + r["step"], r["eval_perception_accuracy"]) for r in m["grpo"] if "eval_perception_accuracy" in r]
    if perception:
        ax[1, 1].plot(*zip(*perception), "s--", label="PRISM arm perception")
    ax[1, 1].set(title="held-out greedy accuracy", xlabel="policy update after SFT", ylim=(-0.02, 1.02))
    ax[1, 1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    from rich.console import Console

    report = build_report(sys.argv[1])
    Console().print(report["table"])
    print(f"plot: {report['plot']}")
