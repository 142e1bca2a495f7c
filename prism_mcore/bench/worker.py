"""Runs one benchmark case in this (fresh) process and prints its result as one JSON line (see common.run_case)."""
import json
import sys

from prism_mcore.bench.common import Case, run_case_here

if __name__ == "__main__":
    result = run_case_here(Case(**json.loads(sys.argv[1])))
    print(json.dumps({"times_s": result.times_s, "peak_mem_bytes": result.peak_mem_bytes, "work": result.work,
                      "work_unit": result.work_unit, "extra": result.extra}))
