"""Files of the synthetic visual task (data/visual_task.py), in the formats the readers take.

- SFT: LLaMA-Factory sharegpt multimodal JSONL, `{"messages": [...], "images": ["<dir>/000000.png"]}` with
  `<image>` in the user turn, the images as PNG files beside it. Files rather than embedded bytes: JSON has no
  bytes type (base64 would be a convention of our own that LLaMA-Factory does not read), and a file per image is
  what LLaMA-Factory's loader and a person looking at the data expect.
- RL / held-out: the PRISM parquet (spec section 5) with the `images` column as Hugging Face `datasets` writes a
  list of images: list<struct<bytes: binary, path: string>>, PNG bytes, path null, and the `huggingface` schema
  metadata that makes `datasets` decode it as images. Embedded, because a parquet file should travel alone.
  `extra_info` carries the image's facts (JSON) for perception scoring (`facts_of`).
- Warm-up pairs: spec section 2's JSONL with `image` a path relative to the file (the reader's default base).
- The image-blind control: the same rows with blank images (`blind=True`).
Every file is written to a temporary sibling and renamed into place; image files are written before the JSONL
that names them.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Sequence

from prism_mcore.data.jsonl import atomic_write, write_jsonl
from prism_mcore.data.visual_task import (DATA_SOURCE, VisualProblem, png_bytes, prompt_messages, teacher_caption,
                                          teacher_cot, teacher_response, warmup_record)


def write_images(problems: Sequence[VisualProblem], image_dir: str | os.PathLike, blind: bool = False) -> list[Path]:
    """One PNG per problem, `image_dir/000000.png` ...; returns the paths."""
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, p in enumerate(problems):
        path = image_dir / f"{i:06d}.png"
        path.write_bytes(png_bytes(p, blind))
        paths.append(path)
    return paths


def _default_image_dir(path: Path, blind: bool) -> Path:
    return path.with_name(f"{path.stem}{'_blind' if blind else ''}_images")


def write_sft_jsonl(problems: Sequence[VisualProblem], path: str | os.PathLike,
                    image_dir: str | os.PathLike | None = None, blind: bool = False) -> Path:
    """Teacher demonstrations; images in `image_dir` (default `<stem>_images/` beside the file), named in
    `images` relative to the file's directory when they are under it."""
    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else _default_image_dir(path, blind)
    files = write_images(problems, image_dir, blind)
    rows = [{"messages": prompt_messages(p) + [{"role": "assistant", "content": teacher_response(p)}],
             "images": [_relative(f, path.parent)]} for p, f in zip(problems, files)]
    return write_jsonl(path, rows)


def _relative(file: Path, base: Path) -> str:
    try:
        return str(file.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(file.resolve())


def hf_features(with_teacher: bool) -> dict[str, Any]:
    """The `datasets` Features (as its JSON) of the RL parquet: what `datasets` itself writes in the schema's
    `huggingface` metadata, so that `datasets.Dataset.from_parquet` reads `images` as a list of images."""
    string, int64 = {"dtype": "string", "_type": "Value"}, {"dtype": "int64", "_type": "Value"}
    features = {
        "data_source": string,
        "prompt": {"feature": {"role": string, "content": string}, "_type": "List"},
        "images": {"feature": {"_type": "Image"}, "_type": "List"},
        "ability": string,
        "reward_model": {"style": string, "ground_truth": string,
                         "equivalent_answers": {"feature": string, "_type": "List"}},
        "extra_info": {"index": int64, "difficulty": int64, "template": string, "facts": string},
    }
    if with_teacher:
        features.update(teacher_caption=string, teacher_cot=string)
    return features


def rl_schema(with_teacher: bool = True):
    import pyarrow as pa

    fields = [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string()),
                                    ("equivalent_answers", pa.list_(pa.string()))])),
        ("extra_info", pa.struct([("index", pa.int64()), ("difficulty", pa.int64()), ("template", pa.string()),
                                  ("facts", pa.string())])),
    ]
    if with_teacher:
        fields += [("teacher_caption", pa.string()), ("teacher_cot", pa.string())]
    metadata = {"huggingface": json.dumps({"info": {"features": hf_features(with_teacher)}})}
    return pa.schema(fields, metadata=metadata)


def write_rl_parquet(problems: Sequence[VisualProblem], path: str | os.PathLike, with_teacher: bool = True,
                     blind: bool = False) -> Path:
    """One row per problem, the image embedded; teacher strings with their tags (as data/synthetic.py)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, p in enumerate(problems):
        row = {"data_source": DATA_SOURCE, "prompt": prompt_messages(p),
               "images": [{"bytes": png_bytes(p, blind), "path": None}], "ability": "visual",
               "reward_model": {"style": "rule", "ground_truth": p.answer, "equivalent_answers": []},
               "extra_info": {"index": i, "difficulty": p.difficulty, "template": p.template,
                              "facts": json.dumps(p.facts)}}
        if with_teacher:
            row.update(teacher_caption=teacher_caption(p), teacher_cot=teacher_cot(p))
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=rl_schema(with_teacher))
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_heldout(problems: Sequence[VisualProblem], path: str | os.PathLike,
                  blind_path: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The held-out prompts (no teacher) and their image-blind control (same rows, blank images; default
    `<stem>_blind.parquet`)."""
    path = Path(path)
    blind_path = Path(blind_path) if blind_path is not None else path.with_name(f"{path.stem}_blind{path.suffix}")
    return (write_rl_parquet(problems, path, with_teacher=False),
            write_rl_parquet(problems, blind_path, with_teacher=False, blind=True))


def write_warmup_jsonl(problems: Sequence[VisualProblem], path: str | os.PathLike, seed: int,
                       image_dir: str | os.PathLike | None = None) -> Path:
    """Warm-up pairs (spec section 2) with each line's `image` relative to the file's directory."""
    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else _default_image_dir(path, False)
    files = write_images(problems, image_dir)
    rng = random.Random(f"prism-visual-warmup/{seed}")
    # "system": "" = no system prompt, as the task's prompts (visual_task.prompt_messages) have none
    rows = [{**warmup_record(p, rng), "system": "", "image": _relative(f, path.parent)}
            for p, f in zip(problems, files)]
    return write_jsonl(path, rows)


def facts_of(extra_info: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The image facts a held-out row carries (RLExample.extra_info), for algorithms/perception.py; None when
    the row has none (not from this task)."""
    if not isinstance(extra_info, dict) or not isinstance(extra_info.get("facts"), str):
        return None
    return json.loads(extra_info["facts"])
