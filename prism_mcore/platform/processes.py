"""Process trees on Linux (/proc): who descends from whom, and stopping a whole tree. Used to make a run's
ranks, Ray daemons and vLLM engines die with the run (platform/multiproc.py, trainer/engines.py)."""
from __future__ import annotations

import os
import signal


def alive(pid: int) -> bool:
    """The process exists and has not exited. A zombie (exited, not yet reaped by its parent) counts as dead:
    what it owned (a lock, staging files, a temp dir) is free to take."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
    except (OSError, IndexError):  # /proc unreadable: fall back to a signal probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                with open(f"/proc/{proc}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(proc))
            except (OSError, ValueError, IndexError):
                pass
    return children


def descendants(roots: set[int] | list[int]) -> set[int]:
    """Every process below `roots` (not the roots themselves)."""
    children = _children_map()
    out: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def processes_mentioning(text: str) -> set[int]:
    """Processes whose command line contains `text` (e.g. a Ray session directory)."""
    found = set()
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                with open(f"/proc/{proc}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.add(int(proc))
            except OSError:
                pass
    return found


def kill_all(pids: set[int] | list[int], sig: int = signal.SIGKILL) -> int:
    """Signal each process (those already gone are skipped); returns how many were signalled."""
    sent = 0
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, sig)
            sent += 1
        except (ProcessLookupError, PermissionError):
            pass
    return sent
