"""Faults: a rank that raises, dies or hangs mid-step makes the run end with RankFailed naming it, every rank gone —
never a hang. The hang is ended by attend's own timeout (the process group's is set far longer)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from attnkit.distributed import attend, launch, shard
from attnkit.distributed.faults import CollectiveTimeout, PeerLost, is_communication_error, wait
from attnkit.distributed.launch import RankFailed

ATTEND_TIMEOUT = 3.0


def _step(rank: int, world: int, fault: str, piddir: str) -> float:
    """One ulysses step; rank 1 misbehaves at its first all-to-all (after the size check every rank passes)."""
    Path(piddir, f"{rank}.pid").write_text(str(os.getpid()))
    if rank == 1:
        if fault == "raise":
            raise ValueError("rank 1 broke on purpose")

        def misbehave(*args, **kwargs):
            if fault == "die":
                os._exit(7)
            time.sleep(120)  # hang far past every timeout: only attend's timeout can end the others' wait

        dist.all_to_all_single = misbehave
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=gen) for _ in range(3))
    local = [shard(t, world, rank) for t in (q, k, v)]
    out = attend(*local, "softmax", pattern="causal_self", strategy="ulysses", timeout=ATTEND_TIMEOUT)
    return out.sum().item()


def _run(fault: str, tmp_path) -> RankFailed:
    with pytest.raises(RankFailed) as info:
        launch.run(2, _step, fault, str(tmp_path), timeout=60, collective_timeout=45)
    for pid_file in tmp_path.glob("*.pid"):  # every rank is gone (killed and reaped), none left running
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)
    assert len(list(tmp_path.glob("*.pid"))) == 2
    return info.value


def test_a_rank_that_raises_is_named_with_its_error(tmp_path):
    err = _run("raise", tmp_path)
    assert err.rank == 1
    assert "rank 1 raised ValueError: rank 1 broke on purpose" in str(err)


def test_a_rank_that_dies_mid_step_is_named_with_its_exit_code(tmp_path):
    err = _run("die", tmp_path)
    assert err.rank == 1
    assert "rank 1 died (exit code 7)" in str(err)


def test_a_rank_that_hangs_is_named_and_the_others_stop_at_attends_timeout(tmp_path):
    err = _run("hang", tmp_path)
    assert err.rank == 1
    assert "rank 1 hung" in str(err)
    # rank 0 gave up at attend's timeout (3 s), not at the group's (45 s) nor at launch's backstop (60 s)
    assert "CollectiveTimeout" in err.failures[0]
    assert f"did not complete within {ATTEND_TIMEOUT:g} s" in err.failures[0]


class _Work:
    def __init__(self, error: str):
        self.error = error

    def wait(self, timeout):
        raise RuntimeError(self.error)


def test_wait_tells_a_timeout_from_a_lost_peer():
    with pytest.raises(CollectiveTimeout, match="all-to-all of q did not complete within 2 s"):
        wait(_Work("[../gloo/transport/tcp/pair.cc:534] Operation timed out!"), what="all-to-all of q", timeout=2)
    with pytest.raises(PeerLost, match="all-gather of the mask failed: another rank left the group"):
        wait(_Work("Connection closed by peer [127.0.0.1]:5555"), what="all-gather of the mask", timeout=2)


def test_communication_errors_are_told_from_a_ranks_own():
    assert is_communication_error(PeerLost("x"))
    assert is_communication_error(RuntimeError("[gloo] Connection reset by peer"))
    assert not is_communication_error(ValueError("a shape is wrong"))
    assert not is_communication_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
