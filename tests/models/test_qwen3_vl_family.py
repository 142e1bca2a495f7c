"""Qwen3-VL through its model spec: `model.hf_path` selects the family, `prism upcycle` dense -> MoE (transformers
reads it, noise 0 keeps the dense logits), `prism convert` both ways for both families and the discriminator
(bitwise), the Qwen3-VL-MoE discriminator's scores on image rows (left-, right-padded, packed; = transformers'
backbone + head), and vision training control through the trainer's DDP and optimizer."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vl_family_jobs import disc_scores, image_sequences, padded, vision_training
from vl_jobs import IMAGE, VOCAB, hf_class, hf_forward, tiny_vl_hf, vl_batch


def tensors(d: Path) -> dict:
    out = {}
    for f in Path(d).glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A dense tied Qwen3-VL, its upcycled Qwen3-VL-MoE (noise 0.01) and the dense model."""
    from prism_mcore.models.upcycle import main as upcycle_main

    root = tmp_path_factory.mktemp("vlfam")
    dense = tiny_vl_hf(root / "dense", moe=False, tied=True)
    assert upcycle_main(["--hf", str(root / "dense"), "--out", str(root / "moe"), "--num-experts", "4", "--topk", "2",
                         "--noise-std", "0.01", "--seed", "5"]) == 0
    return root, dense


def test_hf_path_selects_the_family(dirs):
    from prism_mcore.config import load_config
    from prism_mcore.models.spec import resolve

    root, _ = dirs
    cfg = load_config(None, [f"model.hf_path={root / 'moe'}", "model.vision.train=merger"])
    spec, arch = resolve(cfg.model)
    assert spec.name == "qwen3_vl" and arch.is_moe and arch.text.num_experts == 4
    assert cfg.model.vision.train == "merger" and cfg.model.vision.tower["depth"] == 2  # merged field by field
    assert resolve(load_config(None, []).model)[0].name == "qwen3"
    from transformers import Qwen3Config

    from prism_mcore.config import ConfigError

    Qwen3Config(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, intermediate_size=64).save_pretrained(root / "text")
    assert resolve(load_config(None, [f"model.hf_path={root / 'text'}"]).model)[0].name == "qwen3"
    with pytest.raises(ConfigError, match="text model; model.vision"):
        load_config(None, [f"model.hf_path={root / 'text'}", "model.vision.train=frozen"])


