"""dist_checkpointing through prism_mcore.checkpoint: save at TP2, load at TP1 and PP2."""
import json

import pytest

from mcore_jobs import global_loss, loss_after_load
from prism_mcore.checkpoint.dist_ckpt import latest_checkpoint


@pytest.mark.timeout(600)
def test_save_tp2_load_tp1_and_pp2(tmp_path, ranks):
    saved = ranks(loss_after_load, 2, {"tp": 2}, None, str(tmp_path))
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step_00000003"
    meta = json.loads((ckpt / "prism_meta.json").read_text())
    assert meta["data_position"] == 17 and meta["layout"]["tp"] == 2
    assert not list(tmp_path.glob(".*partial"))

    fresh_tp1 = global_loss(ranks(loss_after_load, 1, {}, None))
    assert fresh_tp1 != pytest.approx(global_loss(saved), rel=1e-3)  # loading must matter
    at_tp1 = global_loss(ranks(loss_after_load, 1, {}, str(ckpt)))
    at_pp2 = global_loss(ranks(loss_after_load, 2, {"pp": 2}, str(ckpt)))
    assert at_tp1 == pytest.approx(global_loss(saved), rel=1e-6)
    assert at_pp2 == pytest.approx(global_loss(saved), rel=1e-6)
