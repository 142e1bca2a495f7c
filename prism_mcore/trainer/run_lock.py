"""One run per output directory: OUTPUT_DIR/.prism.lock holds the pid and host of the run that owns it.

Two runs writing one directory would interleave checkpoints and metrics. A second run is refused in one
line naming the pid that holds the lock; a lock whose pid is gone (the run was killed) is taken over.
A lock held from another host cannot be checked and is refused too, naming the file to remove.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

LOCK_NAME = ".prism.lock"


class RunLock:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunLock":
        from prism_mcore.config import ConfigError
        from prism_mcore.platform.processes import alive

        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host = self._owner()
                if pid is not None and host == socket.gethostname() and not alive(pid):
                    self.path.unlink(missing_ok=True)  # its run died: take the lock over
                    continue
                where = f"PID {pid}" if host == socket.gethostname() else f"PID {pid} on host {host}"
                raise ConfigError(f"{self.path.parent}: another prism run ({where}) is using this trainer.output_dir; "
                                  f"wait for it, choose another directory, or remove {self.path} if that run is gone")
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self
        raise ConfigError(f"{self.path}: could not take the run lock (it keeps reappearing)")

    def _owner(self) -> tuple[int | None, str]:
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None, socket.gethostname()  # being written, or garbage: treated as a dead owner's

    def release(self) -> None:
        if self.held:
            self.held = False
            pid, _ = self._owner()
            if pid == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
