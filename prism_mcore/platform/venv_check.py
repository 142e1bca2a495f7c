"""Post-install check run by `make install`: the CPU venv must hold a CPU torch, none of the CUDA builds of
torchaudio/torchcodec, and torchvision only as the CPU copy `make install` puts beside the lock
(platform/torchvision_cpu.py: no native libraries, imports cleanly next to torch+cpu, transformers and vLLM's
Qwen3-VL import with it). It also builds the cached Qwen3 tokenizer once per venv."""
from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements" / "torchvision-cpu.txt"


def main() -> int:
    import torch

    problems = []
    if not torch.cuda.is_available():
        if torch.version.cuda is not None:
            problems.append(f"torch {torch.__version__} is a CUDA build on a machine without a GPU")
        for name in ("torchaudio", "torchcodec"):
            try:
                problems.append(f"{name} {importlib.metadata.version(name)} is installed (a CUDA build); "
                                f"run: {sys.executable} -m pip uninstall -y {name}")
            except importlib.metadata.PackageNotFoundError:
                pass
        from prism_mcore.platform.torchvision_cpu import pinned, problems as torchvision_problems

        problems += torchvision_problems(pinned(REQUIREMENTS) if REQUIREMENTS.is_file() else None)
    for p in problems:
        print(f"venv check: {p}", file=sys.stderr)
    if problems:
        return 1
    from prism_mcore.data.tokenizer import cache_dir, qwen3_tokenizer

    qwen3_tokenizer()
    print(f"venv check: ok (torch {torch.__version__}, torchvision CPU copy, tokenizer cached in {cache_dir()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
