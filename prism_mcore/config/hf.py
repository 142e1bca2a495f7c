"""Reading a Hugging Face config.json into our ModelConfig fields (pure JSON): the model family is chosen by
its `model_type` (models/spec.py), so `model.hf_path` pointing at a Qwen3-VL directory selects Qwen3-VL."""
from __future__ import annotations

import json
from pathlib import Path


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json (is --hf a Hugging Face checkpoint directory?)")
    # Errors name the file: a bare "Expecting value: line 1 column 1" does not say which JSON is broken.
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: unreadable JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def model_fields_from_hf(hf: dict) -> dict:
    """ModelConfig fields described by an HF config.json of any family we support."""
    from prism_mcore.models.spec import spec_for_hf

    return spec_for_hf(hf).model_fields(hf)


def fill_from_hf(model_tree: dict) -> dict:
    """`model:` section with the fields it does not set taken from `hf_path`'s config.json; fields the
    user did set are kept, and the weights' shapes are checked against them when loaded. Nested sections
    (`vision`) merge field by field. A `vision` section for a text checkpoint is refused."""
    if not model_tree.get("hf_path"):
        return model_tree
    from_hf = model_fields_from_hf(read_hf_config(model_tree["hf_path"]))
    merged = {**from_hf, **model_tree}
    if isinstance(model_tree.get("vision"), dict):
        if "vision" not in from_hf:
            raise ValueError(f"{model_tree['hf_path']} is a text model; model.vision applies to vision-language "
                             f"checkpoints only")
        merged["vision"] = {**from_hf["vision"], **model_tree["vision"]}
    return merged
