"""config.json, generation config and tokenizer for a model that has no source HF directory.

A model built from `model:` fields and trained from scratch (the demo's policy) has nothing to copy
next to its exported weights; these files make the export loadable by transformers and vLLM as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

from prism_mcore.config import ModelConfig
from prism_mcore.data.tokenizer import ENDOFTEXT_ID, IM_END_ID


def transformers_version() -> str:
    """The installed transformers' version, as `save_pretrained` records it in config.json (readers such as
    vLLM use it to pick how to read the file)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:  # metadata missing (a vendored copy): the module knows its own version
        import transformers

        return transformers.__version__


def hf_config_dict(m: ModelConfig) -> dict:
    """config.json of a ModelConfig, as its model family writes it (models/spec.py)."""
    from prism_mcore.models.spec import resolve

    spec, arch = resolve(m)
    return spec.hf_config(arch)


def write_scratch_side_files(spec, arch, out: Path) -> list[Path]:
    """Write config.json, generation_config.json and the family's tokenizer into `out`; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(spec.hf_config(arch), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
                                                            "pad_token_id": ENDOFTEXT_ID}, indent=2) + "\n")
    spec.tokenizer().save_pretrained(str(out))
    processor = spec.processor(arch)  # the image processor of a vision family (preprocessor_config.json)
    if processor is not None:
        processor.save_pretrained(str(out))
    return sorted(out.iterdir())
