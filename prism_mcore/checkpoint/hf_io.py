"""Reading and writing Hugging Face safetensors checkpoints, lazily and atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Files copied alongside the weights so that the exported directory is complete for release.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja",
              "added_tokens.json", "preprocessor_config.json")


class ShapeMismatch(ValueError):
    """The checkpoint's tensors do not fit the configured architecture."""

    exit_code = 2


class LazyCheckpoint:
    """An HF safetensors checkpoint (single file or sharded with an index); tensors are read on
    demand, and only the requested slice of each."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").exists():
            with safe_open(self.dir / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self.weight_map: dict[str, str] = weight_map
        self._files: dict[str, object] = {}

    def _file(self, name: str):
        fname = self.weight_map[name]
        if fname not in self._files:
            self._files[fname] = safe_open(self.dir / fname, "pt")
        return self._files[fname]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def get(self, name: str, index: tuple = ()) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name} is missing")
        piece = self._file(name).get_slice(name)
        return piece[index] if index else piece[:]

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Fail before any weight is loaded if a tensor is missing, extra, or shaped differently."""
        for name, shape in expected.items():
            if name not in self.weight_map:
                raise ShapeMismatch(f"checkpoint {self.dir} lacks tensor {name} that the config needs "
                                    f"(shape {tuple(shape)})")
            found = self.shape(name)
            if found != tuple(shape):
                raise ShapeMismatch(f"tensor {name}: checkpoint {self.dir} has shape {found}, "
                                    f"the config expects {tuple(shape)}")
        extra = sorted(set(self.weight_map) - set(expected))
        if extra:
            raise ShapeMismatch(f"checkpoint {self.dir} has {len(extra)} tensors the config does not describe, "
                                f"e.g. {extra[0]}")


class ShardedWriter:
    """Writes (name, tensor) pairs into `model-0000i-of-0000n.safetensors` files of at most
    `max_shard_bytes` plus the index, inside a temporary directory renamed into place by `close`."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 * 1024**3):
        self.out = Path(out_dir)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        self.max_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().clone()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, self.tmp / f"shard-{len(self.shards):05d}.safetensors", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self, side_files_from: Iterable[Path] = ()) -> Path:
        self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(self.tmp / f"shard-{i:05d}.safetensors", self.tmp / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for src in side_files_from:
            shutil.copy2(src, self.tmp / src.name)
        if self.out.exists():
            shutil.rmtree(self.out)
        os.rename(self.tmp, self.out)
        return self.out


def side_files(hf_dir: str | Path) -> list[Path]:
    return [Path(hf_dir) / n for n in SIDE_FILES if (Path(hf_dir) / n).exists()]
