"""One error type per fault, whatever the world size (README, "Errors"): the rank whose own step failed (a
file write, creating the partial directory, the manifest, ``latest``) raises WriteError chaining the OS error;
every other rank raises CommitError naming that rank in ``failures``. Faults go through a faulty storage
wrapper on the rank at fault (no private name is patched)."""
from __future__ import annotations

import errno

import pytest

import error_rule_workers as w
from dist_helpers import assert_all_ok, forkserver_context, run_ranks


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2])
def test_a_fault_raises_the_same_error_on_one_rank_and_on_several(tmp_path, world):
    results = assert_all_ok(run_ranks(w.one_fault_per_save, world, str(tmp_path), str(tmp_path), timeout=200,
                                      ctx=forkserver_context()))
    for name, (_, _, which) in w.FAULTS.items():
        culprit = w.at_fault(world, which)
        for rank, seen in enumerate(results):
            got = seen[name]
            where = f"{name}, rank {rank} of {world}: {got}"
            assert got["latest"] == "good" and not got["published"], where
            if rank == culprit:  # its own fault: WriteError, an OSError chaining the OS error
                assert got["mro"][0] == "WriteError" and "OSError" in got["mro"], where
                assert got["cause_errno"] == errno.ENOSPC and f"injected: {name}" in got["text"], where
                assert repr(got["tag"]) in got["text"] and f"rank {culprit}" in got["text"], where
            else:  # a peer's fault: CommitError naming the rank at fault and its cause
                assert got["mro"][0] == "CommitError" and "OSError" not in got["mro"], where
                assert list(got["failures"]) == [culprit], where
                assert f"injected: {name}" in got["failures"][culprit], where
