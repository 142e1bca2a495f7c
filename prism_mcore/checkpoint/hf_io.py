"""Reading and writing Hugging Face safetensors checkpoints, lazily and atomically.

Every problem with an input file is a `CheckpointError` naming the file (one line, exit 2 in the CLI). An
output directory is written as a hidden temporary sibling and renamed into place when complete
(`atomic_dir`): an existing non-empty target is refused unless the caller passes `overwrite=True`, and is
then replaced only after the new one is complete, so a crash never leaves a half-written or lost output.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# Files copied alongside the weights so that the exported directory is complete for release.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja",
              "added_tokens.json", "preprocessor_config.json", "processor_config.json",
              "video_preprocessor_config.json")
# Exported trees are for release and sharing: readable by all (mkdtemp alone gives 0700 / 0600).
FILE_MODE, DIR_MODE = 0o644, 0o755
# First bytes of the two torch.save formats (zip archive, raw pickle protocol >= 2).
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


class CheckpointError(ValueError):
    """An input checkpoint file that cannot be used, or an output that may not be written, in one line
    naming the file."""

    exit_code = 2


class ShapeMismatch(CheckpointError):
    """The checkpoint's tensors do not fit the configured architecture."""


class TargetExists(CheckpointError):
    """The output directory exists, is not empty, and replacing it was not asked for."""


def read_json(path: str | Path) -> dict:
    """A JSON object from `path` (config.json, an index); anything else is a CheckpointError naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def open_safetensors(path: str | Path):
    """`safe_open(path)`, or a CheckpointError naming the file: missing, truncated, or not safetensors. A
    pickle (torch.save) file is refused by its magic bytes and never loaded: unpickling runs code."""
    path = Path(path)
    try:
        return safe_open(path, "pt")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file (named by the checkpoint index)") from None
    except (SafetensorError, OSError) as e:
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            head = b""
        if head.startswith(_PICKLE_MAGIC):
            raise CheckpointError(f"{path}: a pickle (torch.save) file, not safetensors; pickled checkpoints are "
                                  f"never loaded (they can run code): convert it to safetensors first") from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a complete safetensors file ({reason}; truncated or corrupt?)") from None


class LazyCheckpoint:
    """An HF safetensors checkpoint (single file or sharded with an index); tensors are read on
    demand, and only the requested slice of each."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index}: no 'weight_map' object of tensor name -> file name")
            pickled = sorted({f for f in weight_map.values() if not f.endswith(".safetensors")})
            if pickled:
                raise CheckpointError(f"{self.dir / pickled[0]}: not a .safetensors file (named by {index.name}); "
                                      f"pickled checkpoints are never loaded (they can run code)")
        elif (self.dir / "model.safetensors").exists():
            with open_safetensors(self.dir / "model.safetensors") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt"))
            hint = f" (found {found[0]}: pickled checkpoints are never loaded, they can run code)" if found else ""
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or model.safetensors.index.json{hint}")
        self.weight_map: dict[str, str] = weight_map
        self._files: dict[str, object] = {}

    def _file(self, name: str):
        fname = self.weight_map[name]
        if fname not in self._files:
            self._files[fname] = open_safetensors(self.dir / fname)
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


def check_target(out: str | Path, overwrite: bool) -> None:
    """Refuse an output path that holds anything (a file, or a non-empty directory) unless `overwrite`."""
    out = Path(out)
    if out.is_symlink() or out.exists():
        if not out.is_dir():
            raise TargetExists(f"{out}: exists and is not a directory; choose another output path")
        if not overwrite and any(out.iterdir()):
            raise TargetExists(f"{out}: exists and is not empty; pass --overwrite to replace it")


def set_export_modes(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, DIR_MODE)
        for name in files:
            os.chmod(os.path.join(dirpath, name), FILE_MODE)


def publish(tmp: Path, out: Path, overwrite: bool) -> Path:
    """Rename the complete directory `tmp` to `out`. An existing `out` (empty, or with `overwrite`) is moved
    aside first and deleted only once the new one is in place; a failed swap puts it back."""
    set_export_modes(tmp)
    check_target(out, overwrite)  # again: something may have appeared while we were writing
    if not (out.is_symlink() or out.exists()):
        os.rename(tmp, out)
        return out
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` write into `tmp` (a hidden sibling of `out`); on normal exit it is
    renamed to `out` (see `publish`), on an exception it is removed and `out` is untouched. The target is
    checked first, so a refusal costs nothing."""
    check_target(out, overwrite)
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardedWriter:
    """Writes (name, tensor) pairs into `model-0000i-of-0000n.safetensors` files of at most
    `max_shard_bytes` plus the index, inside a temporary sibling directory that `close` renames into place
    (`publish`). An existing non-empty `out_dir` is refused at construction unless `overwrite`, and then
    replaced only by `close`; `abort` removes the temporary directory."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 * 1024**3, overwrite: bool = True):
        self.out = Path(out_dir).absolute()
        self.overwrite = overwrite
        check_target(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
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
        try:
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
            return publish(self.tmp, self.out, self.overwrite)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def side_files(hf_dir: str | Path) -> list[Path]:
    return [Path(hf_dir) / n for n in SIDE_FILES if (Path(hf_dir) / n).exists()]
