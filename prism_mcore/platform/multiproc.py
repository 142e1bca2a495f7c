"""Run a function on N local ranks (spawned processes joined by a gloo/nccl process group).

Used by `prism train`, `prism demo` and the tests. Guarantees that matter more than speed:
  * a hang is a failure: past `timeout` every live rank dumps its Python stack, then is killed;
  * every rank's error is reported, not just the first one to die;
  * one rank failing does not leave the others waiting forever on a collective (grace period);
  * ranks die with their launcher: each watches the launcher's pid and, once it is gone (SIGKILL, OOM),
    kills its own process tree (Ray daemons, vLLM engines) and exits;
  * SIGINT / SIGTERM to the launcher reach every rank (SIGTERM lets them checkpoint first, see
    trainer/run.py); ranks still alive after the grace period are killed with their process trees.
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable


class RankFailure(RuntimeError):
    """One or more ranks raised, crashed, or hung; the message holds each rank's report."""


class RankUserError(RuntimeError):
    """Every failed rank stopped with the same error meant for the user (it had an `exit_code`): its one-line
    message and exit code, for the command line to print as they are."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _RankSpec:
    rank: int
    world_size: int
    port: int
    stack_file: str
    threads: int
    init_dist: bool
    env: dict[str, str]
    launcher_pid: int


WATCHDOG_PERIOD_S = 0.5


def _watch_launcher(launcher_pid: int, launcher_dir: str) -> None:
    """Daemon thread of every rank: once the launcher is gone, nobody will collect this rank's result or stop
    its engines; kill its process tree (Ray daemons and engine actors are its descendants), remove the
    launcher's temp dir (its own cleanup died with it) and exit."""
    import shutil

    from prism_mcore.platform.processes import alive, descendants, kill_all

    while alive(launcher_pid):
        time.sleep(WATCHDOG_PERIOD_S)
    kill_all(descendants([os.getpid()]))
    shutil.rmtree(launcher_dir, ignore_errors=True)
    os._exit(1)


def _rank_main(spec: _RankSpec, fn: Callable, args: tuple, kwargs: dict, results: "mp.Queue") -> None:
    threading.Thread(target=_watch_launcher, args=(spec.launcher_pid, os.path.dirname(spec.stack_file)),
                     name="prism-launcher-watchdog", daemon=True).start()
    os.environ.update(spec.env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec.port), RANK=str(spec.rank),
                      LOCAL_RANK=str(spec.rank), WORLD_SIZE=str(spec.world_size),
                      LOCAL_WORLD_SIZE=str(spec.world_size))
    with open(spec.stack_file, "a") as stacks:
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
        try:
            import torch

            torch.set_num_threads(spec.threads)
            if spec.init_dist:
                from prism_mcore.platform.distributed import init_distributed

                init_distributed()
            # Plain pickle copies tensor storage into the message; the queue's own pickler would
            # share it through file descriptors that vanish when this process exits.
            results.put((spec.rank, True, pickle.dumps(fn(*args, **kwargs)), None))
        except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
            # errors meant for the user (a bad config, a stopped run) carry an exit code and a one-line message
            user = (str(e).splitlines()[0] if str(e) else type(e).__name__, e.exit_code) \
                if isinstance(getattr(e, "exit_code", None), int) else None
            results.put((spec.rank, False, traceback.format_exc(), user))
        finally:
            if spec.init_dist:
                from prism_mcore.platform.distributed import destroy_distributed

                destroy_distributed()


# Imported once by the fork server, so a new rank starts in ~0.1 s instead of re-importing these (~8 s).
_PRELOAD = ["prism_mcore.platform.quiet", "torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt", "transformers",
            "prism_mcore.platform.distributed"]


