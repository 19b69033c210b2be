"""A rank that must not load (it would receive another rank's RNG or client state after the ranks moved to
other nodes) refuses together with every other rank: no rank goes on alone into a collective the refusing
rank never makes (issue 13, item 3)."""
from __future__ import annotations

import pytest

import node_workers as nw
from dist_helpers import assert_all_ok, forkserver_context, run_ranks

pytestmark = pytest.mark.multirank


def test_a_refusal_on_one_rank_is_raised_on_every_rank(tmp_path):
    n0, n1 = str(tmp_path / "node0"), str(tmp_path / "node1")
    assert_all_ok(run_ranks(nw.save_tags, 2, str(tmp_path), [n0, n1], ["t1"], 1, ctx=forkserver_context()))
    # both ranks now read node 0's copy: rank 0 finds its own records there, rank 1 does not
    out = assert_all_ok(run_ranks(nw.load, 2, str(tmp_path), [n0, n0], None, 1, ctx=forkserver_context(),
                                  timeout=120))
    texts = {o.get("error", "").split(" [this rank")[0] for o in out}
    assert len(texts) == 1, out  # the same error on every rank
    (text,) = texts
    assert text.startswith("StateMismatchError: not every rank can go on"), text
    assert "1 rank(s) failed" in text and "rank 1: " in text and "rank 1 of 2 has no RNG state of its own" in text
    assert "rank 0: " not in text, text