def test_upcycle_keeps_dense_logits_and_loads_in_transformers(dirs, tmp_path):
    from prism_mcore.models.upcycle import main as upcycle_main

    root, dense = dirs
    assert upcycle_main(["--hf", str(root / "dense"), "--out", str(tmp_path / "moe0"), "--noise-std", "0"]) == 0
    _, moe_cls = hf_class(True)
    moe, info = moe_cls.from_pretrained(tmp_path / "moe0", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    config = json.loads((tmp_path / "moe0" / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl_moe" and config["text_config"]["norm_topk_prob"] is True
    text = config["text_config"]  # transformers 5 writes num_experts as num_local_experts
    assert (text.get("num_experts", text.get("num_local_experts")), text["moe_intermediate_size"]) == (4, 96)
    written = tensors(tmp_path / "moe0")
    assert written["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 192)  # [E, H, 2I]
    assert written["model.language_model.layers.0.mlp.experts.down_proj"].shape == (4, 96, 64)  # [E, I, H]
    source = tensors(root / "dense")
    assert all(torch.equal(source[k], written[k]) for k in source if ".mlp." not in k)  # tower, attention, ...
    batch = vl_batch(images_per_row=(0, 1, 2))
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        want, got = hf_forward(dense, batch)[valid], hf_forward(moe.eval(), batch)[valid]
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    # noise 0.01 (the fixture's): experts differ from the dense MLP by about that much, each its own draw
    noisy = tensors(root / "moe")["model.language_model.layers.1.mlp.experts.down_proj"]
    delta = noisy - source["model.language_model.layers.1.mlp.down_proj.weight"].t()
    assert 0.009 < float(delta.std()) < 0.011 and not torch.equal(delta[0], delta[1])


@pytest.mark.timeout(900)
def test_convert_round_trips_are_bitwise(dirs, tmp_path):
    """`prism convert` HF -> Megatron -> HF: dense (tied) at TP2+PP2, MoE at EP2, and the MoE as the discriminator
    at EP2 (backbone bitwise, the unused LM head dropped, `score.weight` written and marked in config.json)."""
    from prism_mcore.checkpoint.convert import main as convert

    root, _ = dirs
    cases = [("dense", ["--tp", "2", "--pp", "2"], []), ("moe", ["--ep", "2"], []),
             ("moe", ["--ep", "2"], ["--discriminator"])]
    for i, (name, layout, kind) in enumerate(cases):
        ckpt, out = tmp_path / f"ckpt{i}", tmp_path / f"out{i}"
        assert convert(["hf-to-mcore", "--hf", str(root / name), "--out", str(ckpt), *layout, *kind]) == 0
        assert convert(["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out), "--max-shard-gb", "0.0003"]) == 0
        before, after = tensors(root / name), tensors(out)
        assert len(list(out.glob("model-*.safetensors"))) > 1
        if kind:
            assert after.pop("score.weight").shape == (1, 64)
            assert json.loads((out / "config.json").read_text())["prism_value_head"] == "score.weight"
            before.pop("lm_head.weight", None)
        assert before.keys() == after.keys(), name
        assert all(torch.equal(before[k], after[k]) for k in before), name
        if not kind:
            _, cls = hf_class(name == "moe")
            _, info = cls.from_pretrained(out, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"]


def test_convert_names_the_expert_layout_of_a_save_pretrained_directory(dirs, tmp_path, capsys):
    from prism_mcore.checkpoint.convert import main as convert

    root, _ = dirs
    _, cls = hf_class(True)
    cls.from_pretrained(root / "moe").save_pretrained(tmp_path / "saved")  # transformers' [E, 2I, H] layout
    capsys.readouterr()
    assert convert(["hf-to-mcore", "--hf", str(tmp_path / "saved"), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--expert-layout transformers" in err
    assert convert(["hf-to-mcore", "--hf", str(root / "dense"), "--out", str(tmp_path / "c"),
                    "--expert-layout", "bogus"]) == 2
    assert "released, transformers" in capsys.readouterr().err


@pytest.mark.timeout(400)
def test_discriminator_scores_image_rows_alike_however_padded(dirs, ranks):
    """Qwen3-VL-MoE discriminator: right-padded, left-padded and packed rows with images give the same
    sequence scores, and they equal transformers' backbone (its last hidden state at the last token) times
    the value head (TP2 + SP: the MoE backbone's layout)."""
    root, _ = dirs
    hf_dir = str(root / "moe")
    per_rank = ranks(disc_scores, 2, hf_dir, {"tp": 2, "sequence_parallel": True}, timeout=350)
    seqs, pixels, grids = image_sequences()
    ids, mask = padded(seqs, "right")
    _, cls = hf_class(True)
    hf = cls.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hidden = hf.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE).int(),
                          pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids)).last_hidden_state
    last = mask.sum(1) - 1
    for out in per_rank:
        want = hidden[torch.arange(len(seqs)), last] @ out["head"].t()
        for side in ("right", "left", "packed"):
            torch.testing.assert_close(out[side], want.squeeze(-1), rtol=1e-4, atol=1e-5, msg=lambda m: f"{side}: {m}")
        torch.testing.assert_close(out["left"], out["right"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["packed"], out["right"], rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(400)
def test_vision_training_control(dirs, ranks):
    """frozen: every vision parameter unchanged by the step (text parameters move); merger: only the mergers
    move; full (lr_mult 0.5): every vision gradient equals transformers' (rtol 1e-4), and Adam's first step
    moves vision parameters by lr x 0.5, text parameters by lr."""
    root, dense = dirs
    batch = vl_batch(images_per_row=(0, 1, 2))
    weights = torch.randn(*batch["input_ids"].shape, VOCAB, generator=torch.Generator().manual_seed(5))
    weights *= batch["attention_mask"][..., None]
    dense.zero_grad()
    (hf_forward(dense, batch) * weights).sum().backward()
    expected = {n: p.grad.clone() for n, p in dense.named_parameters() if n.startswith("model.visual.")}
    dense.zero_grad()
    modes = [("frozen", 1.0), ("merger", 1.0), ("full", 0.5)]
    (frozen, merger, full), = ranks(vision_training, 1, str(root / "dense"), batch, weights, modes, timeout=350)

    grads, vision, text, groups = frozen
    assert all(g is None for g in grads.values()) and all(float(c.max()) == 0 for c in vision.values())
    assert max(float(c.max()) for c in text.values()) > 0
    _, vision, _, _ = merger
    for name, c in vision.items():
        moved = float(c.max()) > 0
        assert moved == (".merger." in name or ".deepstack_merger_list." in name), name

    grads, vision, text, groups = full
    assert groups == {1.0: 1e-3, 0.5: 5e-4}
    for name, want in expected.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                                   msg=lambda m: f"{name}: {m}")
        assert abs(float(vision[name].max()) - 5e-4) < 1e-6, name  # Adam's first step: lr x mult per element
    assert abs(max(float(c.max()) for c in text.values()) - 1e-3) < 1e-6
