"""`prism convert` and `prism upcycle` never lose data and name the file they cannot read.

An existing non-empty --out is refused in one line (exit 2) with the user's files untouched; with
--overwrite it is replaced, only once the new output is complete, by a world-readable tree. A truncated
safetensors file, a malformed config.json / prism_meta.json and a pickle where safetensors belong are one
line naming the file, exit 2."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from badinput_cli import ok, one_line_error, prism, prism_many

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random tiny dense HF Qwen3 written by transformers itself (one model.safetensors)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "dense"
    Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=128)).save_pretrained(path)
    assert (path / WEIGHTS).is_file()
    return path


@pytest.fixture(scope="module")
def ckpt(tiny_hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "dense"
    ok(prism("convert", "hf-to-mcore", "--hf", tiny_hf, "--out", path, timeout=240))
    return path


def _user_dir(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("the user's own work")
    return path


def _no_temp_siblings(path):
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


@pytest.mark.timeout(300)
def test_convert_refuses_a_non_empty_out_then_replaces_it_with_overwrite(ckpt, tmp_path):
    out = _user_dir(tmp_path / "release")
    one_line_error(prism("convert", "mcore-to-hf", "--ckpt", ckpt, "--out", out),
                   f"{out}: exists and is not empty; pass --overwrite")
    assert (out / "notes.txt").read_text() == "the user's own work"

    ok(prism("convert", "mcore-to-hf", "--ckpt", ckpt, "--out", out, "--overwrite", timeout=240))
    assert not (out / "notes.txt").exists() and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["transformers_version"]
    assert out.stat().st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o644 for f in out.iterdir()}
    _no_temp_siblings(out)


def test_import_and_upcycle_refuse_a_non_empty_out(tiny_hf, tmp_path):
    out = _user_dir(tmp_path / "target")
    one_line_error(prism("convert", "hf-to-mcore", "--hf", tiny_hf, "--out", out), f"{out}: exists and is not empty")
    one_line_error(prism("upcycle", "--hf", tiny_hf, "--out", out), f"{out}: exists and is not empty")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    one_line_error(prism("upcycle", "--hf", tiny_hf, "--out", out / "notes.txt"), "exists and is not a directory")


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tiny_hf, tmp_path, monkeypatch):
    """A write that dies half-way (here: the disk fills on the second shard) leaves the old output as it was."""
    from prism_mcore.models.qwen3 import upcycle as upc

    out = _user_dir(tmp_path / "moe")
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    real = upc.save_file
    monkeypatch.setattr(upc, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        upc.upcycle(tiny_hf, out, overwrite=True, max_shard_bytes=16 * 1024)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    _no_temp_siblings(out)


def _broken_copy(tiny_hf, tmp_path, case):
    broken = tmp_path / case
    shutil.copytree(tiny_hf, broken)
    if case == "truncated":
        data = (tiny_hf / WEIGHTS).read_bytes()
        (broken / WEIGHTS).write_bytes(data[: len(data) // 2])
        return broken, broken / WEIGHTS, "not a complete safetensors file"
    if case == "config":
        (broken / "config.json").write_text('{"model_type": "qwen3", "hidden_size": 64,\n')
        return broken, broken / "config.json", "malformed JSON at line 2"
    if case == "pickle":  # a torch.save file under the safetensors name: refused by its magic bytes
        torch.save({"model.embed_tokens.weight": torch.zeros(2)}, broken / WEIGHTS)
        return broken, broken / WEIGHTS, "a pickle (torch.save) file"
    # an index that points at a pickled shard
    torch.save({}, broken / "pytorch_model-00001-of-00001.bin")
    (broken / WEIGHTS).unlink()
    (broken / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "pytorch_model-00001-of-00001.bin"}}))
    return broken, broken / "pytorch_model-00001-of-00001.bin", "not a .safetensors file"


def test_convert_and_upcycle_name_the_unreadable_file(tiny_hf, tmp_path):
    cases = []  # (command, the file it must name, why)
    for case in ("truncated", "config", "pickle", "index-to-pickle"):
        source, bad_file, reason = _broken_copy(tiny_hf, tmp_path, case)
        cases.append((("convert", "hf-to-mcore", "--hf", source, "--out", tmp_path / f"ckpt-{case}"), bad_file, reason))
        if case in ("truncated", "config"):
            cases.append((("upcycle", "--hf", source, "--out", tmp_path / f"moe-{case}"), bad_file, reason))
    for (command, bad_file, reason), res in zip(cases, prism_many(*[c[0] for c in cases])):
        one_line_error(res, str(bad_file), reason)
        assert not command[-1].exists()


def test_export_names_a_malformed_checkpoint_meta(tmp_path):
    step = tmp_path / "ckpt" / "step_00000003"
    step.mkdir(parents=True)
    (step / "prism_meta.json").write_text('{"layout": {"tp": 1,')
    (tmp_path / "ckpt" / "latest").write_text(step.name)
    one_line_error(prism("convert", "mcore-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "out"),
                   str(step / "prism_meta.json"), "malformed JSON")
    assert not (tmp_path / "out").exists()
