"""RL prompts from verl-style parquet files (spec section 5), for the alignment and RLVR stages.

Failure policy: a problem with a whole file (missing, not parquet, a required column absent) is a
`DataError` raised at construction, before any file is loaded, so a misconfigured run stops in
seconds. A problem with one row (bad prompt, no ground truth, prompt too long, no teacher text) only
drops that row; `dataset.skipped` counts drops by reason, so one bad row never kills a long run.

Images: with `images=ImageProcessor` (the model takes images) the `images` column is required, each row's
images (HF-datasets {bytes, path} structs as `datasets` writes an image list; bare bytes or paths also do,
relative paths against the file's directory) fill the `<image>` placeholders of its prompt in order, and
`prompt_ids` hold each image's expanded pads. A row with a missing, undecodable or too large image, or with
placeholders and images differing in number, is skipped and counted by reason (data/images.py). Without a
processor the column is kept as read, as before.

Shuffled batches are a pure function of (seed, epoch), and the dataset remembers how far into the
epoch it has handed out batches, so a run resumed from `state_dict()` sees the same next batches.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from prism_mcore.algorithms.answer_match import is_missing_answer
from prism_mcore.data.errors import DataError
from prism_mcore.data.images import ImageError, ImageProcessor
from prism_mcore.data.multimodal import VisionTokens, count_image_parts, expand_prompt, message_images, with_image_parts

logger = logging.getLogger(__name__)

REQUIRED = ("prompt", "reward_model")
TEACHER = ("teacher_caption", "teacher_cot")
OPTIONAL = ("data_source", "images", "extra_info")
ROLES = ("system", "user", "assistant")
_READ_ROWS = 4096  # rows per read, to bound memory on large files


@dataclass
class RLExample:
    """`index` is the row's position across all files in order (skipped rows included), so it is
    unique and stable; the file's own `extra_info` is kept alongside. Teacher strings include tags."""

    index: int
    prompt_ids: list[int]
    ground_truth: str
    equivalent_answers: list[str]
    data_source: str
    teacher_caption: str | None = None
    teacher_cot: str | None = None
    # With an ImageProcessor: the checked ImageSources, in the order of their pads in prompt_ids, and their
    # grids; without one, the column's values as read.
    images: list = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)  # image parts carry their ImageSource
    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)
    extra_info: dict[str, Any] | None = None


