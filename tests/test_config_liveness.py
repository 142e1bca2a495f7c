"""Every config field is live: the module its schema entry names (`read_by`) reads it. A setting either
changes what runs or does not exist. And the algorithm presets are what the validated config shows."""
import re
from pathlib import Path

import pytest

import prism_mcore
from prism_mcore.config import PrismConfig

PACKAGE = Path(prism_mcore.__file__).parent


def leaf_fields(model, prefix=""):
    for name, field in model.model_fields.items():
        nested = [t for t in (getattr(field.annotation, "__args__", ()) + (field.annotation,))
                  if isinstance(t, type) and hasattr(t, "model_fields")]
        if nested:
            yield from leaf_fields(nested[0], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", name, (field.json_schema_extra or {}).get("read_by", "")


FIELDS = list(leaf_fields(PrismConfig))


def test_schema_has_fields():
    assert len(FIELDS) > 60


@pytest.mark.parametrize("key,name,read_by", FIELDS, ids=[f[0] for f in FIELDS])
def test_field_is_read_where_its_docs_say(key, name, read_by):
    assert read_by, f"{key}: the schema names no module that reads it (live(..., read_by=...))"
    assert read_by != "config/schema.py", f"{key}: validation alone does not make a setting live"
    source = PACKAGE / read_by
    assert source.is_file(), f"{key}: read_by names {read_by}, which does not exist"
    text = source.read_text()
    assert re.search(rf"\.{name}\b|[\"']{name}[\"']", text), f"{key}: {read_by} never reads .{name}"


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "gspo", "prism"])
def test_presets_are_what_validation_shows(algorithm):
    from prism_mcore.algorithms.policy_loss import PolicyLossConfig
    from prism_mcore.algorithms.presets import ALGORITHM_PRESETS
    from prism_mcore.trainer.policy_update import loss_config

    cfg = PrismConfig.model_validate({"algorithm": {"name": algorithm}})
    shown = cfg.algorithm.model_dump()
    for key, value in ALGORITHM_PRESETS[algorithm].items():
        assert shown[key] == value, (algorithm, key)
    assert loss_config(cfg) == PolicyLossConfig.preset(algorithm)
    # an explicit value wins over the preset, and survives the dump/validate round trip the ranks do
    cfg = PrismConfig.model_validate({"algorithm": {"name": algorithm, "clip_ratio_high": 0.5}})
    again = PrismConfig.model_validate(cfg.model_dump())
    assert again.algorithm.clip_ratio_high == 0.5 and loss_config(again).clip_high == 0.5


def test_dapo_overlong_buffer_follows_max_tokens():
    assert PrismConfig.model_validate({"algorithm": {"name": "dapo"}, "rollout": {"max_tokens": 300}}
                                      ).algorithm.overlong_buffer == 150
    assert PrismConfig.model_validate({"algorithm": {"name": "grpo"}}).algorithm.overlong_buffer == 0
    assert PrismConfig.model_validate({"algorithm": {"name": "dapo", "overlong_buffer": 7}}
                                      ).algorithm.overlong_buffer == 7


def test_context_parallel_refused_in_one_line(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "prism_mcore.cli", "validate", "/dev/null", "parallel.cp=2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallel.cp=2" in lines[0] and "not implemented" in lines[0], res.stderr


@pytest.mark.parametrize("removed", ["parallel.num_microbatches=2", "rollout.max_staleness=1", "rollout.engine=vllm"])
def test_inert_fields_are_gone(removed):
    from prism_mcore.config import ConfigError, load_config

    with pytest.raises(ConfigError):
        load_config(None, [removed])