def _context():
    """Ranks fork from a server that has the heavy modules imported (and no threads or process group of
    its own); PRISM_RANK_START=spawn falls back to plain spawning."""
    if os.environ.get("PRISM_RANK_START", "forkserver") == "spawn":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0, grace: float = 15.0,
                 init_dist: bool = True, env: dict[str, str] | None = None, **kwargs: Any) -> list[Any]:
    """Call `fn(*args, **kwargs)` on `world_size` spawned ranks; return the per-rank results in rank order.

    `fn` must be importable by name (module level). Raises `RankFailure` with every rank's traceback,
    exit code, or (on timeout) live Python stack.
    """
    ctx = _context()
    results: mp.Queue = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    child_env = {"OMP_NUM_THREADS": str(threads), **(env or {})}
    # The ranks write their live stacks here (read when one hangs); removed however the call ends.
    with tempfile.TemporaryDirectory(prefix="prism_ranks_") as tmp:
        procs = []
        for rank in range(world_size):
            stack_file = os.path.join(tmp, f"stack{rank}.txt")
            open(stack_file, "w").close()  # exists even if the rank dies before it starts
            spec = _RankSpec(rank, world_size, port, stack_file, threads, init_dist, child_env, os.getpid())
            p = ctx.Process(target=_rank_main, args=(spec, fn, args, kwargs, results), name=f"prism-rank{rank}")
            p.start()
            procs.append(p)

        outcome: dict[int, tuple[bool, Any]] = {}
        users: dict[int, tuple[str, int] | None] = {}
        deadline = time.monotonic() + timeout
        timed_out = False
        signals = _Forwarder(procs)
        while len(outcome) < world_size:
            if signals.received is not None and not signals.forwarded:
                deadline = min(deadline, signals.forward())
            try:
                rank, ok, payload, user = results.get(timeout=0.2)
                outcome[rank] = (ok, payload)
                users[rank] = user
                if not ok:  # the others may now wait forever on a collective: give them a grace period
                    deadline = min(deadline, time.monotonic() + grace)
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcome]
            for r in dead:  # crashed without reporting (segfault, os._exit, OOM kill)
                time.sleep(0.5)  # its report may still be in flight
                try:
                    while True:
                        rank, ok, payload, user = results.get_nowait()
                        outcome[rank] = (ok, payload)
                        users[rank] = user
                except queue.Empty:
                    pass
                if r not in outcome:
                    outcome[r] = (False, f"process exited with code {procs[r].exitcode} without reporting")
                    deadline = min(deadline, time.monotonic() + grace)
            if time.monotonic() > deadline:
                timed_out = True
                break

        signals.restore()
        if timed_out and signals.received is None:
            for r, p in enumerate(procs):
                if p.is_alive() and r not in outcome:
                    os.kill(p.pid, signal.SIGUSR1)
            time.sleep(1.0)
        _stop_ranks(procs)
        if signals.received == signal.SIGINT:
            raise KeyboardInterrupt

        failed = [r for r in range(world_size) if not (r in outcome and outcome[r][0])]
        messages = {users.get(r) for r in failed}
        if failed and len(messages) == 1 and None not in messages:
            raise RankUserError(*messages.pop())
        failures = []
        for r in range(world_size):
            if r in outcome and outcome[r][0]:
                continue
            if r in outcome:
                failures.append(f"--- rank {r} failed:\n{outcome[r][1]}")
            else:
                with open(os.path.join(tmp, f"stack{r}.txt")) as f:
                    stack = f.read().strip() or "(no stack captured: the rank had not started its function)"
                others_failed = any(not ok for ok, _ in outcome.values())
                why = "was still running after another rank failed" if others_failed else f"hung past {timeout:.0f}s"
                failures.append(f"--- rank {r} {why} (killed); its stack:\n{stack}")
        if failures:
            raise RankFailure(f"{len(failures)}/{world_size} ranks failed\n" + "\n".join(failures))
        return [pickle.loads(outcome[r][1]) for r in range(world_size)]


# How long ranks get after the launcher forwards a signal: SIGTERM lets them finish the step and checkpoint.
GRACE_AFTER_SIGNAL_S = {signal.SIGINT: 5.0, signal.SIGTERM: float(os.environ.get("PRISM_SIGTERM_GRACE_S", 120))}


class _Forwarder:
    """While the launcher waits for its ranks, SIGINT / SIGTERM to it are recorded (the handler does nothing
    else) and forwarded to every rank from the wait loop; only on the main thread (signal handlers)."""

    def __init__(self, procs: list):
        self.procs, self.received, self.forwarded, self.previous = procs, None, False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in GRACE_AFTER_SIGNAL_S:
                self.previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.received = self.received or signum

    def forward(self) -> float:
        """Sends the signal to every live rank; returns the new deadline."""
        self.forwarded = True
        for p in self.procs:
            if p.is_alive():
                try:
                    os.kill(p.pid, self.received)
                except ProcessLookupError:
                    pass
        return time.monotonic() + GRACE_AFTER_SIGNAL_S[self.received]

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _stop_ranks(procs: list) -> None:
    """Join the ranks; kill those still alive after 5 s together with their process trees (a rank's Ray
    daemons and engines must not outlive it)."""
    from prism_mcore.platform.processes import descendants, kill_all

    for p in procs:
        p.join(timeout=5)
    stuck = [p.pid for p in procs if p.is_alive()]
    if stuck:
        kill_all(descendants(stuck) | set(stuck))
    for p in procs:
        p.join()
