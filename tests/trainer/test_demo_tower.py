"""The multimodal demo's starting tower (trainer/demo_tower.py): its labels name what the processor's patches
show, and training on them teaches the tower to tell the scenes' cells and digits apart."""
import pytest
import torch

from prism_mcore.config import load_config
from prism_mcore.data import visual_task as task
from prism_mcore.data.images import QWEN3_VL_MEAN, QWEN3_VL_STD
from prism_mcore.models.spec import resolve
from prism_mcore.trainer import demo_tower as dt
from prism_mcore.trainer.demo import CONFIGS


@pytest.fixture(scope="module")
def policy():
    return resolve(load_config(CONFIGS / "demo_vl" / "sft.yaml", []).model)


def _patch_rgb(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """[patches, 3, patch, patch] RGB in 0..255 from the processor's normalized (C, T, P, P) patch rows."""
    x = pixel_values.reshape(-1, 3, 2, patch, patch)[:, :, 0]
    mean, std = torch.tensor(QWEN3_VL_MEAN).view(1, 3, 1, 1), torch.tensor(QWEN3_VL_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def test_block_labels_name_what_each_patch_shows(policy):
    spec, arch = policy
    problems = task.make_problems(6, 5, 0) + task.make_problems(6, 5, 1)
    images = spec.processor(arch)([task.render(p) for p in problems])
    rgb = _patch_rgb(images.pixel_values, 16).split([int(g.prod()) for g in images.image_grid_thw])
    checked = {"shape": 0, "empty": 0, "digit": 0}
    for p, patches in zip(problems, rgb):
        cells, digits = dt.block_labels(p)
        assert cells.shape == (len(patches) // 4, 4) and digits.shape == (len(patches) // 4,)
        for block in range(len(digits)):
            for i in range(4):
                patch = patches[block * 4 + i]
                bright = patch.reshape(3, -1).max(0).values > 120  # drawn pixels (background is 24)
                if cells[block, i] != dt.NONE:
                    colour = task.COLOURS[(int(cells[block, i]) - 1) // len(task.SHAPES)]
                    drawn = patch.reshape(3, -1)[:, bright].mean(1)
                    assert torch.allclose(drawn, torch.tensor(task.RGB[colour], dtype=torch.float), atol=40), \
                        (p, block, i, drawn)
                    checked["shape"] += 1
                elif digits[block] == dt.NONE:
                    assert not bright.any(), (p, block, i)
                    checked["empty"] += 1
            if digits[block] != dt.NONE:
                block_pixels = torch.stack([patches[block * 4 + i] for i in range(4)])
                assert (block_pixels.reshape(4, 3, -1).min(1).values > 200).any()  # white digit strokes
                checked["digit"] += 1
        counts, image_digits = dt.image_labels(p)
        assert counts.sum() == len(p.shapes) and (image_digits > 0).sum() == len(p.digits)
    assert min(checked.values()) > 0, checked


def test_pretraining_teaches_the_tower_what_the_scenes_hold(policy):
    """Against the probes alone on the random tower, with the same steps: the trained tower's read-outs are
    better on held-out scenes, and it has moved."""
    spec, arch = policy
    settings = dt.TowerPretraining(steps=40, images_per_step=8, lr=3e-3, num_train=400, num_val=32)
    tower, trained = dt.pretrain_tower(spec, arch, settings, (0, 1))
    random_tower, probes_only = dt.pretrain_tower(spec, arch, settings, (0, 1), train_tower=False)
    assert trained["val_loss"] < 0.8 * probes_only["val_loss"], (trained, probes_only)
    moved = [not torch.equal(a, b) for a, b in zip(tower.state_dict().values(), random_tower.state_dict().values())]
    assert all(moved) and len(moved) > 10


def test_pretraining_is_a_function_of_its_seed(policy):
    """The demo's starting policy does not depend on what ran before in the process (the global RNG)."""
    spec, arch = policy
    settings = dt.TowerPretraining(steps=3, images_per_step=4, num_train=16, num_val=4)
    torch.manual_seed(1)
    a, result_a = dt.pretrain_tower(spec, arch, settings, (0, 1))
    torch.manual_seed(2)
    torch.randn(7)
    b, result_b = dt.pretrain_tower(spec, arch, settings, (0, 1))
    assert result_a == result_b and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
