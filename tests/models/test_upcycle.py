"""Sparse upcycling dense Qwen3 -> Qwen3-MoE, checked against transformers' own Qwen3/Qwen3-MoE classes."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeForCausalLM

from prism_mcore.models.qwen3 import upcycle as upc

E, K, I, H, L = 4, 2, 64, 32, 2
TOKENIZER_FILES = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "chat_template.jinja": "{{ x }}"}


def _dense(path: Path, tie: bool, dtype=torch.float32, shard: str | None = None) -> Path:
    torch.manual_seed(1 if tie else 2)
    cfg = Qwen3Config(vocab_size=256, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=I, tie_word_embeddings=tie,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    model = Qwen3ForCausalLM(cfg).to(dtype)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    # The untied checkpoint is sharded so the index-reading path is exercised too.
    return {True: _dense(root / "tied", True), False: _dense(root / "untied", False, shard="20KB")}


def _load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    files = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
    out = {}
    for f in files:
        with safe_open(path / f, framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("tie", [True, False])
def test_zero_noise_reproduces_dense_logits_and_loads_cleanly(dense_dirs, tmp_path, tie):
    out = upc.upcycle(dense_dirs[tie], tmp_path / "moe", noise_std=0.0, seed=3)
    moe, info = _load(out)
    dense, _ = _load(dense_dirs[tie])
    assert isinstance(moe, Qwen3MoeForCausalLM)
    assert all(not info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    c = moe.config
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (E, K, I)
    assert (c.decoder_sparse_step, c.mlp_only_layers, c.norm_topk_prob, c.router_aux_loss_coef) == (1, [], True, 0.01)
    for attr in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(c, attr) == getattr(dense.config, attr), attr
    if tie:
        assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(ids).logits, moe(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    for name, text in TOKENIZER_FILES.items():
        assert (out / name).read_text() == text
    assert (out / "generation_config.json").is_file()


def test_noise_statistics_layout_and_untouched_tensors(dense_dirs, tmp_path):
    std = 0.01
    out = upc.upcycle(dense_dirs[False], tmp_path / "moe", noise_std=std, seed=0)
    on_disk = _tensors(out)
    expect = {f"model.layers.{i}.mlp.experts.{j}.{p}.weight" for i in range(L) for j in range(E)
              for p in ("gate_proj", "up_proj", "down_proj")} | {f"model.layers.{i}.mlp.gate.weight" for i in range(L)}
    assert {k for k in on_disk if ".mlp." in k} == expect  # transformers 5.19's per-expert checkpoint names
    moe, _ = _load(out)
    dense, _ = _load(dense_dirs[False])
    msd, dsd = moe.state_dict(), dense.state_dict()
    for k, v in dsd.items():
        if ".mlp." not in k:
            assert torch.equal(msd[k], v), k
    diffs, routers = [], []
    for i in range(L):
        d = {p: dsd[f"model.layers.{i}.mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
        gate_up, down = msd[f"model.layers.{i}.mlp.experts.gate_up_proj"], msd[f"model.layers.{i}.mlp.experts.down_proj"]
        assert gate_up.shape == (E, 2 * I, H) and down.shape == (E, H, I)
        # Fused layout: gate rows first, then up rows.
        per_expert = torch.stack([gate_up[:, :I] - d["gate_proj"], gate_up[:, I:] - d["up_proj"]], 1)
        diffs += [per_expert.flatten(1), (down - d["down_proj"]).flatten(1)]
        assert per_expert.abs().max() < 10 * std and (down - d["down_proj"]).abs().max() < 10 * std
        for a in range(E):
            for b in range(a + 1, E):
                assert not torch.equal(gate_up[a], gate_up[b]) and not torch.equal(down[a], down[b])
        routers.append(msd[f"model.layers.{i}.mlp.gate.weight"])
    noise = torch.cat(diffs, 1)
    assert noise.abs().min() > 0  # every element moved away from dense
    assert abs(noise.std().item() / std - 1) < 0.10
    assert abs(noise.mean().item()) < 0.1 * std
    # Experts' noise is independent: the correlation between two experts' noise is ~0.
    assert abs(torch.corrcoef(noise[:2])[0, 1].item()) < 0.05
    router = torch.stack(routers)
    assert router.shape == (L, E, H) and abs(router.std().item() / 0.02 - 1) < 0.15


def test_seed_determinism(dense_dirs, tmp_path):
    a = _tensors(upc.upcycle(dense_dirs[True], tmp_path / "a", seed=7))
    b = _tensors(upc.upcycle(dense_dirs[True], tmp_path / "b", seed=7))
    c = _tensors(upc.upcycle(dense_dirs[True], tmp_path / "c", seed=8))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()
    for k in a:
        assert torch.equal(a[k], c[k]) == (".mlp." not in k), k


def test_sharding_writes_a_correct_index(dense_dirs, tmp_path):
    out = upc.upcycle(dense_dirs[False], tmp_path / "moe", seed=5, max_shard_bytes=16 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and sorted(p.name for p in out.glob("*.safetensors")) == files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    total = 0
    for f in files:
        with safe_open(out / f, framework="pt") as h:
            assert {k for k, v in index["weight_map"].items() if v == f} == set(h.keys())
            total += sum(h.get_tensor(k).nbytes for k in h.keys())
    assert index["metadata"]["total_size"] == total
    single = _tensors(upc.upcycle(dense_dirs[False], tmp_path / "one", seed=5))
    sharded = _tensors(out)
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)
    _, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_bfloat16_dtype_is_kept(tmp_path):
    dense = _dense(tmp_path / "dense", True, dtype=torch.bfloat16)
    out = upc.upcycle(dense, tmp_path / "moe", noise_std=0.0)
    got = _tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(dense / "model.safetensors", framework="pt") as h:
        assert torch.equal(got["model.layers.1.mlp.experts.3.down_proj.weight"],
                           h.get_tensor("model.layers.1.mlp.down_proj.weight"))


@pytest.mark.parametrize("kwargs, argv, needle", [
    ({"num_experts": 0}, ["--num-experts", "0"], "num_experts must be >= 1"),
    ({"top_k": 0}, ["--topk", "0"], "top_k must satisfy"),
    ({"top_k": 5}, ["--topk", "5"], "top_k must satisfy"),
    ({"noise_std": -0.1}, ["--noise-std", "-0.1"], "noise_std must be"),
])
def test_bad_arguments(dense_dirs, tmp_path, capsys, kwargs, argv, needle):
    with pytest.raises(ValueError, match=needle) as e:
        upc.upcycle(dense_dirs[True], tmp_path / "moe", **kwargs)
    assert "\n" not in str(e.value)
    assert upc.main(["--hf", str(dense_dirs[True]), "--out", str(tmp_path / "moe"), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "moe").exists()


def test_wrong_model_type_and_existing_out_dir(dense_dirs, tmp_path, capsys):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type must be 'qwen3', found 'llama'"):
        upc.upcycle(llama, tmp_path / "x")
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep").write_text("")
    with pytest.raises(ValueError, match="exists and is not empty; pass --overwrite"):
        upc.upcycle(dense_dirs[True], out)
    assert upc.main(["--hf", str(dense_dirs[True]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}: exists and is not empty; pass --overwrite" in err
    assert (out / "keep").exists()  # refused: the user's file is untouched
    assert upc.main(["--hf", str(dense_dirs[True]), "--out", str(out), "--overwrite", "--num-experts", "3",
                     "--topk", "1", "--seed", "4"]) == 0
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and "3 experts" in summary
    assert not (out / "keep").exists() and json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "moe"]  # no temp dirs left behind


def test_crash_leaves_no_output(dense_dirs, tmp_path, monkeypatch):
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    real = upc.save_file
    monkeypatch.setattr(upc, "save_file", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        upc.upcycle(dense_dirs[True], tmp_path / "moe", max_shard_bytes=16 * 1024)
    assert list(tmp_path.iterdir()) == []
