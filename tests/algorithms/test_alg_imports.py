import ast
import subprocess
import sys
from pathlib import Path

import prism_mcore.algorithms as algorithms

PACKAGE = Path(algorithms.__file__).parent
FORBIDDEN = ("torch.distributed", "megatron", "ray", "vllm", "deepspeed")


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
            names.add(f"torch.{node.attr}")
    return names


def test_no_distributed_megatron_or_ray_imports():
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in _imported_modules(path):
            assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), f"{path.name} uses {name}"
        assert "import_module(\"megatron" not in path.read_text()


def test_reward_checking_does_not_import_torch():
    # The sandbox helper imports answer_match; it must start fast and stay small.
    code = ("import sys, prism_mcore.algorithms.answer_match, prism_mcore.algorithms.sandbox; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_public_names_resolve():
    for name in algorithms.__all__:
        assert getattr(algorithms, name) is not None
