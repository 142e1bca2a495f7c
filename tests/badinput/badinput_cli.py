"""Shared by the bad-input corpus (issue 15): run the real `prism` CLI in a subprocess and judge the outcome.

Every case ends in one of two ways: a clear error (exit 2, stderr exactly one line naming the key, file or
row) or the bad rows skipped and counted (exit 0, the count on stderr). A traceback, a hang (every call
has a timeout) or a silent wrong result fails the case.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _argv(args) -> list[str]:
    return [sys.executable, "-m", "prism_mcore.cli", *map(str, args)]


_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def prism(*args, timeout: float = 120, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(args), capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                          env={**os.environ, **_ENV})


def prism_many(*commands, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Several independent `prism` commands at once (most of each is interpreter start-up and imports)."""
    procs = [subprocess.Popen(_argv(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, **_ENV}) for args in commands]
    results = []
    try:
        for args, proc in zip(commands, procs):
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(_argv(args), proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 and stderr exactly one line holding every needle; returns that line."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, f"exit {res.returncode}, stderr:\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}, stderr:\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr
    return res
