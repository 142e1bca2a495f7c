"""Run a pure function in a helper Python process under a hard wall-clock limit.

Why a process: `math_verify`'s own timeout uses SIGALRM, which works only in a main thread and
cannot interrupt C code (sympy, big-int arithmetic), and a reward call may come from a worker
thread, a Ray actor or a daemonic multiprocessing worker (which may not fork children through
`multiprocessing`, but may `subprocess.Popen`). A call that overruns kills the helper, returns
the caller's default and the next call starts a fresh helper.

Protocol: one JSON line per request (`{"target": "module:function", "args": [...]}`) on the
helper's stdin, one JSON line per reply on a duplicate of its stdout; the helper points fd 1 at
stderr so that library prints cannot corrupt the protocol.
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Sequence

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class SandboxError(RuntimeError):
    pass


class TimeoutSandbox:
    """One helper process, started lazily; calls are serialised by a lock, so give each thread
    that needs parallel checking its own sandbox. Fork-safe: a forked child starts its own helper."""

    def __init__(self, preload: Sequence[str] = (), startup_timeout_s: float = 120.0, memory_limit_mb: int = 4096):
        """`preload`: modules to import (`module`) or warm-up functions to call (`module:function`)
        before the helper reports ready, so that import time never counts against a call's limit.
        `memory_limit_mb` caps the helper's address space: `10^{10^{10}}` must not eat the node."""
        self.preload = tuple(preload)
        self.startup_timeout_s = startup_timeout_s
        self.memory_limit_mb = memory_limit_mb
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner_pid = -1
        self._buf = b""
        atexit.register(self.close)
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: ref() is not None and ref()._forget_after_fork())

    def call(self, target: str, args: Sequence[Any], timeout_s: float, default: Any = None) -> Any:
        """`target(*args)` in the helper; `default` on timeout, helper crash or any exception."""
        try:
            request = json.dumps({"target": target, "args": list(args)}).encode() + b"\n"
        except (TypeError, ValueError):
            return default
        with self._lock:
            try:
                proc = self._ensure_started()
                proc.stdin.write(request)
                proc.stdin.flush()
                reply = self._read_line(time.monotonic() + timeout_s)
            except (SandboxError, OSError, ValueError):
                self._kill()
                return default
        return reply.get("value", default) if isinstance(reply, dict) and reply.get("ok") else default

    def _forget_after_fork(self) -> None:
        # The parent's lock may have been held by another thread at fork time; its helper is the parent's.
        self._lock = threading.Lock()
        self._proc, self._buf = None, b""

    def close(self) -> None:
        with self._lock:
            self._kill()

    def available(self) -> bool:
        """Start the helper if needed; False when this environment cannot run one."""
        with self._lock:
            try:
                self._ensure_started()
                return True
            except (SandboxError, OSError, ValueError):
                self._kill()
                return False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._owner_pid == os.getpid() else None

    def _ensure_started(self) -> subprocess.Popen:
        if self._proc is not None and self._owner_pid == os.getpid() and self._proc.poll() is None:
            return self._proc
        self._kill()
        env = dict(os.environ, PRISM_SANDBOX_MEM_MB=str(self.memory_limit_mb))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "prism_mcore.algorithms.sandbox", *self.preload]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, env=env, close_fds=True)
        self._owner_pid = os.getpid()
        hello = self._read_line(time.monotonic() + self.startup_timeout_s)
        if not (isinstance(hello, dict) and hello.get("ready")):
            raise SandboxError("sandbox helper did not start")
        return self._proc

    def _read_line(self, deadline: float) -> Any:
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:  # not select.select: trainers often hold > 1024 fds
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SandboxError("timeout")
                if sel.select(remaining):
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        raise SandboxError("helper exited")
                    self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _kill(self) -> None:
        proc, self._proc, self._buf = self._proc, None, b""
        if proc is not None and self._owner_pid == os.getpid():
            try:
                proc.kill()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def serve(preload: Sequence[str]) -> None:
    mem_mb = int(os.environ.get("PRISM_SANDBOX_MEM_MB", "0"))
    if mem_mb > 0:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    for name in preload:  # `module` is imported, `module:function` is also called (warm-up)
        if ":" in name:
            _resolve(name)()
        else:
            importlib.import_module(name)
    out.write(b'{"ready": true}\n')
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            reply = {"ok": True, "value": _resolve(request["target"])(*request["args"])}
            data = json.dumps(reply).encode()
        except Exception:  # noqa: BLE001 - report, keep serving
            data = b'{"ok": false}'
        out.write(data + b"\n")


if __name__ == "__main__":
    serve(sys.argv[1:])
