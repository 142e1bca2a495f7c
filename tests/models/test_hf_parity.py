"""Megatron Qwen3 / Qwen3-MoE logits equal transformers' on the same weights, at several layouts;
HF -> Megatron -> HF conversion is exact."""
import json

import pytest
import torch
from safetensors import safe_open

from hf_jobs import megatron_logits, tiny_hf, tokens
from prism_mcore.checkpoint.convert import hf_to_mcore, mcore_to_hf, main as convert_main


def hf_logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def max_rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


CASES = [  # (name, moe, tied, vocab, kv_heads, layout, world)
    ("dense_tp1_kv1", False, True, 300, 1, {}, 1),
    ("dense_tp2_untied", False, False, 300, 2, {"tp": 2}, 2),
    ("dense_pp2_kv1", False, True, 300, 1, {"pp": 2}, 2),
    ("dense_tp2_pp2", False, True, 300, 2, {"tp": 2, "pp": 2}, 4),
    ("moe_ep2", True, True, 300, 2, {"ep": 2}, 2),
    ("moe_tp2_ep2_sp", True, False, 300, 2, {"tp": 2, "ep": 2, "sequence_parallel": True}, 4),
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_logits_match_transformers(case, tmp_path, ranks):
    name, moe, tied, vocab, kv, layout, world = case
    hf = tiny_hf(tmp_path / "hf", moe=moe, tied=tied, vocab=vocab, kv_heads=kv)
    ids = tokens(vocab)
    expected = hf_logits(hf, ids)
    outs = [o for o in ranks(megatron_logits, world, str(tmp_path / "hf"), layout, ids, timeout=600) if o is not None]
    assert outs
    for got in outs:
        assert got.shape == expected.shape
        assert max_rel_err(got, expected) <= 1e-4


def _tensors(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"] \
        if (d / "model.safetensors.index.json").exists() else None
    files = set(index.values()) if index else {"model.safetensors"}
    out = {}
    for f in files:
        with safe_open(d / f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_round_trip_is_bitwise(moe, tmp_path):
    tiny_hf(tmp_path / "hf", moe=moe, tied=not moe, vocab=300)
    layout = {"tp": 2, "pp": 2} if not moe else {"ep": 2, "pp": 2}
    hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "ckpt"), **layout)
    mcore_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"), max_shard_bytes=200_000)
    before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert (tmp_path / "hf" / "config.json").read_text() == (tmp_path / "back" / "config.json").read_text()
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 1
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, capsys):
    tiny_hf(tmp_path / "hf", vocab=300)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()  # drop transformers' save progress output
    rc = convert_main(["hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "model.layers.0.mlp.gate_proj.weight" in err and "(96, 64)" in err and "(128, 64)" in err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.timeout(900)
def test_discriminator_export_writes_value_head(tmp_path):
    """Upcycled MoE -> discriminator checkpoint (fresh value head) -> HF sequence classifier that
    transformers loads, whose last-token score equals our value head's; and back again exactly."""
    from transformers import AutoModelForSequenceClassification

    tiny_hf(tmp_path / "moe", moe=True, tied=True, vocab=300)
    hf_to_mcore(str(tmp_path / "moe"), str(tmp_path / "disc"), ep=2, kind="discriminator")
    mcore_to_hf(str(tmp_path / "disc"), str(tmp_path / "disc_hf"))
    exported = _tensors(tmp_path / "disc_hf")
    head = exported["score.weight"]
    assert head.shape == (1, 64) and 0.01 < float(head.std()) < 0.03
    assert "lm_head.weight" not in exported
    source = _tensors(tmp_path / "moe")
    assert all(torch.equal(source[k], exported[k]) for k in source if k != "lm_head.weight")
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "disc_hf")
    assert type(clf).__name__ == "Qwen3MoeForSequenceClassification"
    hf_to_mcore(str(tmp_path / "disc_hf"), str(tmp_path / "disc2"), tp=2, ep=2)  # kind read from config
    mcore_to_hf(str(tmp_path / "disc2"), str(tmp_path / "disc_hf2"))
    again = _tensors(tmp_path / "disc_hf2")
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout, world", [({"tp": 2, "sequence_parallel": True}, 2), ({"pp": 2}, 2)],
                         ids=["tp2_sp", "pp2"])
def test_fused_logprob_head_matches_transformers(layout, world, tmp_path, ranks):
    """The policy's log-prob path (no logits) gives transformers' log_softmax, with a padded vocab."""
    from hf_jobs import megatron_fused_logprobs

    hf = tiny_hf(tmp_path / "hf", vocab=300, tied=False)
    ids = tokens(300)
    logits = hf_logits(hf, ids).double()
    logprobs = torch.log_softmax(logits, -1)
    expected = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected_entropy = -(logprobs.exp() * logprobs).sum(-1)[:, :-1]
    outs = [o for o in ranks(megatron_fused_logprobs, world, str(tmp_path / "hf"), layout, ids) if o is not None]
    for logp, entropy in outs:
        torch.testing.assert_close(logp.double(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-4, atol=1e-4)
