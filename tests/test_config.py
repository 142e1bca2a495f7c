"""The typed config: YAML + dotted overrides, one-line errors naming key and constraint, exit code 2."""
import subprocess
import sys
from pathlib import Path

import pytest

from prism_mcore.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["optim.lr=1e-6", "parallel.tp=2", "parallel.sequence_parallel=true",
                             "model.megatron.recompute_granularity=full"])
    assert cfg.optim.lr == pytest.approx(1e-6)
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel is True
    assert cfg.model.megatron == {"recompute_granularity": "full"}


def test_yaml_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 1.0e-5\n  weight_decay: 0.1\nparallel:\n  tp: 2\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim:\n  lr: 2.0e-5\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.parallel.tp) == (2e-5, 0.1, 2)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=3"], "parallel.tp=3 must divide model.num_attention_heads=4"),
    (["model.num_attention_heads=8", "model.num_key_value_heads=2", "parallel.tp=4"],
     "parallel.tp=4 must divide model.num_key_value_heads=2"),
    (["model.num_experts=6", "parallel.ep=4"], "parallel.ep=4 must divide model.num_experts=6"),
    (["parallel.tp=2", "parallel.world_size=5"], "parallel.world_size=5 must equal tp*pp*cp*dp=2*1*1*2=4"),
    (["parallel.tp=2", "parallel.dp=2", "parallel.world_size=2"], "parallel.world_size=2 must equal"),
    (["model.num_experts=4", "parallel.tp=2"], "parallel.sequence_parallel must be true for an MoE model"),
    (["parallel.ep=2"], "parallel.ep=2 needs an MoE model"),
    (["parallel.pp=3"], "parallel.pp=3 must divide model.num_hidden_layers=2"),
    (["optim.lrr=1"], "unknown key optim.lrr"),
    (["optim.lr=-1"], "optim.lr=-1: Input should be greater than 0"),
    (["parallel.tp=two"], "parallel.tp='two'"),
    (["algorithm.name=ppo2"], "algorithm.name='ppo2'"),
    (["optim.lr"], "expected KEY=VALUE"),
])
def test_errors_name_key_and_constraint(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_cli_validate_broken_config_exits_2(tmp_path):
    (tmp_path / "broken.yaml").write_text("model:\n  num_attention_heads: 4\nparallel:\n  tp: 3\n")
    res = subprocess.run([sys.executable, "-m", "prism_mcore.cli", "validate", str(tmp_path / "broken.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["config error: parallel.tp=3 must divide model.num_attention_heads=4"]


def test_cli_validate_every_shipped_config():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        # --config-only: shipped configs are templates; their data files and checkpoints come at launch
        res = subprocess.run([sys.executable, "-m", "prism_mcore.cli", "validate", "--config-only", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"{path}: {res.stderr}"