def _check_schema(path: Path, required: Sequence[str]) -> list[str]:
    """The columns to read from `path`; raises DataError for anything that makes the file unusable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: RL parquet file not found")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    for name in required:
        if name not in schema.names:
            why = " (the model takes images: model.vision)" if name == "images" else ""
            raise DataError(f"{path}: missing required column '{name}'{why}")
    reward_type = schema.field("reward_model").type
    if pa.types.is_struct(reward_type) and reward_type.get_field_index("ground_truth") < 0:
        raise DataError(f"{path}: column 'reward_model' has no field 'ground_truth'")
    return [c for c in (*REQUIRED, *TEACHER, *OPTIONAL) if c in schema.names]


def _as_json(value: Any) -> Any:
    # Some converters store nested columns as JSON strings; accept both.
    return json.loads(value) if isinstance(value, str) else value


def _parse_prompt(value: Any) -> tuple[list[dict] | None, str | None]:
    try:
        prompt = _as_json(value)
    except json.JSONDecodeError:
        return None, "prompt_unparseable"
    if prompt is None:
        return None, "prompt_missing"
    if not isinstance(prompt, list):
        return None, "prompt_malformed"
    if not prompt:
        return None, "prompt_empty"
    messages = []
    for m in prompt:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return None, "prompt_malformed"
        content = m.get("content")
        if not (isinstance(content, str) or (isinstance(content, list) and
                                              all(isinstance(part, dict) for part in content))):
            return None, "prompt_malformed"
        messages.append({"role": m["role"], "content": content})
    return messages, None


def _as_answer(value: Any) -> str | None:
    # NaN/None (or their text, "nan"/"None"/"null") is a missing answer, not the answer "nan": kept, it
    # would score a model that writes "nan" as correct.
    if isinstance(value, bool) or is_missing_answer(value):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    return value.strip() if isinstance(value, str) else None


def _parse_reward(value: Any) -> tuple[str | None, list[str], str | None]:
    try:
        reward = _as_json(value)
    except json.JSONDecodeError:
        return None, [], "ground_truth_missing"
    truth = _as_answer(reward.get("ground_truth")) if isinstance(reward, dict) else None
    if truth is None:
        return None, [], "ground_truth_missing"
    extra = reward.get("equivalent_answers") or []
    equivalents = [a for a in map(_as_answer, extra if isinstance(extra, list) else [extra]) if a is not None]
    return truth, equivalents, None


class RLDataset:
    """Good rows of `files` as `RLExample`s, prompts tokenized with the chat template and the
    generation header (`add_generation_prompt=True`), as the rollout engine will see them."""

    def __init__(self, files: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, max_prompt_length: int,
                 require_teacher: bool = False, images: ImageProcessor | None = None,
                 image_base_path: str | None = None):
        paths = [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
        if not paths:
            raise DataError("RL dataset: no parquet files given")
        required = REQUIRED + (TEACHER if require_teacher else ()) + (("images",) if images is not None else ())
        columns = [_check_schema(p, required) for p in paths]  # every file, before loading any
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.require_teacher = require_teacher
        self.processor = images
        self.image_base_path = image_base_path
        self.vision_tokens = VisionTokens.from_tokenizer(tokenizer) if images is not None else None
        self.skipped: Counter = Counter()
        self.examples: list[RLExample] = []
        self._rows_seen = 0
        for path, cols in zip(paths, columns):
            self._load(path, cols)
        if not self.examples:
            raise DataError(f"{paths[0]}{' (and others)' if len(paths) > 1 else ''}: no usable row "
                            f"(skipped: {dict(self.skipped)})")
        if self.skipped:
            logger.warning("RL data: kept %d rows, skipped %d: %s", len(self.examples),
                           sum(self.skipped.values()), dict(self.skipped))
        self._epoch, self._offset, self._seed = 0, 0, None

    # ---- loading

    def _load(self, path: Path, columns: list[str]) -> None:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=_READ_ROWS, columns=columns):
            cols = {name: batch.column(name).to_pylist() for name in columns}
            pending: list[tuple[RLExample, str]] = []  # (example, rendered prompt) awaiting tokenization
            for r in range(batch.num_rows):
                row = {name: values[r] for name, values in cols.items()}
                index, self._rows_seen = self._rows_seen, self._rows_seen + 1
                example, reason = self._parse_row(index, row, str(path.parent))
                if example is not None:
                    try:
                        text = self.tokenizer.apply_chat_template(example.messages, tokenize=False,
                                                                  add_generation_prompt=True)
                    except Exception:  # noqa: BLE001 - a template error is this row's problem only
                        example, reason = None, "prompt_malformed"
                if example is None:
                    self.skipped[reason] += 1
                else:
                    pending.append((example, text))
            # One batched encode per read: same ids as apply_chat_template(tokenize=True), much faster.
            ids = self.tokenizer([t for _, t in pending], add_special_tokens=False)["input_ids"] if pending else []
            for (example, _), prompt_ids in zip(pending, ids):
                if self.processor is not None:
                    try:  # a stray '<|image_pad|>' in the text is a count mismatch
                        prompt_ids, _, example.image_grid_thw = expand_prompt(
                            list(prompt_ids), example.images, self.processor, self.vision_tokens)
                    except ImageError as e:
                        self.skipped[e.reason] += 1
                        continue
                if len(prompt_ids) > self.max_prompt_length:
                    self.skipped["prompt_too_long"] += 1
                    continue
                example.prompt_ids = list(prompt_ids)
                self.examples.append(example)

    def _images(self, raw: Any, messages: list[dict], base_dir: str) -> tuple[list[dict] | None, str | None]:
        """The prompt with its images in their places (ImageSource in image parts), or (None, reason)."""
        raw = [] if raw is None else _as_json(raw) if isinstance(raw, str) and raw.startswith("[") else raw
        if isinstance(raw, (dict, str, bytes)):  # one image, not in a list
            raw = [raw]
        if not isinstance(raw, list):
            return None, "bad_images"
        if count_image_parts(messages) != len(raw):  # before decoding anything
            return None, "image_count_mismatch"
        try:
            sources = [self.processor.load(x, self.image_base_path or base_dir) for x in raw]
            return with_image_parts(messages, sources), None
        except ImageError as e:
            return None, e.reason

    def _parse_row(self, index: int, row: dict[str, Any], base_dir: str = ".") -> tuple[RLExample | None, str | None]:
        messages, reason = _parse_prompt(row.get("prompt"))
        if messages is None:
            return None, reason
        if self.processor is not None:
            try:
                messages, reason = self._images(row.get("images"), messages, base_dir)
            except json.JSONDecodeError:
                messages, reason = None, "bad_images"
            if messages is None:
                return None, reason
        truth, equivalents, reason = _parse_reward(row.get("reward_model"))
        if truth is None:
            return None, reason
        teacher = {k: row.get(k) if isinstance(row.get(k), str) and row.get(k).strip() else None for k in TEACHER}
        if self.require_teacher and None in teacher.values():
            return None, "teacher_missing"
        images = message_images(messages) if self.processor is not None else row.get("images")
        extra = row.get("extra_info")
        return RLExample(index=index, prompt_ids=[], ground_truth=truth, equivalent_answers=equivalents,
                         data_source=str(row.get("data_source") or ""), images=list(images or []),
                         messages=messages, extra_info=extra if isinstance(extra, dict) else None,
                         **teacher), None

    # ---- access

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> RLExample:
        return self.examples[i]

    def __iter__(self) -> Iterator[RLExample]:
        return iter(self.examples)

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        """The shuffled order of one epoch: a function of (seed, epoch, len) only."""
        import numpy as np

        return np.random.default_rng([seed, epoch]).permutation(len(self.examples)).tolist()

    def batches(self, batch_size: int, seed: int, epoch: int | None = None,
                drop_last: bool = True) -> Iterator[list[RLExample]]:
        """Shuffled batches of one epoch (`epoch=None`: the epoch the saved position is in), starting
        where the last batch handed out left off. A batch counts as consumed once yielded, so
        `state_dict()` taken after receiving batch k resumes at batch k+1. Finishing the epoch moves
        the position to the start of the next one."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        epoch = self._epoch if epoch is None else epoch
        if epoch != self._epoch:
            self._epoch, self._offset = epoch, 0
        if self._offset and self._seed is not None and seed != self._seed:
            raise ValueError(f"resuming epoch {epoch} at offset {self._offset} with seed {seed}, "
                             f"but it was shuffled with seed {self._seed}")
        self._seed = seed
        order, n = self.epoch_order(seed, epoch), len(self.examples)
        while self._offset < n and (self._offset + batch_size <= n or not drop_last):
            start = self._offset
            self._offset = min(start + batch_size, n)
            yield [self.examples[i] for i in order[start:self._offset]]
        self._epoch, self._offset = epoch + 1, 0

    def endless(self, batch_size: int, seed: int) -> Iterator[list[RLExample]]:
        """Batches across epochs; the dataset's own position makes this resumable."""
        while True:
            yield from self.batches(batch_size, seed)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "offset": self._offset, "seed": self._seed, "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_examples") != len(self.examples):
            raise DataError(f"RL dataset: checkpoint was taken with {state.get('num_examples')} usable rows, "
                            f"the data now has {len(self.examples)}; the shuffled order would differ")
        self._epoch, self._offset, self._seed = int(state["epoch"]), int(state["offset"]), state.get("seed")
