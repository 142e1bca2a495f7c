"""`prism bench rl-step`'s arithmetic, without running any side: the prism step's phase split from metrics rows
("other" = step time minus generate, log-probs, update and sync), the prism / peer ratios, the flat JSON keys
and the two targets (prism >= 4x TRL+vLLM, other <= 5% of the step); and the rl trainer's runner timer."""
import time
from types import SimpleNamespace

import pytest

from prism_mcore.bench import rl_step


def _row(generate, logprob, update, sync):
    return {"time/generate_s": generate, "time/logprob_s": logprob, "time/update_s": update, "sync_s": sync}


def test_phases_split_each_step_and_the_remainder_is_other():
    ph = rl_step.phases([_row(1.0, 0.0, 2.0, 0.5), _row(1.5, 0.25, 2.0, 0.5)], [4.0, 4.5])
    assert ph["other_s"] == pytest.approx([0.5, 0.25])
    assert ph["generate_s"] == [1.0, 1.5] and ph["logprob_s"] == [0.0, 0.25]
    assert ph["fraction"]["other"] == pytest.approx(0.75 / 8.5)
    assert ph["fraction"]["update"] == pytest.approx(4.0 / 8.5)
    assert sum(ph["fraction"].values()) == pytest.approx(1.0)


def _side(tokens_per_s, step_s, phases=None):
    return {"tokens_per_s": tokens_per_s, "step_s": step_s, **({"phases": phases} if phases else {})}


def test_report_ratios_flat_keys_and_targets(capsys):
    args = SimpleNamespace(prompts=4, group=4, max_tokens=32, steps=3, hidden=128, layers=2, heads=2, kv_heads=1,
                           intermediate=384, world_size=1, force_length=True, lr=1e-5)
    ph = rl_step.phases([_row(1.0, 0.0, 1.2, 0.2), _row(1.0, 0.0, 1.2, 0.2)], [2.5, 2.5])  # other 0.1 s = 4%
    sides = {"prism": _side(900.0, [2.5, 2.5], ph), "trl": _side(30.0, [70.0, 80.0]),
             "trl-vllm": _side(250.0, [9.0, 9.2])}
    order = ["prism", "trl", "trl-vllm"]
    out = rl_step.report(args, order, sides, {s: [1.0, 1.0] for s in order}, params=10, prompt_tokens=1740)
    assert out["ratios"] == pytest.approx({"trl": 30.0, "trl-vllm": 3.6})
    assert out["ratio"] == pytest.approx(30.0) and out["trl_tokens_per_s"] == 30.0
    assert out["ratio_trl_vllm"] == pytest.approx(3.6) and out["trl_vllm_tokens_per_s"] == 250.0
    assert out["step_s_median"]["trl"] == 75.0
    assert out["targets"]["other_fraction"] == pytest.approx(0.04) and out["targets"]["other_met"]
    assert not out["targets"]["ratio_trl_vllm_met"]  # 3.6x < 4x
    rl_step.print_report(out, order)
    text = capsys.readouterr().out
    assert "3.60x" in text and "30.00x" in text and "other 4.0% <= 5%: met" in text and "4x: NOT met" in text


def test_timed_runner_splits_forward_and_train():
    from prism_mcore.trainer.rl import TimedRunner

    class Runner:
        def forward(self, seconds):
            time.sleep(seconds)
            return "scored"

        def train(self, seconds):
            time.sleep(seconds)
            raise ValueError("a failed update is still timed")

    timed = TimedRunner(Runner())
    assert timed.forward(0.05) == "scored"
    with pytest.raises(ValueError):
        timed.train(0.4)
    assert timed.forward(0.05) == "scored"
    assert 0.1 <= timed.forward_s < 0.4 and 0.4 <= timed.train_s  # each kind of call counted on its own


def test_bad_peer_exits_2():
    assert rl_step.main(["--peers", "trl,deepspeed"]) == 2
    assert rl_step.main(["--peers", "trl,trl"]) == 2
