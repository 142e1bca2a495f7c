"""Run a function on N local ranks (spawned processes joined by a gloo/nccl process group).

Used by the tests and by `prism demo`. Guarantees that matter more than speed:
  * a hang is a failure: past `timeout` every live rank dumps its Python stack, then is killed;
  * every rank's error is reported, not just the first one to die;
  * one rank failing does not leave the others waiting forever on a collective (grace period).
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
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable


class RankFailure(RuntimeError):
    """One or more ranks raised, crashed, or hung; the message holds each rank's report."""


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


def _rank_main(spec: _RankSpec, fn: Callable, args: tuple, kwargs: dict, results: "mp.Queue") -> None:
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
            results.put((spec.rank, True, pickle.dumps(fn(*args, **kwargs))))
        except BaseException:  # noqa: BLE001 - every failure must reach the parent
            results.put((spec.rank, False, traceback.format_exc()))
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
            spec = _RankSpec(rank, world_size, port, stack_file, threads, init_dist, child_env)
            p = ctx.Process(target=_rank_main, args=(spec, fn, args, kwargs, results), name=f"prism-rank{rank}")
            p.start()
            procs.append(p)

        outcome: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        timed_out = False
        while len(outcome) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
                outcome[rank] = (ok, payload)
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
                        rank, ok, payload = results.get_nowait()
                        outcome[rank] = (ok, payload)
                except queue.Empty:
                    pass
                if r not in outcome:
                    outcome[r] = (False, f"process exited with code {procs[r].exitcode} without reporting")
                    deadline = min(deadline, time.monotonic() + grace)
            if time.monotonic() > deadline:
                timed_out = True
                break

        if timed_out:
            for r, p in enumerate(procs):
                if p.is_alive() and r not in outcome:
                    os.kill(p.pid, signal.SIGUSR1)
            time.sleep(1.0)
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()

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
