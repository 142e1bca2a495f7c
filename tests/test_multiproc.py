"""The rank spawner: results in rank order, every rank's error reported, hangs and crashes bounded."""
import time

import pytest

from prism_mcore.platform.multiproc import RankFailure, run_on_ranks
from rank_jobs import all_reduce_rank, die_hard, fail_on, hang_forever


def test_results_in_rank_order():
    assert run_on_ranks(all_reduce_rank, 2, timeout=60) == [3.0, 3.0]


def test_every_failing_rank_is_reported():
    with pytest.raises(RankFailure) as err:
        run_on_ranks(fail_on, 2, [0, 1], timeout=60)
    text = str(err.value)
    assert "2/2 ranks failed" in text and "boom on rank 0" in text and "boom on rank 1" in text


def test_peers_of_a_failed_rank_are_not_left_waiting():
    start = time.monotonic()
    with pytest.raises(RankFailure) as err:
        run_on_ranks(fail_on, 2, [1], timeout=120, grace=3)
    assert "boom on rank 1" in str(err.value) and "--- rank 0" in str(err.value)
    assert time.monotonic() - start < 60


def test_hang_is_killed_with_its_stack():
    start = time.monotonic()
    with pytest.raises(RankFailure) as err:
        run_on_ranks(hang_forever, 2, timeout=25)  # long enough for the ranks to start on a busy machine
    text = str(err.value)
    assert "hung past 25s" in text and "hang_forever" in text
    assert time.monotonic() - start < 60


def test_crash_without_report():
    with pytest.raises(RankFailure, match="exited with code 7"):
        run_on_ranks(die_hard, 2, timeout=60, grace=3)


def test_a_zombie_is_not_alive():
    """An exited process its parent has not reaped yet owns nothing any more: reapers treat it as gone."""
    import os
    import subprocess
    import sys

    from prism_mcore.platform.processes import alive

    assert alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while alive(child.pid) and time.monotonic() < deadline:  # exits, and stays a zombie until wait()
        time.sleep(0.05)
    assert os.path.exists(f"/proc/{child.pid}") and not alive(child.pid)  # the zombie is still there
    child.wait()
    assert not alive(child.pid)
