"""Training checkpoints: a failed save never looks complete (save/reshard-load: test_dist_checkpoint.py)."""
from prism_mcore.checkpoint.dist_ckpt import latest_checkpoint


def test_failed_save_leaves_previous_latest(tmp_path, monkeypatch):
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000001" / "prism_meta.json").write_text("{}")
    (tmp_path / "latest").write_text("step_00000001")
    (tmp_path / ".step_00000002.partial").mkdir()  # a crash mid-save leaves only this
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
