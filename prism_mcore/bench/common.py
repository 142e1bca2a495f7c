"""Shared benchmark machinery: one case = (op, impl, mode, shape, dtype, device) measured for median time and
peak extra memory, then turned into table rows with ratios to the op's torch reference from the same run.

Peak memory is "extra" memory: the high-water mark during one call minus what was allocated just before it.
  * CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated().
  * CPU: torch has no peak counter, so each case runs in a fresh Python process and a background thread
    samples the process RSS (/proc/self/statm) every millisecond during the first (warm-up) call. A fresh
    process per case keeps one implementation's freed-but-cached heap from hiding another's allocations.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class Case:
    op: str
    impl: str
    mode: str
    shape: dict[str, int]
    dtype: str
    device: str
    reps: int
    warmup: int
    seed: int = 0


@dataclass
class Result:
    case: Case
    times_s: list[float]
    peak_mem_bytes: int
    work: float  # FLOPs (rate in TFLOP/s) or bytes (rate in GB/s) of one call
    work_unit: str  # "flop" or "byte"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def rate(self) -> float:
        return self.work / self.median_s / (1e12 if self.work_unit == "flop" else 1e9)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _RssSampler:
    """Max RSS seen by a 1 ms polling thread (the kernels release the GIL, so it keeps running)."""

    def __init__(self):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def measure(case: Case, call: Callable[[], Any]) -> tuple[list[float], int]:
    """Median-ready times of `reps` calls after `warmup` calls, and the peak extra memory of one call.

    On CUDA the memory call comes after the warm-up, so Triton's autotuning buffers are not counted; on CPU
    it is the first call of the fresh process, so first-touch page faults are counted for every impl alike."""
    import gc

    gc.collect()
    if case.device.startswith("cuda"):
        for _ in range(case.warmup):
            call()
        sync(case.device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        sync(case.device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        sampler = _RssSampler()
        base = sampler.rss()
        with sampler:
            call()
        peak = sampler.peak - base
        for _ in range(case.warmup - 1):
            call()
    times = []
    for _ in range(case.reps):
        sync(case.device)
        t0 = time.perf_counter()
        call()
        sync(case.device)
        times.append(time.perf_counter() - t0)
    return times, max(0, peak)


def run_case_here(case: Case) -> Result:
    from prism_mcore.bench import OPS

    torch.manual_seed(case.seed)
    call, work, unit = OPS[case.op].build(case)
    load_before = os.getloadavg()[0]
    times, peak = measure(case, call)
    # other processes on a shared CPU skew timings; keep the evidence next to the numbers
    extra = {} if case.device.startswith("cuda") else {"load_avg_1m": round(max(load_before, os.getloadavg()[0]), 2)}
    return Result(case, times, peak, work, unit, extra)


def run_case(case: Case, isolate: bool) -> Result:
    """In-process on CUDA; in a fresh interpreter on CPU (so the RSS high-water belongs to this case alone)."""
    if not isolate:
        return run_case_here(case)
    proc = subprocess.run([sys.executable, "-m", "prism_mcore.bench.worker", json.dumps(case.__dict__)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {case.impl} {case.mode} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return Result(case, out["times_s"], out["peak_mem_bytes"], out["work"], out["work_unit"], out["extra"])


def run_group_interleaved(cases: list[Case]) -> list[Result]:
    """Peak memory from a fresh process per case; times from round-robin calls of all cases in this process."""
    from dataclasses import replace

    from prism_mcore.bench import OPS

    peaks = [run_case(replace(c, reps=0), isolate=True) for c in cases]
    built = []
    for c in cases:
        torch.manual_seed(c.seed)
        built.append(OPS[c.op].build(c))
    for c, (call, _, _) in zip(cases, built):
        for _ in range(c.warmup):
            call()
    load_before = os.getloadavg()[0]
    times: list[list[float]] = [[] for _ in cases]
    cpu_times: list[list[float]] = [[] for _ in cases]  # CPU seconds of this process: less load-sensitive
    for rep in range(max(c.reps for c in cases)):
        order = range(len(cases)) if rep % 2 == 0 else reversed(range(len(cases)))
        for i in order:
            c0, t0 = time.process_time(), time.perf_counter()
            built[i][0]()
            times[i].append(time.perf_counter() - t0)
            cpu_times[i].append(time.process_time() - c0)
    load = round(max(load_before, os.getloadavg()[0]), 2)
    return [Result(c, t, p.peak_mem_bytes, work, unit,
                   {"load_avg_1m": load, "timing": "interleaved", "cpu_times_s": ct})
            for c, t, ct, p, (_, work, unit) in zip(cases, times, cpu_times, peaks, built)]


def to_rows(results: list[Result], reference_impl: str, ceiling: dict | None) -> list[dict]:
    """One JSON-able row per result; ratios are to the reference impl with the same mode, shape and dtype."""
    refs = {}
    for r in results:
        if r.case.impl == reference_impl:
            refs[(r.case.mode, json.dumps(r.case.shape, sort_keys=True), r.case.dtype)] = r
    rows = []
    for r in results:
        ref = refs.get((r.case.mode, json.dumps(r.case.shape, sort_keys=True), r.case.dtype))
        row = {
            "op": r.case.op, "impl": r.case.impl, "mode": r.case.mode, "shape": r.case.shape, "dtype": r.case.dtype,
            "device": device_name(r.case.device), "median_s": r.median_s, "times_s": r.times_s,
            "peak_mem_bytes": r.peak_mem_bytes, "reference_impl": reference_impl,
            "time_ratio_to_reference": r.median_s / ref.median_s if ref else None,
            "mem_ratio_to_reference": (r.peak_mem_bytes / ref.peak_mem_bytes if ref and ref.peak_mem_bytes
                                       else None),
            **r.extra,
        }
        if "cpu_times_s" in r.extra:
            row["median_cpu_s"] = statistics.median(r.extra["cpu_times_s"])
            if ref and "cpu_times_s" in ref.extra:
                row["cpu_time_ratio_to_reference"] = row["median_cpu_s"] / statistics.median(ref.extra["cpu_times_s"])
        if r.work_unit == "flop":
            row["tflops"] = r.rate
            if ceiling and ceiling.get("matmul_tflops"):
                row["fraction_of_matmul_ceiling"] = r.rate / ceiling["matmul_tflops"]
        else:
            row["gbps"] = r.rate
            if ceiling and ceiling.get("copy_gbps"):
                row["fraction_of_copy_ceiling"] = r.rate / ceiling["copy_gbps"]
        rows.append(row)
    return rows


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    with_cpu = any("cpu_time_ratio_to_reference" in r for r in rows)
    cols = ["impl", "mode", "shape", "dtype", "median", "rate", "peak mem", "time vs ref", "mem vs ref"]
    for col in cols + (["cpu-time vs ref"] if with_cpu else []):
        table.add_column(col, justify="left" if col in ("impl", "mode", "shape", "dtype") else "right")
    for r in rows:
        rate = f"{r['tflops']:.2f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.1f} GB/s"
        frac = r.get("fraction_of_matmul_ceiling", r.get("fraction_of_copy_ceiling"))
        if frac is not None:
            rate += f" ({100 * frac:.0f}% of ceiling)"
        ratio = (lambda v: "-" if v is None else f"{v:.2f}x")
        cells = [r["impl"], r["mode"], " ".join(f"{k}={v}" for k, v in r["shape"].items()), r["dtype"],
                 f"{r['median_s'] * 1e3:.1f} ms", rate, _fmt_bytes(r["peak_mem_bytes"]),
                 ratio(r["time_ratio_to_reference"]), ratio(r["mem_ratio_to_reference"])]
        table.add_row(*cells, *([ratio(r.get("cpu_time_ratio_to_reference"))] if with_cpu else []))
    Console(width=200).print(table)
