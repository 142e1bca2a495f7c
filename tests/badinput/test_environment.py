"""What the install and the CLI do to the rest of the environment: our Triton kernels do not take the name
`triton_kernels` (vLLM's MoE kernels package), and third-party FutureWarnings stay quiet, in child
interpreters too."""
from __future__ import annotations

import subprocess
import sys

from badinput_cli import REPO


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_our_kernels_do_not_shadow_triton_kernels(tmp_path):
    # outside the repository root, whose folder of the same name Python finds through the working directory
    res = _python("import importlib.util, prism_triton_kernels as ours\n"
                  "spec = importlib.util.find_spec('triton_kernels')\n"
                  "print(ours.__file__); print(spec.origin if spec else None)", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ours, theirs = res.stdout.split()
    assert ours == str(REPO / "triton_kernels" / "__init__.py")
    assert theirs == "None" or not theirs.startswith(str(REPO))


def test_future_warnings_are_silenced_here_and_in_child_interpreters(tmp_path):
    code = ("import subprocess, sys, warnings\n"
            "import prism_mcore.platform.quiet\n"
            "warnings.warn('deprecated by a dependency', FutureWarning)\n"
            "warnings.warn('still shown', UserWarning)\n"
            "subprocess.run([sys.executable, '-c', \"import warnings; warnings.warn('child', FutureWarning)\"])\n")
    res = _python(code, cwd=tmp_path)
    assert res.returncode == 0
    assert "FutureWarning" not in res.stderr and "still shown" in res.stderr
