"""Training checkpoints: model + optimizer + RNG resume exactly, also at another layout; a failed
save never looks complete."""
import pytest

from mcore_jobs import train_save_resume
from prism_mcore.checkpoint.dist_ckpt import latest_checkpoint, prune_checkpoints


@pytest.mark.timeout(600)
def test_resume_continues_exactly(tmp_path, ranks):
    uninterrupted = ranks(train_save_resume, 2, {"tp": 2}, str(tmp_path), "save")[0]
    assert uninterrupted[1] < uninterrupted[0]  # AdamW at lr 1e-2 moves the loss
    resumed = ranks(train_save_resume, 2, {"tp": 2}, str(tmp_path), "resume")[0]
    assert resumed == pytest.approx(uninterrupted, rel=1e-6)
    at_tp1 = ranks(train_save_resume, 1, {}, str(tmp_path), "resume")[0]
    at_pp2 = ranks(train_save_resume, 2, {"pp": 2}, str(tmp_path), "resume")[0]
    assert at_tp1 == pytest.approx(uninterrupted, rel=1e-5)
    assert at_pp2 == pytest.approx(uninterrupted, rel=1e-5)


def _complete(root, step):
    """A small but real checkpoint directory: a torch.distributed.checkpoint save and its metadata."""
    import json
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    path = root / f"step_{step:08d}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"x": torch.full((3,), float(step))}, checkpoint_id=str(path))
    (path / "prism_meta.json").write_text(json.dumps({"step": step}))
    return path


def test_failed_save_leaves_previous_latest(tmp_path, monkeypatch):
    _complete(tmp_path, 1)
    (tmp_path / "latest").write_text("step_00000001")
    (tmp_path / ".step_00000002.partial").mkdir()  # a crash mid-save leaves only this
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_unusable_checkpoints_fall_back_or_fail_in_one_line(tmp_path):
    from prism_mcore.checkpoint.dist_ckpt import newest_loadable
    from prism_mcore.checkpoint.hf_io import CheckpointError

    assert latest_checkpoint(tmp_path) is None  # nothing yet: start from scratch
    for step in (1, 2, 3):
        _complete(tmp_path, step)
    (tmp_path / "latest").write_text("garbage")
    shard = next((tmp_path / "step_00000003").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    (tmp_path / "step_00000002" / "prism_meta.json").write_text("{")
    path, skipped = newest_loadable(tmp_path)
    assert path.name == "step_00000001"
    assert [(p.name, why.split(" (")[0]) for p, why in skipped] == [
        ("latest", "does not name a checkpoint"), ("step_00000003", f"{shard.name} is truncated"),
        ("step_00000002", f"{tmp_path / 'step_00000002' / 'prism_meta.json'}: malformed JSON at line 1 column 2")]
    (tmp_path / "step_00000001" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint under"):
        latest_checkpoint(tmp_path)


def test_prune_keeps_newest_and_latest(tmp_path):
    for step in (5, 10, 15, 20):
        _complete(tmp_path, step)
    (tmp_path / ".step_00000025.partial").mkdir()
    (tmp_path / "step_00000030").mkdir()  # incomplete: no metadata, never counted or touched
    (tmp_path / "latest").write_text("step_00000020")
    assert prune_checkpoints(tmp_path, 0) == []
    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step_00000005", "step_00000010"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000015", "step_00000020", "step_00000030"]
    (tmp_path / "latest").write_text("step_00000015")  # e.g. a resumed run pointed back
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == []
    assert latest_checkpoint(tmp_path).name == "step_00000015"
