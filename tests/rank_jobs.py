"""Small rank functions for the harness tests (module level so spawned ranks can import them)."""
import os
import time

import torch
import torch.distributed as dist


def all_reduce_rank() -> float:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def fail_on(bad_ranks: list[int]) -> int:
    if dist.get_rank() in bad_ranks:
        raise RuntimeError(f"boom on rank {dist.get_rank()}")
    dist.barrier()  # the healthy ranks now wait for a peer that will never come
    return dist.get_rank()


def hang_forever() -> None:
    while True:
        time.sleep(0.1)


def die_hard() -> None:
    if dist.get_rank() == 1:
        os._exit(7)
    dist.barrier()
