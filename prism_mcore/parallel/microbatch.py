"""The one micro-batch planner: a step's batch -> this data-parallel rank's micro-batches.

1. Rows are grouped into units (`Batch.unit`; a row alone by default): a discriminator pair or a prompt
   group's piece must be scored in one forward pass, so a unit is never split.
2. Units are dealt to the data-parallel ranks round-robin, in batch order.
3. Each rank packs its units by token budget, first-fit decreasing on the padded cost (rows x longest
   row): the longest unit opens the first micro-batch, each next one joins the first micro-batch it fits.
   A micro-batch is trimmed to its longest row; a unit over the budget gets a micro-batch of its own.
4. Every rank runs the same number of micro-batches: ranks with fewer append placeholder micro-batches
   (one padding row, no loss). Ranks joined by any collective inside a forward pass must agree, and with
   expert parallelism the all-to-all groups span data-parallel ranks, so the count is agreed world-wide.
5. With pipeline parallelism every micro-batch is padded to the step's largest [rows, length] over all
   ranks: the stages exchange fixed-shape activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from prism_mcore.data.batch import Batch


def units_of(batch: Batch) -> list[list[int]]:
    """Row indices of each unit, units in order of their first row."""
    if batch.unit is None:
        return [[i] for i in range(batch.num_rows)]
    order: dict[int, list[int]] = {}
    for row, u in enumerate(batch.unit.tolist()):
        order.setdefault(u, []).append(row)
    return list(order.values())


def first_fit_decreasing(costs: list[tuple[int, int]], token_budget: int) -> list[list[int]]:
    """Bins of unit indices; costs[i] = (rows, longest row). A bin's padded size, rows x its longest row,
    stays within `token_budget` unless a single unit exceeds it. Bins list their units longest first."""
    if token_budget < 1:
        raise ValueError(f"token budget must be >= 1, got {token_budget}")
    order = sorted(range(len(costs)), key=lambda i: -costs[i][1])  # stable: ties keep batch order
    bins: list[list[int]] = []
    rows: list[int] = []
    longest: list[int] = []
    for i in order:
        r, length = costs[i]
        for b in range(len(bins)):
            # decreasing order: the bin's first unit is its longest
            if (rows[b] + r) * longest[b] <= token_budget:
                bins[b].append(i)
                rows[b] += r
                break
        else:
            bins.append([i])
            rows.append(r)
            longest.append(length)
    return bins


@dataclass
class Plan:
    """This rank's micro-batches; `num_real` of them hold rows of the batch (the rest are placeholders)."""

    micro_batches: list[Batch]
    num_real: int
    shape: tuple[int, int] | None  # the fixed [rows, length] under pipeline parallelism, else None


def plan_micro_batches(batch: Batch, token_budget: int, dp_rank: int, dp_size: int, pad_id: int = 0,
                       pipeline_parallel: bool = False, length_multiple: int = 1, group=None) -> Plan:
    """Collective over `group` (default: the world): see the module docstring. Lengths are rounded up to
    a multiple of `length_multiple` (sequence parallelism splits the sequence over the TP ranks)."""
    units = units_of(batch)[dp_rank::dp_size]
    lengths = batch.row_lengths().tolist()
    costs = [(len(u), max(max(lengths[r] for r in u), 1)) for u in units]
    bins = first_fit_decreasing(costs, token_budget)
    micro = []
    for b in bins:
        rows = [r for i in b for r in units[i]]
        longest = -(-max(costs[i][1] for i in b) // length_multiple) * length_multiple
        sub = batch.rows(rows)
        micro.append(sub.trimmed(longest) if longest <= sub.length else sub.pad_to(sub.num_rows, longest, pad_id))
    counts = torch.tensor([len(micro), max((m.num_rows for m in micro), default=1),
                           max((m.length for m in micro), default=1)], dtype=torch.long)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
    num, rows, length = (int(x) for x in counts)
    num_real = len(micro)
    placeholder = Batch.placeholder(batch, pad_id)
    if length_multiple > 1:
        placeholder = placeholder.pad_to(1, length_multiple, pad_id)
    micro += [placeholder for _ in range(num - num_real)]
    shape = None
    if pipeline_parallel:
        shape = (rows, length)
        micro = [m.pad_to(rows, length, pad_id) for m in micro]
    return Plan(micro, num_real, shape)
