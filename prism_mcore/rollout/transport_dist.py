"""The torch_distributed weight transport: every sender (trainer rank) broadcasts its buckets in a process
group it shares with every engine (gloo for CPU tensors, NCCL for CUDA ones), across nodes; only the bucket
headers travel through Ray. Split from transport.py, which packs buckets and moves them within a node.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from prism_mcore.rollout.engine import TensorEntry
from prism_mcore.rollout.transport import _fill, _view, layout_table

@dataclass
class GroupSpec:
    """How an engine joins a sender's weight group: rank 0 is the sender (trainer rank), engines 1..n."""
    key: str  # unique per incarnation of the group (a restarted engine makes the sender build a new one)
    host: str  # the sender's node address (its TCPStore and gloo device)
    port: int
    size: int
    backend: str  # "gloo" (CPU tensors) or "nccl" (CUDA tensors)
    timeout_s: float


# key -> (process group, its store); on the sender the store is the TCPStore server, kept alive with the group
_GROUPS: dict[str, tuple[Any, Any]] = {}
_GROUPS_MAX = 16  # an engine keeps the groups of at most this many sender incarnations


def node_address() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - fall back to the host name
        pass
    import socket

    return socket.gethostbyname(socket.gethostname())


def _process_group(spec: GroupSpec, rank: int, store) -> Any:
    from datetime import timedelta

    import torch.distributed as dist

    prefixed = dist.PrefixStore(spec.key, store)
    if spec.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=spec.timeout_s)
        return dist.ProcessGroupNCCL(prefixed, rank, spec.size, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=node_address())]
    opts._timeout = timedelta(seconds=spec.timeout_s)
    return dist.ProcessGroupGloo(prefixed, rank, spec.size, opts)


def open_sender_group(tag: str, engines: int, backend: str, timeout_s: float) -> tuple[GroupSpec, Any]:
    """Sender side, part 1: the store server of a new group (engines join it with `join_group`)."""
    from datetime import timedelta

    import torch.distributed as dist

    host = node_address()
    store = dist.TCPStore(host, 0, engines + 1, True, timedelta(seconds=timeout_s), wait_for_workers=False)
    spec = GroupSpec(f"{tag}_{uuid.uuid4().hex[:8]}", host, store.port, engines + 1, backend, timeout_s)
    return spec, store


def finish_sender_group(spec: GroupSpec, store) -> Any:
    """Sender side, part 2 (while the engines join): blocks until every member is connected."""
    pg = _process_group(spec, 0, store)
    _GROUPS[spec.key] = (pg, store)
    return pg


def join_group(spec: GroupSpec, rank: int) -> None:
    """Engine side: join a sender's group (blocks until every member is connected)."""
    from datetime import timedelta

    import torch.distributed as dist

    if spec.key in _GROUPS:
        return
    store = dist.TCPStore(spec.host, spec.port, spec.size, False, timedelta(seconds=spec.timeout_s))
    pg = _process_group(spec, rank, store)
    while len(_GROUPS) >= _GROUPS_MAX:
        drop_group(next(iter(_GROUPS)))
    _GROUPS[spec.key] = (pg, store)


def has_group(key: str) -> bool:
    return key in _GROUPS


def drop_group(key: str) -> None:
    entry = _GROUPS.pop(key, None)
    if entry is not None:
        try:
            entry[0].abort() if hasattr(entry[0], "abort") else None
        except Exception:  # noqa: BLE001 - a broken group may refuse to abort; dropping it is enough
            pass


@dataclass
class DistBucket:
    """A bucket broadcast by its sender over the group `key`. Only this header travels through Ray; the
    engine posts its receive as soon as the header arrives (`fetch`, asynchronous: engines never wait for
    one another's headers) and waits for the data when the update is applied (`open`)."""
    key: str
    seq: int
    size: int
    table: list[TensorEntry]
    device: str = "cpu"
    _buffer: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _work: Any = field(default=None, repr=False, compare=False)

    def fetch(self) -> None:
        from prism_mcore.rollout.engine import EngineError

        if self._buffer is not None:
            return
        entry = _GROUPS.get(self.key)
        if entry is None:
            raise EngineError(f"not a member of weight group {self.key} (restarted since the sync began?)")
        self._buffer = torch.empty(max(self.size, 1), dtype=torch.uint8, device=self.device)
        self._work = entry[0].broadcast([self._buffer], _root0())

    def open(self) -> list[tuple[str, torch.Tensor]]:
        if self._buffer is None:
            self.fetch()
        if self._work is not None:
            work, self._work = self._work, None
            _wait_work(work, self.key, f"bucket {self.seq}")
        return [(e.name, _view(self._buffer, e)) for e in self.table]

    def entries(self) -> list[TensorEntry]:
        return self.table

    def release(self) -> None:
        self._buffer, self._work = None, None

    def __getstate__(self):
        # Sender -> engine: the header only. Engine -> its own TP workers (vLLM, other processes): the data.
        if self._work is not None:
            work, self._work = self._work, None
            _wait_work(work, self.key, f"bucket {self.seq}")
        return {"key": self.key, "seq": self.seq, "size": self.size, "table": self.table, "device": self.device,
                "_buffer": None if self._buffer is None else self._buffer.cpu(), "_work": None}


def _root0():
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return opts


def _wait_work(work, key: str, what: str) -> None:
    try:
        work.wait()
    except Exception as e:  # noqa: BLE001 - the group is unusable after a failed collective
        drop_group(key)
        raise RuntimeError(f"weight group {key}: {what} failed: {str(e).splitlines()[0] if str(e) else e!r}") from e


class DistSender:
    """Sender side of the torch_distributed transport: packs a bucket into one of two reused buffers and
    broadcasts it asynchronously; a buffer is reused only after its previous broadcast completed."""

    def __init__(self, key: str, pg, device: str = "cpu"):
        self.key, self.pg, self.device = key, pg, device
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.works: list = [None, None]
        self.seq = 0

    def pack(self, pairs: list[tuple[str, torch.Tensor]]) -> tuple[DistBucket, int]:
        table, size = layout_table(pairs)
        k = self.seq % 2
        self._finish(k)
        buf = self.buffers[k]
        if buf is None or buf.numel() < max(size, 1):
            buf = self.buffers[k] = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        _fill(buf, table, pairs)
        bucket = DistBucket(self.key, self.seq, size, table, self.device)
        self.seq += 1
        return bucket, k

    def broadcast(self, k: int, size: int) -> None:
        self.works[k] = self.pg.broadcast([self.buffers[k][:max(size, 1)]], _root0())

    def _finish(self, k: int) -> None:
        if self.works[k] is not None:
            work, self.works[k] = self.works[k], None
            _wait_work(work, self.key, "broadcast of a bucket")

    def finish(self) -> None:
        """Wait until every broadcast completed (every engine has the data)."""
        for k in (0, 1):
            self._finish(k)
